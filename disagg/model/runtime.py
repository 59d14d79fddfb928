"""Process-level settings for the processes that run the model, and loading it for serving."""

from __future__ import annotations

import logging
import os

import torch

from disagg.config import ModelOptions
from disagg.model.fused import fuse_activations
from disagg.model.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


def configure_torch(threads: int) -> None:
    """Set torch's intra-op threads deliberately: two workers each grabbing every core fight over them."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.set_grad_enabled(False)


def load_for_serving(options: ModelOptions) -> LoadedModel:
    """A worker's model: threads set first, then the weights (hub, folder, bundled or dummy), with fused
    activations (disagg/model/fused.py)."""
    configure_torch(options.threads)
    lm = load_model(
        options.model, load_format=options.load_format, dtype=options.dtype, device=options.device, seed=options.seed
    )
    fused = fuse_activations(lm.model)
    log.info("loaded %s (%s) in %.2fs; %d activations fused", lm.name, options.dtype, lm.load_model_seconds, fused)
    return lm
