"""A sans-IO network for proxy tests: a Proxy, UserAgents and raw endpoints on one TimerWheel,
messages queued and delivered by hand, so every timer fires at an exact time."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from fastsip import TimerWheel, parse
from fastsip.proxy.core import Proxy, RequestRouter
from fastsip.sip import Message, Request, Response
from fastsip.transaction import TransactionLayer
from fastsip.transport import Address
from fastsip.transport.rules import stamp_received
from fastsip.ua import Call, UserAgent

HOST = "127.0.0.1"


class Net:
    def __init__(self) -> None:
        self.wheel = TimerWheel(0.001)
        self.queue: deque[tuple[bytes, Address, Address]] = deque()
        self.nodes: dict[tuple[str, int], Node] = {}
        self.log: list[tuple[float, str, str, str]] = []  # (time, sender, receiver, first line)
        self.drop: Callable[[bytes, Address], bool] = lambda data, dest: False

    def run(self, until: float | None = None) -> None:
        self.flush()
        if until is None:
            return
        while True:
            nxt = self.wheel.next_deadline()
            if nxt is None or nxt > until:
                break
            self.wheel.advance(nxt)
            self.flush()
        self.wheel.advance(until)
        self.flush()

    def after(self, seconds: float) -> None:
        self.run(self.wheel.time() + seconds)

    def flush(self) -> None:
        while self.queue:
            data, src, dest = self.queue.popleft()
            node = self.nodes.get((dest.host, dest.port))
            if node is None or self.drop(data, dest):
                continue
            msg = parse(data)
            if isinstance(msg, Request):
                stamp_received(msg, src)
            node.deliver(msg, src)

    def lines(self, sender: str | None = None, receiver: str | None = None) -> list[str]:
        return [line for _, s, r, line in self.log
                if (sender is None or s == sender) and (receiver is None or r == receiver)]


class Node:
    def __init__(self, net: Net, name: str, port: int, transport: str = "UDP") -> None:
        self.net = net
        self.name = name
        self.host = HOST
        self.port = port
        self.transport = transport
        net.nodes[(self.host, port)] = self

    def send(self, data: bytes, dest: Address) -> None:
        target = self.net.nodes.get((dest.host, dest.port))
        self.net.log.append((self.net.wheel.time(), self.name,
                             target.name if target else f"{dest.host}:{dest.port}",
                             data.split(b"\r\n", 1)[0].decode()))
        self.net.queue.append((data, Address(dest.transport, self.host, self.port), dest))

    def sent_by(self, transport: str) -> tuple[str, int]:
        return (self.host, self.port)

    def deliver(self, msg: Message, source: Address) -> None:
        raise NotImplementedError

    @property
    def address(self) -> Address:
        return Address(self.transport, self.host, self.port)


class ProxyNode(Node):
    def __init__(self, net: Net, router: RequestRouter | None = None, port: int = 5060,
                 **kw: Any) -> None:
        super().__init__(net, "proxy", port)
        self.proxy = Proxy(router, **kw)
        self.layer = TransactionLayer(self, net.wheel, self.proxy)
        self.proxy.attach(self.layer)

    def deliver(self, msg: Message, source: Address) -> None:
        self.proxy.receive(msg, source)


class Phone(Node):
    """A UserAgent; ``policy(call)`` decides each incoming INVITE (default: answer)."""

    def __init__(self, net: Net, name: str, port: int,
                 policy: Callable[[Call], object] | None = None) -> None:
        super().__init__(net, name, port)
        self.calls: list[Call] = []

        def incoming(call: Call) -> None:
            self.calls.append(call)
            if policy is None:
                call.answer(b"v=0\r\n", content_type="application/sdp")
            else:
                policy(call)

        self.ua = UserAgent(self, net.wheel, on_incoming=incoming, user=name)
        self.layer = self.ua.create_layer()

    def deliver(self, msg: Message, source: Address) -> None:
        self.layer.receive(msg, source)

    @property
    def uri(self) -> str:
        return f"sip:{self.name}@{self.host}:{self.port}"


class Raw(Node):
    """Records what it receives; sends raw messages.  ``auto`` answers requests statelessly."""

    def __init__(self, net: Net, name: str, port: int,
                 auto: Callable[[Request], Response | None] | None = None) -> None:
        super().__init__(net, name, port)
        self.received: list[Message] = []
        self.auto = auto

    def deliver(self, msg: Message, source: Address) -> None:
        self.received.append(msg)
        if self.auto is not None and isinstance(msg, Request) and msg.method != "ACK":
            resp = self.auto(msg)
            if resp is not None:
                self.reply(resp)

    def reply(self, response: Response) -> None:
        via = response.top_via
        assert via is not None
        self.send(bytes(response), Address("UDP", via.received or via.host, via.port or 5060))

    def send_to(self, data: bytes | str, port: int = 5060) -> None:
        if isinstance(data, str):
            data = data.replace("\n", "\r\n").encode()
        self.send(data, Address("UDP", HOST, port))

    def requests(self, method: str | None = None) -> list[Request]:
        return [m for m in self.received if isinstance(m, Request)
                and (method is None or m.method == method)]

    def responses(self) -> list[Response]:
        return [m for m in self.received if isinstance(m, Response)]

    def statuses(self) -> list[int]:
        return [m.status_code for m in self.responses()]


_COUNTER = [0]


def raw_request(method: str = "INVITE", uri: str = "sip:bob@127.0.0.1:5060", *,
                port: int = 5071, extra: str = "", to_tag: str = "", branch: str | None = None,
                max_forwards: int | None = 70, cseq: int = 1, call_id: str | None = None,
                cseq_method: str | None = None) -> str:
    _COUNTER[0] += 1
    n = _COUNTER[0]
    branch = branch or f"z9hG4bKraw{n}"
    mf = f"Max-Forwards: {max_forwards}\n" if max_forwards is not None else ""
    tag = f";tag={to_tag}" if to_tag else ""
    return (f"{method} {uri} SIP/2.0\n"
            f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch}\n"
            f"{mf}"
            f"From: <sip:alice@127.0.0.1:{port}>;tag=a{n}\n"
            f"To: <{uri}>{tag}\n"
            f"Call-ID: {call_id or f'call{n}@test'}\n"
            f"CSeq: {cseq} {cseq_method or method}\n"
            f"Contact: <sip:alice@{HOST}:{port}>\n"
            f"{extra}"
            f"Content-Length: 0\n\n")
