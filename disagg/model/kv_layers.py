"""The one in-memory form of a sequence's KV cache that every layer of the library passes around."""

from __future__ import annotations

import torch

# One (keys, values) pair per layer, each [1, kv_heads, seq_len, head_dim].
KvLayers = list[tuple[torch.Tensor, torch.Tensor]]
