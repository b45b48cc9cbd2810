"""Type stub for the compiled receiving rules (fastsip/transport/_intake.pyx); they are
documented in fastsip.transport.intake."""

from collections.abc import Iterable

from fastsip.errors import ParseError
from fastsip.sip import Limits, Request, Response
from fastsip.transport import Address, Transport
from fastsip.transport.intake import Deliver, Malformed, Steer

def is_stun(data: bytes | bytearray | memoryview) -> bool: ...
def receive_datagram(data: bytes, host: str, port: int, connection: int, limits: Limits,
                     transport: Transport, deliver: Deliver | None,
                     local: Iterable[tuple[str, int]] | None = None,
                     steer: Steer | None = None,
                     malformed: Malformed | None = None) -> bool: ...
def deliver_message(msg: Request | Response, source: Address, deliver: Deliver | None,
                    local: Iterable[tuple[str, int]] | None = None) -> bool: ...
def answer_malformed(data: bytes, error: ParseError, source: Address,
                     transport: Transport) -> bool: ...
