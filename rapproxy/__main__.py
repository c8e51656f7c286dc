"""`python -m rapproxy` is the `rapproxy` command."""

import sys

from rapproxy.cli import main

sys.exit(main())
