"""Python garbage collection at fixed steps (``train.gc_every``), not whenever the allocator count says.

Why: a collection pauses the host for up to tens of milliseconds (more the more Python objects compiled
graphs keep alive), at a moment that differs between ranks. Under expert or data parallelism every rank then
waits at the next collective for the paused one, once per pause per rank. Collecting at the same step
everywhere makes the pauses coincide; freezing what exists when training starts (the model, compiled code)
keeps those objects out of every later collection. The arithmetic is unaffected.
"""
from __future__ import annotations

import gc


class ScheduledGC:
    """Context for a training loop: automatic collection off inside (``every`` > 0), ``step(n)`` collects when n is
    a multiple of ``every``; on exit the frozen objects are released to the
    collector again and automatic collection is restored as it was."""

    def __init__(self, every: int):
        self.every = every
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> "ScheduledGC":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ScheduledGC":
        """Collect everything once, freeze the survivors, turn automatic collection off (``every`` > 0)."""
        if self.every > 0:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()       # what exists now (model, optimizer, compiled code) is never scanned again
            gc.disable()
        return self

    def step(self, step: int) -> bool:
        """Collect if ``step`` (> 0) is due; returns whether it collected."""
        if self.every > 0 and step > 0 and step % self.every == 0:
            gc.collect()      # all generations: only objects made since start() are tracked (the rest is frozen)
            return True
        return False

    def stop(self) -> None:
        """Release the frozen objects to the collector and restore automatic collection as it was."""
        if self.every > 0:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
