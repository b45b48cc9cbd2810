"""Type stub for the compiled UDP path of the asyncio shell (fastsip/asyncio/_udp.pyx): the
per-datagram methods TransportLayer and its datagram protocol bind; their documentation is in
the .pyx and in fastsip.asyncio.transport."""

import asyncio
import socket
from typing import Any, final

from fastsip.asyncio.transport import TransportLayer, _Datagram
from fastsip.timers import TimerWheel
from fastsip.transport import Address
from fastsip.transport._base import TransportBase

STREAM: tuple[str, str]
WILDCARDS: tuple[str, str, str]
MAX_DATAGRAM: int
MAX_WRITE_BUFFER: int
OWN_ID: int
VIA_WINDOW: int

INTAKE_ATTRIBUTES: frozenset[str]

@final
class Listener:
    address: Address
    family: int
    sent_by: tuple[str, int]
    id: int
    local: Address
    via_mark: bytes
    receive_buffer: int
    _server: Any
    _acceptor: Any
    _udp: UdpSocket | _Datagram | None
    _udp_sock: socket.socket | None
    own: Listener | None
    def __init__(self, address: Address, family: int, sent_by: tuple[str, int],
                 lid: int = 0) -> None: ...

@final
class TransportStats:
    datagrams: int
    datagrams_denied: int
    connections_denied: int
    connections_refused: int
    connections_refused_per_source: int
    messages_denied: int
    connects_refused: int
    closed_idle: int
    closed_read_timeout: int
    tls_handshakes_failed: int
    sends_dropped: int
    kernel_filtered: int
    malformed: int
    def __init__(self, *, datagrams: int = 0, datagrams_denied: int = 0,
                 connections_denied: int = 0, connections_refused: int = 0,
                 connections_refused_per_source: int = 0, messages_denied: int = 0,
                 connects_refused: int = 0, closed_idle: int = 0,
                 closed_read_timeout: int = 0, tls_handshakes_failed: int = 0,
                 sends_dropped: int = 0, kernel_filtered: int = 0,
                 malformed: int = 0) -> None: ...
    def as_dict(self) -> dict[str, int]: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class IntakeState:
    limits: Any
    on_message: Any
    local: list[tuple[str, int]] | None
    steer: Any
    answer_malformed: Any
    admit: Any
    stats: TransportStats
    listeners: list[Listener]
    own: dict[int, Listener]
    nearest: dict[str, dict[int, Listener | None]]
    closed: bool
    wheel: TimerWheel | None
    def __init__(self, layer: TransportLayer) -> None: ...
    def refresh(self, layer: TransportLayer) -> None: ...

def is_loopback(host: str) -> bool: ...
def family_of(host: str) -> int: ...
def local_for(self: TransportLayer, dest: Address) -> Address: ...
def via_for(self: TransportLayer, dest: Address, local: Address | None = None) -> Address: ...
def udp_listener(self: TransportLayer, family: int, host: str = "") -> Listener | None: ...
def send(self: TransportLayer, data: bytes, dest: Address) -> None: ...
def send_udp(self: TransportLayer, data: bytes, dest: Address) -> None: ...
def datagram_send(self: _Datagram, data: bytes, dest: Address) -> None: ...
def receive(self: TransportLayer, data: bytes, host: str, port: int, lid: int = 0,
            steer: bool = True) -> None: ...
def datagram_received(self: _Datagram, data: bytes, addr: tuple[Any, ...]) -> None: ...

@final
class LayerTransport(TransportBase):
    layer: TransportLayer
    def __init__(self, layer: TransportLayer) -> None: ...
    def replaced(self, name: str) -> None: ...

@final
class UdpSocket:
    layer: TransportLayer
    sock: socket.socket
    loop: asyncio.AbstractEventLoop
    lid: int
    closed: bool
    def __init__(self, layer: TransportLayer, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop, lid: int) -> None: ...
    def _read_ready(self) -> None: ...
    def send(self, data: bytes, dest: Address) -> None: ...
    def send_failed(self, dest: Address, code: int) -> None: ...
    def close(self) -> None: ...
