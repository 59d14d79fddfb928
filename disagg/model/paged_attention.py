"""The decode attention kernel over the paged KV pool (csrc/paged_attention.cpp), built once per machine.

`torch.utils.cpp_extension` compiles the C++ source with the host's instruction set (-march=native) into
`~/.cache/disagg/torch_extensions/` (or $DISAGG_CACHE_DIR) on first use, ~40 s on 2 cores, once however many
processes start together (a build that dies leaves nothing that blocks the next); later processes load the built
library in well under a second. The library's name carries a hash of the source and of the CPU's model and
flags, so a cache shared between different machines never loads code built for another CPU. Where no C++ compiler
is found the build fails once and `load()` returns False: the native model then gathers the blocks and attends
with matmuls (disagg/model/native.py), slower but the same math.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import time

import torch

from disagg.model.build_once import build_folder_once

log = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).resolve().parent / "csrc" / "paged_attention.cpp"


def _cpu_signature() -> bytes:
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted).encode()


def _build_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("DISAGG_CACHE_DIR", pathlib.Path.home() / ".cache" / "disagg"))
    return cache / "torch_extensions"


def _compile(name: str, folder: pathlib.Path) -> None:
    """Compile the kernel into `folder`/`name`.so, in a child process: `cpp_extension.load` also loads what it built,
    and this process loads the library from its final folder only (a namespace registers once per process)."""
    code = (
        "import sys\n"
        "from torch.utils import cpp_extension\n"
        "cpp_extension.load(sys.argv[1], [sys.argv[2]], extra_cflags=['-O3', '-march=native', '-fopenmp'], "
        "build_directory=sys.argv[3], is_python_module=False)\n"
    )
    command = [sys.executable, "-c", code, name, str(_SOURCE), str(folder)]
    subprocess.run(command, check=True, capture_output=True, text=True)


@functools.cache
def load() -> bool:
    """Build (the first time on this machine: once, however many processes start together, see
    disagg/model/build_once.py) and load the kernel; False when it cannot be built here."""
    digest = hashlib.blake2b(_SOURCE.read_bytes() + _cpu_signature() + torch.__version__.encode(), digest_size=6)
    name = f"disagg_paged_attention_{digest.hexdigest()}"
    started = time.perf_counter()
    try:
        folder = build_folder_once(_build_dir() / name, functools.partial(_compile, name), f"{name}.so")
        torch.ops.load_library(str(folder / f"{name}.so"))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # no compiler, no headers: gather instead
        detail = exc.stderr[-2000:] if isinstance(exc, subprocess.CalledProcessError) else exc
        log.warning("paged attention kernel unavailable (%s); decode attention gathers blocks instead", detail)
        return False
    # for torch.compile's tracing: the output's shape and dtype are the query's
    torch.library.register_fake("disagg::paged_decode_attention")(lambda query, *_: torch.empty_like(query))
    log.info("paged attention kernel %s loaded in %.1fs", name, time.perf_counter() - started)
    return True


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each row's query [rows, heads, D] over its first `context_lens[row]` tokens in the pool
    (`block_tables` [rows, blocks], int64; caches [kv_heads, blocks, block_size, D]); returns [rows, heads, D].
    Needs `load()` to have returned True."""
    return torch.ops.disagg.paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale)
