"""Type stub for the compiled proxy core (fastsip/proxy/_core.pyx); its documentation is in
fastsip.proxy.core."""

from collections.abc import Container, Iterable, Sequence
from typing import Any, ClassVar, final

from fastsip.proxy.core import MediaHook, ProxyContext, RequestRouter
from fastsip.sip import URI, Message, Request, Response
from fastsip.transaction import ClientTransaction, Refusals, ServerTransaction, TransactionLayer
from fastsip.transaction._layer import ClientHandlerBase, TransactionUserBase
from fastsip.transport import Address, Transport
from fastsip.transport.rfc3263 import NextHopResolver

@final
class _Ignore(ClientHandlerBase): ...

@final
class _Settled(ClientHandlerBase):
    def __init__(self, proxy: Proxy, upstream: ServerTransaction, dest: Address,
                 alias: bool) -> None: ...
    def on_response(self, txn: ClientTransaction, response: Response) -> None: ...

@final
class Branch(ClientHandlerBase):
    target: Target
    request: Request
    dest: Address
    final: Response | None
    provisional: bool
    cancel_wanted: bool
    cancel_sent: bool
    timer_c_fired: bool
    trunk: Any
    hop: Any
    alternates: list[Address]
    resolving: bool
    key: tuple[str, str] | None
    def __init__(self, ctx: ResponseContext, target: Target, request: Request,
                 dest: Address) -> None: ...
    @property
    def ctx(self) -> ResponseContext: ...
    @property
    def pending(self) -> bool: ...
    def on_response(self, txn: ClientTransaction, response: Response) -> None: ...
    def on_timeout(self, txn: ClientTransaction) -> None: ...
    def on_transport_error(self, txn: ClientTransaction) -> None: ...
    def cancel(self) -> None: ...

@final
class ResponseContext:
    request: Request
    source: Address
    branches: list[Branch]
    active: int
    serial: list[list[Target]]
    final_sent: bool
    cancelled: bool
    data: Any
    loop: str
    routed: bool
    media: Any
    def __init__(self, proxy: Proxy, txn: ServerTransaction, request: Request,
                 source: Address) -> None: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def txn(self) -> ServerTransaction: ...
    @property
    def stateless(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    @property
    def best(self) -> Response | None: ...
    def forward(self, targets: Iterable[Target], *, parallel: bool = True) -> None: ...
    def forward_groups(self, groups: Iterable[Iterable[Target]]) -> None: ...
    def respond(
        self,
        status: int | Response,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        stateless: bool | None = None,
    ) -> None: ...
    def send_best(self) -> None: ...
    def cancel(self) -> None: ...
    def expire_timer_c(self, branch: Branch) -> None: ...
    def _resume_begin(self, targets: list[Target]) -> None: ...
    def _timer_c(self, branch: Branch) -> None: ...
    def _resolved(self, branch: Branch, addresses: list[Address], reason: str | None) -> None: ...
    def _branch_failed(self, branch: Branch, status: int, reason: str | None = None) -> None: ...
    def _branch_response(self, branch: Branch, response: Response) -> None: ...

@final
class Target:
    uri: URI | str | None
    route: tuple[str, ...]
    dest: Address | None
    binding: Any
    trunk: str | None
    def __init__(
        self,
        uri: URI | str | None = None,
        *,
        route: Sequence[str] = (),
        dest: Address | None = None,
        binding: Any = None,
        trunk: str | None = None,
    ) -> None: ...

@final
class StatelessContext:
    proxy: Proxy
    request: Request
    source: Address
    decided: bool
    data: Any
    routed: bool
    def __init__(self, proxy: Proxy, request: Request, source: Address) -> None: ...
    @property
    def stateless(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    def forward(self, targets: Iterable[Target], *, parallel: bool = True) -> None: ...
    def respond(
        self,
        status: int | Response,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        stateless: bool | None = None,
    ) -> None: ...

@final
class Proxy(TransactionUserBase):
    sheds_messages: ClassVar[bool]
    router: RequestRouter | None
    record_route: bool
    timer_c: float
    stateless: bool
    max_pending: int
    max_pending_per_source: int
    retry_after: int
    aliases: set[str]
    schemes: frozenset[str]
    proxy_require: frozenset[str]
    loop_detection: bool
    trusted: Container[str]
    require_own_route: bool
    nat: bool
    nat_keeper: Any
    media: MediaHook | None
    resolver: NextHopResolver | None
    trunks: Any
    def __init__(
        self,
        router: RequestRouter | None = None,
        *,
        record_route: bool = True,
        timer_c: float = 180.0,
        stateless: bool = False,
        max_pending: int = 100_000,
        max_pending_per_source: int | None = None,
        retry_after: int = 5,
        aliases: Iterable[str] = (),
        schemes: Iterable[str] = ("sip", "sips"),
        proxy_require: Iterable[str] = (),
        loop_detection: bool = True,
        trusted: Container[str] = frozenset(),
        require_own_route: bool | None = None,
        nat: bool = True,
    ) -> None: ...
    @property
    def refusals(self) -> Refusals: ...
    def attach(self, layer: TransactionLayer) -> None: ...
    @property
    def layer(self) -> TransactionLayer: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def clock(self) -> Any: ...
    @property
    def pending(self) -> int: ...
    def sent_by(self, transport: str) -> tuple[str, int]: ...
    def is_local(self, uri: URI | None) -> bool: ...
    def on_request(self, txn: ServerTransaction, request: Request) -> None: ...
    def dialog_allowed(self, ctx: ProxyContext) -> bool: ...
    def on_ack(self, request: Request, source: Address) -> None: ...
    def on_stray_response(self, response: Response, source: Address) -> None: ...
    def on_server_timeout(self, txn: ServerTransaction) -> None: ...
    def receive(self, msg: Message, source: Address) -> None: ...
    def local_for(self, peer: Address) -> Address: ...
    def _via(self, dest: Address, branch: str, local: Address | None = None) -> str: ...
    def _make_branch(self, ctx: ResponseContext, target: Target,
                     resolved: Address | None = None) -> Branch: ...
    def _forward_stateless(self, request: Request, target: Target, source: Address) -> None: ...
    def _send_response(self, response: Response, source: Address) -> None: ...
