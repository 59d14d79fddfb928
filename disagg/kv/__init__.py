"""The KV cache as workers keep and ship it: the wire codec, message framing, transport names, the decode side's
memory budget, the prefix cache with its events, and the held-prefix handoff's checks."""
