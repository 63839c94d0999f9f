"""The server's long-lived Python heap kept out of the garbage collector's full passes.

A full (generation 2) collection walks every tracked object with the GIL held. After start-up that is the imported
modules and the models' Python objects, about 570,000 with ViT-B/32 and its runtimes, all of which live as long as
the server: each pass took 305-331 ms on an AMD Zen 4 box, about once every 1,500-3,000 searches at 1M, and stalled
every request in flight (bench/RESULTS.md, "A/B at 1M: the start-up heap frozen out of full collections"). So the
server freezes them once it has started (`settle`): collected first, so no garbage is kept, then moved to the
permanent generation, which collections skip. Objects made later are collected as before.

A frozen object is still freed when its reference count drops to zero, but a reference cycle among frozen objects
is never collected. The one thing the server replaces wholesale is its model (a switch, ingest/switch.py), whose
Python objects hold cycles: the old model's hundreds of MB stayed alive until shutdown. So a switch ends with
`resettle`."""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect, then freeze everything that is left (the server's start-up)."""
    gc.collect()
    gc.freeze()


def resettle() -> None:
    """Where the heap is frozen, give the frozen objects back to the collector, collect what has become garbage
    since (an old model) and freeze the rest again: one full pass, as at start-up."""
    if gc.get_freeze_count():
        gc.unfreeze()
        settle()


def release() -> None:
    """Give the frozen objects back to the collector (the server's shutdown)."""
    gc.unfreeze()
