"""The batching loops that own a worker's model: an engine thread each, with its queue, policy and KV budget."""
