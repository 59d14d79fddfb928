"""Children of `disagg up` die with it, however it dies (SIGKILL and OOM kills included).

A SIGKILLed parent runs no cleanup, so the child has to notice on its own. Two mechanisms, both armed by
`die_with_parent()` at the very start of a component process:

- Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGTERM)`): the kernel sends SIGTERM the moment the parent
  goes, and the component's usual graceful stop runs. The kernel ties it to the parent *thread* that forked the
  child, so the parent asks for it only when it spawns from its main thread (`child_env`).
- A watchdog thread that polls `getppid()` against the pid the parent passed in: where prctl is unavailable (or
  was not asked for) it sends the SIGTERM itself, and in every case it has the kernel end the process
  `HARD_EXIT_SECONDS` after the parent is gone (SIGALRM), so a drain that waits for streams (`--grace-seconds`) or
  a stuck thread cannot keep an orphan alive.

The parent pid travels in the environment because the parent may die before the child calls prctl: then
`getppid()` already differs from it and the child exits at once instead of waiting for a signal that never comes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PARENT_PID_ENV = "DISAGG_PARENT_PID"  # pid the child must stay a child of ("" or unset: not supervised)
PDEATHSIG_ENV = "DISAGG_PARENT_DEATH_SIGNAL"  # "1": also arm the kernel's parent-death signal
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.25
HARD_EXIT_SECONDS = 2.0


def child_env() -> dict[str, str]:
    """Variables for a child that must not outlive this process (merge into its environment)."""
    main_thread = threading.current_thread() is threading.main_thread()
    return {PARENT_PID_ENV: str(os.getpid()), PDEATHSIG_ENV: "1" if main_thread else "0"}


def _set_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig); False where there is no prctl (not Linux, no libc) or it fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, send_sigterm: bool, poll: float, hard_exit: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll)
    log.warning("parent process %d is gone; stopping (hard exit in %.1fs)", parent_pid, hard_exit)
    # The hard exit is the kernel's: SIGALRM's default action ends the process even while Python is stuck.
    signal.setitimer(signal.ITIMER_REAL, hard_exit)
    if send_sigterm:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(hard_exit + 1.0)
    os._exit(1)  # only reached if something installed a SIGALRM handler


def die_with_parent(
    parent_pid: int | None = None,
    use_prctl: bool | None = None,
    poll: float = POLL_SECONDS,
    hard_exit: float = HARD_EXIT_SECONDS,
) -> bool:
    """Arm both mechanisms for `parent_pid` (default: from the environment); False when not supervised.

    Exits at once (status 1) if the parent is already gone.
    """
    if parent_pid is None:
        value = os.environ.get(PARENT_PID_ENV, "")
        if not value:
            return False
        parent_pid = int(value)
    if use_prctl is None:
        use_prctl = os.environ.get(PDEATHSIG_ENV, "1") == "1"
    armed = use_prctl and _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl (or this is not its child): nobody to serve
        print(
            f"parent process {parent_pid} is gone (parent is now {os.getppid()}); exiting", file=sys.stderr, flush=True
        )
        os._exit(1)
    threading.Thread(
        target=_watch, args=(parent_pid, not armed, poll, hard_exit), name="parent-watchdog", daemon=True
    ).start()
    return True
