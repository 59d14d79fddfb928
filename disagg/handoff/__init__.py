"""The KV handoff between workers: the prefill side's senders (relayed, direct, shared memory), the decode side's
inbox for pushed caches, and the receiving end that takes a handoff by whichever transport it came."""
