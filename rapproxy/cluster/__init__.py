"""Where the daemon learns the cluster's desired state: API informers or static manifest files."""
