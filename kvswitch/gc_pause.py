"""Pausing Python's cyclic garbage collector while big, cycle-free structures are built.

Building the cluster's state (a list of 50k pods decoded, parsed and held; a cluster-wide policy
computation) allocates millions of objects and no reference cycles: the collector would only scan
the growing structures again and again (half or more of the CPU of such a step). Reference counting
frees garbage meanwhile as always. Pauses nest and may overlap across awaits (informers listing
concurrently): the collector runs again when the last one ends, and only if a pause stopped it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_pauses = 0
_stopped_by_a_pause = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    global _pauses, _stopped_by_a_pause
    if _pauses == 0:
        _stopped_by_a_pause = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _stopped_by_a_pause:
            _stopped_by_a_pause = False
            gc.enable()
