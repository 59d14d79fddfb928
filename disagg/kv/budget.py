"""The decode worker's KV memory budget: one ledger for every byte of KV it has promised.

Two kinds of entries share one limit (`--kv-budget-mb`; 0 = no limit, still counted):
- a `Reservation` per sequence not yet in the running batch: made from its SequenceStart (or, for a pushed cache,
  its push header) *before* anything is allocated for it, for its final size (prompt + max_new_tokens), and
  released exactly once when its Decode call ends, whatever the reason;
- the running batch's slab: the bytes it really holds. The engine grows it only with `join_slab`, which moves the
  joining sequences' reservations into it and refuses (the sequences wait) when the new slab would not fit.

So `used` (what GetLoad reports as kv_bytes) never exceeds the limit. Not counted: while a joining sequence's cache
is copied into the slab, its received tensors and one layer of the old slab exist at once (see README).
"""

from __future__ import annotations

import threading

from disagg.errors import Overloaded


class Reservation:
    """Bytes one sequence may hold until it ends. `release()` is idempotent: call it from every way out."""

    def __init__(self, budget: KvBudget, nbytes: int, label: str):
        self.budget, self.nbytes, self.label = budget, nbytes, label
        self.in_slab = False  # moved into the running batch's slab (the slab's bytes account for it then)
        self.released = False

    def resize(self, nbytes: int) -> None:
        """Grow or shrink (a pushed prompt cache becomes its sequence's final size); Overloaded if it cannot."""
        self.budget._resize(self, nbytes)

    def release(self) -> None:
        self.budget._release(self)


class KvBudget:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.staged = 0  # reservations not in the slab
        self.slab = 0  # what the running batch's slab holds
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self.staged + self.slab

    def _refuse(self, needed: int, what: str) -> Overloaded:
        return Overloaded(
            f"decode worker KV budget full: {what} needs {needed} bytes, {self.used} of {self.limit} are promised "
            f"({self.staged} to waiting sequences, {self.slab} to the running batch; --kv-budget-mb)"
        )

    def reserve(self, nbytes: int, label: str = "") -> Reservation:
        """A sequence's reservation, before any of its KV is allocated; Overloaded when it does not fit now."""
        with self._lock:
            if self.limit and self.used + nbytes > self.limit:
                raise self._refuse(nbytes, label or "a sequence")
            self.staged += nbytes
            return Reservation(self, nbytes, label)

    def _resize(self, reservation: Reservation, nbytes: int) -> None:
        with self._lock:
            if reservation.released or reservation.in_slab:
                return
            grow = nbytes - reservation.nbytes
            if grow > 0 and self.limit and self.used + grow > self.limit:
                raise self._refuse(grow, reservation.label or "a sequence")
            self.staged += grow
            reservation.nbytes = nbytes

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            if not reservation.in_slab:
                self.staged -= reservation.nbytes

    def join_slab(self, slab_bytes: int, joining: list[Reservation | None]) -> bool:
        """Whether the slab may become `slab_bytes` with `joining` moved into it; if so, it is booked."""
        with self._lock:
            unique = {id(r): r for r in joining if r is not None}.values()  # (the n forks of a request share one)
            moving = sum(r.nbytes for r in unique if not r.released and not r.in_slab)
            # (an empty batch can always take its first sequence exactly: one row of its final length is no more
            # than that sequence's own reservation)
            if self.limit and self.staged - moving + slab_bytes > self.limit:
                return False
            for r in unique:
                if not r.released:
                    r.in_slab = True
            self.staged -= moving
            self.slab = slab_bytes
            return True

    def set_slab(self, slab_bytes: int) -> None:
        """The slab's bytes after it changed without growing (sequences left, the batch emptied)."""
        with self._lock:
            self.slab = slab_bytes
