"""The native decode step compiled with `torch.compile` (Inductor), its artefacts cached on disk.

One graph serves every batch: the step is traced with dynamic sizes (rows, blocks per row, pool blocks), so a new
batch size or a longer sequence never recompiles, and nothing is padded to a bucket. Inductor fuses the small ops
between the matmuls (norms, RoPE, residual adds, activations, the slot arithmetic) into a few C++ loops; the
matmuls stay BLAS calls and the attention the paged kernel (a custom op Inductor calls as it is). The model's weights
must be HF's own (`NativeModel(..., pack_weights=False)`): Inductor does not take oneDNN's prepacked ones.

Compiling costs minutes on 2 cores the first time; Inductor's FX graph cache under `$DISAGG_CACHE_DIR/inductor`
(~/.cache/disagg/inductor) makes later starts of the same model and torch version re-trace only (Dynamo), not
re-compile. `warm_up` runs the compile at start, on a scratch pool, so the first request does not pay it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

import torch

from disagg.model.native import DecodeFn, NativeModel

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def inductor_cache_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("DISAGG_CACHE_DIR", pathlib.Path.home() / ".cache" / "disagg"))
    return cache / "inductor"


def compile_decode(native: NativeModel, mode: str = "default") -> DecodeFn:
    """`native.decode`, compiled lazily (on its first call) with dynamic shapes; Inductor's caches go under
    `inductor_cache_dir()` unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if native.packed:  # (Inductor lowers oneDNN's packed matmul only for weights it packed itself)
        raise ValueError("compile a NativeModel built with pack_weights=False")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    compiled = torch.compile(native.decode, dynamic=True, mode=None if mode == "default" else mode)
    return compiled


def warm_up(native: NativeModel, decode: DecodeFn, dtype: torch.dtype, device: torch.device) -> float:
    """Run `decode` once on a scratch pool (so the compile happens now, not on the first request); returns the
    seconds it took. The sizes are distinct and above 1 (rows 3, blocks per row 5, pool blocks 17, block size
    16) so that the traced graph does not specialise on one of them equalling another."""
    s = native.shape
    rows, width, blocks, block_size = 3, 5, 17, 16
    keys = [
        torch.zeros(s.kv_heads, blocks, block_size, s.head_dim, dtype=dtype, device=device) for _ in range(s.layers)
    ]
    values = [torch.zeros_like(k) for k in keys]
    tables = torch.arange(rows * width, device=device).view(rows, width) % blocks
    positions = torch.tensor([7, 40, 77], device=device)
    tokens = torch.tensor([1, 2, 3], device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        decode(tokens, positions, tables, keys, values)
    seconds = time.perf_counter() - started
    log.info("decode step compiled (or loaded from %s) in %.1fs", os.environ.get("TORCHINDUCTOR_CACHE_DIR"), seconds)
    return seconds
