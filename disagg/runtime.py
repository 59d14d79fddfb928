"""Process-level settings for the processes that run the model."""

from __future__ import annotations

import logging
import os

import torch


def configure_torch(threads: int) -> None:
    """Set torch's intra-op threads deliberately: two workers each grabbing every core fight over them."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.set_grad_enabled(False)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
