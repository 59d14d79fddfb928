"""The `disagg` command's entry point: process settings that must exist before torch is imported, then the CLI.

OpenMP reads its environment once, when torch loads it. GNU OpenMP's threads spin (busy-wait) up to 300,000
iterations after each parallel region before they sleep: right for one process that owns the machine, costly for
two model processes sharing cores (the prefill and decode workers of one host), where each one's spinning threads
take the CPU the other one's threads wait for. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) fixes that but costs a
wake-up per parallel region, hundreds per decode step, and slows a step down. Workers therefore default to
GOMP_SPINCOUNT=10000: a spin short enough to be free when the other process needs the core, long enough to catch
the next operation of the same step (a step as fast as with spinning). The A/B is recorded in
benchmarks/results/threads_* (indexed in benchmarks/results/README.md). A value the user set is kept; one set to
the empty string is removed (OpenMP's own default).

A worker steps its model on an engine thread, not the main thread that loaded it, so its process holds two OpenMP
thread pools; GNU OpenMP then counts more threads than cores and spins only ~100 iterations (whatever
GOMP_SPINCOUNT says) before sleeping, a futex wake-up per parallel region: a SmolLM2 decode step at batch 1 took
~28% longer on the engine thread than on the main thread. Intel's OpenMP runtime (the `intel-openmp` package, what
vLLM's CPU docs preload too) has no such penalty, so a worker re-executes itself once with it in LD_PRELOAD (same
pid, same arguments) and KMP_BLOCKTIME=1 (ms of spinning after a region: short, for the same reason as above).
DISAGG_OPENMP=gnu keeps GNU OpenMP; where the library is not installed nothing changes. The A/B is recorded in
benchmarks/results/openmp_runtime_*.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping, MutableMapping

WORKER_COMMANDS = frozenset({"prefill", "decode"})
# The native runner's linears run through oneDNN (disagg/model/native_weights.py), which keeps a compiled primitive
# per matmul shape, and PyTorch's ideep an LRU of them too; both hold 1024 by default. Batch sizes and prompt
# lengths vary, so at that size a worker's resident memory crept up with every new shape until both were full
# (tests/test_cli.py). 64 (LRU) holds the shapes of a few batch sizes; the throughput A/B against 1024 is
# benchmarks/results/primitive_caches_smollm2.
PRIMITIVE_CACHE = "64"
WORKER_ENV_DEFAULTS = {
    "GOMP_SPINCOUNT": "10000",
    "KMP_BLOCKTIME": "1",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": PRIMITIVE_CACHE,
    "LRU_CACHE_CAPACITY": PRIMITIVE_CACHE,
}
INTEL_OPENMP = pathlib.Path(sys.prefix) / "lib" / "libiomp5.so"  # where the intel-openmp wheel puts it


def _is_worker(argv: list[str]) -> bool:
    """Whether `disagg ARGV...` runs a prefill or decode worker (its first argument that is not a flag)."""
    return next((arg for arg in argv if not arg.startswith("-")), "") in WORKER_COMMANDS


def process_env_defaults(argv: list[str]) -> dict[str, str]:
    """The environment defaults for the process `disagg ARGV...` is about to become (workers only)."""
    return dict(WORKER_ENV_DEFAULTS) if _is_worker(argv) else {}


def apply_process_env(argv: list[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `process_env_defaults(argv)` where the user has not; remove a variable the user set to ""."""
    for name, value in process_env_defaults(argv).items():
        if environ.get(name) == "":
            del environ[name]
        else:
            environ.setdefault(name, value)


def openmp_preload(argv: list[str], environ: Mapping[str, str], library: pathlib.Path = INTEL_OPENMP) -> str | None:
    """The LD_PRELOAD a worker must be re-executed with to run on Intel's OpenMP; None when it need not be (not a
    worker, DISAGG_OPENMP=gnu, no library, or it is preloaded already)."""
    preload = [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry]
    if not _is_worker(argv) or environ.get("DISAGG_OPENMP", "intel") != "intel":
        return None
    if not library.exists() or str(library) in preload:
        return None
    return ":".join([str(library), *preload])


def main() -> None:
    apply_process_env(sys.argv[1:])
    preload = openmp_preload(sys.argv[1:], os.environ)
    if preload is not None:  # once: the new image finds the library in LD_PRELOAD
        os.environ["LD_PRELOAD"] = preload
        os.execv(sys.executable, sys.orig_argv)
    from disagg.tools.cli import main as cli_main  # imports torch: only now

    cli_main()
