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
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WORKER_COMMANDS = frozenset({"prefill", "decode"})
WORKER_ENV_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}


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
