"""The `disagg` command's entry point: process settings that must exist before torch is imported, then the CLI.

OpenMP reads its environment once, when torch loads it. By default its threads spin (busy-wait) between parallel
regions, which is right for one process that owns the machine and ruinous for two model processes sharing cores
(the prefill and decode workers of one host): each one's spinning threads take the CPU the other one's threads are
waiting for. Workers therefore default to OMP_WAIT_POLICY=PASSIVE (idle threads sleep). Measured on 2 cores
(results/threads.md): the cluster at concurrency 32 with 2 threads per worker went from 186 to 235 output
tokens/s, and concurrency 1's time per output token from 53-62 ms to 29-32 ms under background load. A value the
user set is kept; one set to the empty string is removed (OpenMP's own default: spin a while, then sleep).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WORKER_COMMANDS = frozenset({"prefill", "decode"})
WORKER_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def process_env_defaults(argv: list[str]) -> dict[str, str]:
    """The environment defaults for the process `disagg ARGV...` is about to become (workers only)."""
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    return dict(WORKER_ENV_DEFAULTS) if command in WORKER_COMMANDS else {}


def apply_process_env(argv: list[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `process_env_defaults(argv)` where the user has not; remove a variable the user set to ""."""
    for name, value in process_env_defaults(argv).items():
        if environ.get(name) == "":
            del environ[name]
        else:
            environ.setdefault(name, value)


def main() -> None:
    apply_process_env(sys.argv[1:])
    from disagg.tools.cli import main as cli_main  # imports torch: only now

    cli_main()
