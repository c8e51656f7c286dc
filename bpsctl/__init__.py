"""bpsctl: look at and operate BackupPodSets from a terminal, like kubectl for one resource."""
