"""The KV cache between workers: its types, wire codec, message framing, transports, and the receiving side."""
