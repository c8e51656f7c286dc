"""Telemetry I/O shells: measure this node, serve the figures to peers, poll the peers.

The pure state (samples, RTT EWMA, overload hysteresis, snapshots) lives in
`rapproxy.model.telemetry.TelemetryTracker`; this package only moves figures between the outside
world (cgroups, psutil, HTTP) and that tracker.
"""
