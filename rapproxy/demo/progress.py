"""One line per demo step, with the time since the start and how long the step took.

A newcomer watching `make demo` should see what is happening and that it is not stuck; the
steps are few and slow (seconds), so plain lines beat a spinner and survive `| tee`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.started = time.monotonic()

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f}s]"

    def say(self, text: str) -> None:
        print(f"{self._stamp()} {text}", file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Print `text …`, run the block, then `done (N.N s)` or `FAILED` on the same story."""
        begun = time.monotonic()
        print(f"{self._stamp()} {text} ...", file=self.out, flush=True)
        try:
            yield
        except BaseException:
            print(f"{self._stamp()}   FAILED: {text}", file=self.out, flush=True)
            raise
        print(
            f"{self._stamp()}   done ({time.monotonic() - begun:.1f} s)", file=self.out, flush=True
        )
