"""What people run around the service: the `disagg` command, a local cluster, the client, inspect (benchmarks are
the top-level `benchmarks` package)."""
