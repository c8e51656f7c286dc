"""HTTP surfaces of the daemon: health (kube-proxy compatible), metrics, debug state, telemetry."""
