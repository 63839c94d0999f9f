"""TorchScript traces of the towers' forward passes on the CPU: one call per pass, the GIL released for all of it.

Eager mode releases and retakes the GIL at each of a pass's hundreds of operators, so every operator queues
behind any other thread running Python: the server's request threads (a text pass took 2.5x its standalone time
under load), or the other ingest model worker (two single-threaded image workers ran 36.3 images/s eager, 39.0
traced, against 19.5 for one). A trace is only an optimisation: it is checked against eager mode on other shapes
than it was traced at, and eager mode serves wherever tracing fails or differs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from loupe.models import torch_thread

log = logging.getLogger(__name__)


def trace_checked(
    name: str,
    module: Any,
    example: tuple[Any, ...],
    checks: Sequence[tuple[Any, ...]],
    differs: Callable[[Any, Any], str | None],
) -> Any:
    """torch.jit.trace(module, example), or None (logged) if tracing fails or `differs(eager, traced)` names a
    difference on any of the `checks` inputs. Traced and checked on the torch thread: its forward passes would
    otherwise give the calling thread an OpenMP team of its own (models/torch_thread.py)."""

    def trace() -> Any:
        import torch

        torch_thread.use_threads(torch_thread.default_threads())
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings: shape checks that hold for every input
                traced = torch.jit.trace(module, example, check_trace=False)
                for args in checks:
                    problem = differs(module(*args), traced(*args))
                    if problem:
                        raise ValueError(f"{problem} on inputs shaped {tuple(args[0].shape)}")
        except Exception as exc:  # eager mode gives the same vectors
            log.warning(
                "the %s could not be traced (%s: %s): it runs in eager mode", name, type(exc).__name__, exc
            )
            return None
        return traced

    return torch_thread.call(trace)
