"""gRPC plumbing: servers, channels, interceptors, stream helpers, service registration and proto conversions."""
