"""What people run around the service: the `disagg` command, a local cluster, the client, benchmarks, inspect."""
