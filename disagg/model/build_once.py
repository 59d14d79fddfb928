"""A folder built at most once however many processes ask for it at the same time (the bundled model's conversion).

`disagg up` starts a prefill and a decode worker together; on a first start both would convert the same GGUF, each
spending ~20 s of the same two cores. Here the first one to take an exclusive `flock` on a lock file beside the
folder builds it into a temporary folder and renames that into place (atomic on one file system: the folder is
either absent or complete); the others wait on the lock and then find the folder built. flock belongs to an open
file description, so threads that each open the lock file exclude each other too, and the kernel releases it when
its holder dies: a crashed build leaves only a temporary folder, which the next builder removes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

log = logging.getLogger(__name__)

TEMPORARY_INFIX = ".tmp"  # temporary folders are named <target><infix><random>, beside the target


def build_folder_once(target: pathlib.Path, build: Callable[[pathlib.Path], None], marker: str) -> pathlib.Path:
    """`target`, built by `build(folder)` unless it already holds `marker` (a file the build writes, the proof
    that it is complete); concurrent callers, in any process, wait for one build instead of repeating it."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to build %s", target)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if (target / marker).exists():  # built while this one waited
            return target
        for stale in target.parent.glob(target.name + TEMPORARY_INFIX + "*"):  # builds that died (none runs now)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete, and not from here (a copy cut short): built again
            shutil.rmtree(target)
        folder = pathlib.Path(tempfile.mkdtemp(prefix=target.name + TEMPORARY_INFIX, dir=target.parent))
        try:
            build(folder)
            if not (folder / marker).exists():
                raise RuntimeError(f"building {target} wrote no {marker}")
            folder.chmod(0o755)  # (mkdtemp's 0700 would keep the folder from other users of a shared cache)
            folder.rename(target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return target
    finally:
        os.close(fd)  # releases the lock
