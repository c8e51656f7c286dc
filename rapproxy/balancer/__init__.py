"""Endpoint selection: which backend gets the next connection.

Pure: no I/O and no clock reads. Callers pass `now` and the current snapshots, so every decision
can be replayed in a test. Policies share one signature so the data plane never knows which one
runs; the `Balancer` owns the per-service mutable state (round-robin cursors, affinity, ejections).
"""
