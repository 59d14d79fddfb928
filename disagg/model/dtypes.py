"""The torch dtypes of the model dtype names flags and the wire use (disagg.config.MODEL_DTYPES), for loading and
the KV codec."""

from __future__ import annotations

import torch

from disagg.config import MODEL_DTYPES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in MODEL_DTYPES}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
