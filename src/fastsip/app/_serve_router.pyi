"""Type stub for serve's compiled Router wrapper (fastsip/app/_serve_router.pyx)."""

from collections.abc import Callable
from typing import Any

from fastsip.proxy.core import Proxy, ProxyContext, ResponseContext
from fastsip.sip import Response

class ServeRouter:
    inner: Any
    clock: Callable[[], float]
    retry_after: int
    draining: bool
    in_dialog: bool
    wants_responses: bool
    pending: dict[int, tuple[str, tuple[str, str, str, str] | None, float, str]]
    outcomes: dict[str, int]
    on_answered: Callable[[str, float], None] | None
    def __init__(self, inner: Any, *, clock: Callable[[], float] = ...,
                 retry_after: int = 5, track: bool = False) -> None: ...
    def attach(self, proxy: Proxy) -> None: ...
    def on_request(self, ctx: ProxyContext) -> None: ...
    def on_failure(self, ctx: ResponseContext, best: Response) -> bool: ...
    def on_response(self, ctx: ResponseContext, response: Response) -> None: ...
    def use(self, inner: Any) -> None: ...
    def on_final(self, ctx: ResponseContext, response: Response) -> None: ...
    def flush(self) -> None: ...
