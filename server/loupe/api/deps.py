"""Dependencies handed to handlers (built in the lifespan), and the one way handlers run blocking work."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from litestar.datastructures import State
from litestar.params import SkipValidation

from loupe.errors import Timeout
from loupe.runtime import Runtime

T = TypeVar("T")

# The runtime is injected as is: it is our own object, there is nothing to validate or convert.
RT = SkipValidation[Runtime]


def provide_runtime(state: State) -> Runtime:
    return state.runtime  # type: ignore[no-any-return]


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Model passes, FAISS, decoding and database calls run in worker threads, never on the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def blocking_within(timeout_s: float, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """As `blocking`, but the client gets a 504 after timeout_s (the thread finishes its work and is discarded)."""
    try:
        with anyio.fail_after(timeout_s):
            return await anyio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
            )
    except TimeoutError as exc:
        raise Timeout(
            f"{what} took longer than {timeout_s:g} s (LOUPE_SEARCH__TIMEOUT_S)", code="search_timeout"
        ) from exc
