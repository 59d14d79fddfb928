"""gRPC plumbing: channels, interceptors, load reports, stream helpers, service registration and proto conversions."""
