"""rapproxy: a Resource Adaptive Proxy and BackupPodSet controller for Kubernetes nodes.

One program per node does two jobs: it proxies Service traffic (local first, spilling to the best
remote node when the local one is overloaded) and, when it holds the leader Lease, reconciles
BackupPodSets. The package is layered; see docs/architecture.md for the import direction.
"""

__version__ = "0.1.0"
