"""BackupPodSets: keep primaries, hot backups and cold backups at their desired counts.

`plan` is the pure decision (desired vs observed → ordered actions), `pod_template` turns a role
into a pod manifest, `activation` is the cold-backup waiter and the client that wakes it. The
controller that wires these to the API lives beside them and is the only part that does API I/O.
"""
