"""The sans-IO NAT rules (fastsip.proxy.nat): detection, Contact aliases, flows of bindings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.proxy.location import Binding
from fastsip.proxy.nat import (
    add_alias,
    binding_flow,
    contact_behind_nat,
    is_private,
    pop_alias,
    request_behind_nat,
)
from fastsip.sip import Request, Response, parse
from fastsip.transport import DEFAULT_PORTS, Address


def invite(via: str = "192.168.1.20:5060", contact: str = "<sip:a@192.168.1.20:5060>",
           uri: str = "sip:b@example.com") -> Request:
    msg = parse((f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {via};rport;branch=z9hG4bKx\r\n"
                 "Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\n"
                 "To: <sip:b@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
                 f"Contact: {contact}\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


PUBLIC = Address("UDP", "203.0.113.7", 40312, 1)


@pytest.mark.parametrize(("host", "private"), [
    ("10.1.2.3", True), ("172.16.0.1", True), ("172.32.0.1", False), ("192.168.1.1", True),
    ("100.64.0.1", True), ("127.0.0.1", False), ("8.8.8.8", False), ("fd00::1", True),
    ("[fe80::1]", True), ("2001:db8::1", False), ("example.com", False), ("", False),
])
def test_is_private(host: str, private: bool) -> None:
    assert is_private(host) is private


def test_request_detection() -> None:
    # Via names a private address, the packet came from a public one: behind NAT.
    assert request_behind_nat(invite(), PUBLIC)
    # Via is the source: not behind NAT, even with a Contact elsewhere (third party).
    assert not request_behind_nat(
        invite(via="203.0.113.7:40312", contact="<sip:a@198.51.100.1>"), PUBLIC)
    # Same host, another UDP port (a NAT that keeps the address, or rport): behind NAT.
    assert request_behind_nat(invite(via="203.0.113.7:5060"), PUBLIC)
    # Over TCP the port of the connection says nothing.
    assert not request_behind_nat(
        invite(via="203.0.113.7:5060", contact="<sip:a@203.0.113.7:5060;transport=tcp>"),
        Address("TCP", "203.0.113.7", 40312, 9))
    # A private Contact seen from a public source, Via right: behind NAT (nathelper test 1).
    assert request_behind_nat(invite(via="203.0.113.7:40312"), PUBLIC)


def test_contact_alias_round_trip() -> None:
    request = invite()
    assert add_alias(request, PUBLIC)
    assert not add_alias(request, PUBLIC)            # once only
    [contact] = request.contact
    assert contact.uri is not None
    assert contact.uri.params["alias"] == "203.0.113.7~40312~1"
    # The other side's in-dialog request targets that Contact: the alias says where to go.
    bye = invite(uri=str(contact.uri))
    assert pop_alias(bye) == Address("UDP", "203.0.113.7", 40312)
    assert str(bye.uri) == "sip:a@192.168.1.20:5060"
    assert pop_alias(bye) is None


def test_ipv6_and_tls_alias() -> None:
    request = invite(contact="<sip:a@[fd00::5]:5061;transport=tls>;expires=60")
    flow = Address("TLS", "2001:db8::7", 50000, 3)
    assert add_alias(request, flow)
    [contact] = request.contact
    assert contact.params.get("expires") == "60"
    bye = invite(uri=str(contact.uri))
    assert pop_alias(bye) == Address("TLS", "2001:db8::7", 50000)
    assert str(bye.uri) == "sip:a@[fd00::5]:5061;transport=tls"


@pytest.mark.parametrize("alias", ["", "1.2.3.4", "1.2.3.4~5060", "1.2.3.4~0~1", "1.2.3.4~x~1",
                                   "1.2.3.4~5060~9", "name.example~5060~1", "1.2.3.4~99999~1"])
def test_malformed_alias_is_removed_and_ignored(alias: str) -> None:
    bye = invite(uri=f"sip:a@192.168.1.20;alias={alias};lr")
    assert pop_alias(bye) is None
    assert str(bye.uri) == "sip:a@192.168.1.20;lr"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdef.:[]~-xyz", max_size=40))
def test_alias_values_never_raise(value: str) -> None:
    try:
        bye = invite(uri=f"sip:a@192.168.1.20;alias={value}")
    except ValueError:
        return                                      # not a URI the parser accepts
    flow = pop_alias(bye)
    assert flow is None or 0 < flow.port < 65536


def test_response_detection() -> None:
    ok = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n"
               b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\n"
               b"CSeq: 1 INVITE\r\nContact: <sip:b@192.168.0.9:5060>\r\n"
               b"Content-Length: 0\r\n\r\n")
    assert isinstance(ok, Response)
    assert contact_behind_nat(ok, PUBLIC)
    assert not contact_behind_nat(ok, Address("UDP", "192.168.0.9", 5060))


def test_binding_flow() -> None:
    base = {"aor": "sip:a@x", "contact": "sip:a@192.168.1.2:5060", "expires": 1e12}
    assert binding_flow(Binding(**base, source="udp:203.0.113.7:40312")) is None
    assert binding_flow(Binding(**base, source="udp:203.0.113.7:40312", flow=True, socket=2)) \
        == Address("UDP", "203.0.113.7", 40312, 2)
    # TCP/TLS: always over the connection's peer; behind a Path: the Path decides.
    assert binding_flow(Binding(**base, source="tcp:[2001:db8::1]:61000")) \
        == Address("TCP", "2001:db8::1", 61000)
    assert binding_flow(Binding(**base, source="tcp:203.0.113.7:61000",
                                path=("<sip:edge;lr>",))) is None


class _Clock:
    """The Clock interface of the sans-IO layers (call_later/time), driven by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, object, tuple[object, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: object, *args: object) -> object:
        entry = (self.now + delay, callback, args)
        self.timers.append(entry)

        class _Handle:
            def cancel(_self) -> None:
                if entry in self.timers:
                    self.timers.remove(entry)
        return _Handle()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if t[0] <= end]
            if not due:
                break
            first = min(due, key=lambda t: t[0])
            self.timers.remove(first)
            self.now = first[0]
            first[1](*first[2])  # type: ignore[operator]
        self.now = end


class _Sent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []

    def send(self, data: bytes, dest: Address) -> None:
        self.sent.append((data, dest))


class _ProxyShape:
    """What NatKeeper uses of a Proxy: its clock, transport and local_for."""

    def __init__(self) -> None:
        self.clock = _Clock()
        self.transport = _Sent()
        self.nat_keeper = None

    def local_for(self, peer: Address) -> Address:
        return Address(peer.transport, "192.0.2.1", 5060, 1)


def _keyed(binding: Binding) -> tuple[str, list[Binding]]:
    return binding.aor, [binding]


def test_keeper_spreads_pings_and_removes_silent_flows() -> None:
    from fastsip.proxy.location import MemoryLocationStore
    from fastsip.proxy.nat import NatKeeper

    store = MemoryLocationStore()
    for n in range(90):
        store.update_now(*_keyed(Binding(aor=f"sip:u{n}@x", contact=f"sip:u{n}@10.0.0.{n % 250}:5060",
                          expires=1e12, source=f"udp:203.0.113.{n % 250}:{40000 + n}",
                          flow=True, socket=1)))
    # One that is not a flow is never pinged.
    store.update_now(*_keyed(Binding(aor="sip:plain@x", contact="sip:plain@198.51.100.1", expires=1e12,
                      source="udp:198.51.100.1:5060")))
    proxy = _ProxyShape()
    keeper = NatKeeper(store, lambda: 1000.0, interval=30, max_failures=2)
    keeper.attach(proxy)
    clock, wire = proxy.clock, proxy.transport

    def answer_all_but(silent: str) -> None:
        for data, _ in wire.sent:
            text = data.decode()
            if f"sip:{silent}@" in text.split("\r\n", 1)[0]:
                continue
            via = text.split("Via: ", 1)[1].split("\r\n", 1)[0]
            ok = parse(f"SIP/2.0 200 OK\r\nVia: {via}\r\nFrom: <sip:k@x>;tag=1\r\n"
                       f"To: <sip:u@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
                       "Content-Length: 0\r\n\r\n".encode())
            assert isinstance(ok, Response) and keeper.on_response(ok)
        wire.sent.clear()

    clock.advance(30.0)                     # the first slice of round 1
    assert len(wire.sent) == 3              # 90 flows / 30 slices
    clock.advance(29.0)
    assert keeper.sent == 90
    assert all(dest.connection == 1 for _, dest in wire.sent)   # from the flow's socket
    answer_all_but("u7")
    for _ in range(2):                      # rounds 2 and 3: u7 stays silent
        clock.advance(30.0)
        answer_all_but("u7")
    clock.advance(30.0)                     # round 4 starts: u7 missed 2 in a row
    assert keeper.removed == 1
    assert store.lookup_now("sip:u7@x", 0) == [] and len(store.lookup_now("sip:u8@x", 0)) == 1
    assert store.lookup_now("sip:plain@x", 0)
    # A response that is not an answer to a ping is not the keeper's.
    other = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKother\r\n"
                  b"From: <sip:k@x>;tag=1\r\nTo: <sip:u@x>;tag=2\r\nCall-ID: c\r\n"
                  b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(other, Response) and not keeper.on_response(other)
    keeper.stop()
    assert not clock.timers


def _behind_nat_by_built_uri(message: Request, peer: Address) -> bool:
    # contact_behind_nat's rule, read through the built URI (what the NAT rules did before
    # they scanned the Contact without building it): the reference the scan must agree with.
    contacts = message.contact
    if len(contacts) != 1 or contacts[0].wildcard:
        return False
    try:
        uri = contacts[0].uri
    except ValueError:
        return False
    if uri is None or uri.scheme not in ("sip", "sips") or uri.params.get("maddr"):
        return False
    if uri.host.strip("[]").lower() != peer.host.strip("[]").lower():
        return True
    return peer.transport == "UDP" and (uri.port or 5060) != peer.port


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["UDP", "TCP", "TLS"]),
       st.sampled_from(["192.168.1.20", "203.0.113.7", "EXAMPLE.com", "[2001:DB8::1]"]),
       st.sampled_from(["", ":5060", ":5061", ":40312", ":0"]),
       st.sampled_from([PUBLIC, Address("UDP", "203.0.113.7", 5060),
                        Address("UDP", "Example.COM", 5061), Address("UDP", "example.com", 5060),
                        Address("TCP", "203.0.113.7", 5999, 1),
                        Address("UDP", "2001:db8::1", 5060)]))
def test_request_sent_by_read_in_place_agrees(transport: str, host: str, port: str,
                                              peer: Address) -> None:
    # request_behind_nat compares the top Via's sent-by in place: it must say what the Via
    # view says (host without brackets and case, the port or the transport's default over
    # UDP), whether or not the view was read first.  (The Contact is public: only the Via
    # decides.)
    text = (f"INVITE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/{transport} {host}{port}"
            ";branch=z9hG4bKx\r\nMax-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\n"
            "To: <sip:b@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
            "Contact: <sip:a@198.51.100.1>\r\nContent-Length: 0\r\n\r\n").encode()
    fresh, read = parse(text), parse(text)
    assert isinstance(fresh, Request) and isinstance(read, Request)
    via = read.top_via
    assert via is not None
    expected = via.host.strip("[]").lower() != peer.host.strip("[]").lower() or (
        peer.transport == "UDP" and (via.port or DEFAULT_PORTS[via.transport]) != peer.port)
    assert request_behind_nat(fresh, peer) is expected
    assert request_behind_nat(read, peer) is expected


CONTACT_HOSTS = ["192.168.1.20", "203.0.113.7", "EXAMPLE.com", "[2001:DB8::1]", "10.0.0.1"]
CONTACT_TAILS = ["", ";maddr=203.0.113.9", ";MADDR=x", ";maddr=", ";maddr", ";m%61ddr=x",
                 ";maddr=x;maddr=", ";transport=udp;ob", ";;", "?h=v", ";lr;maddr=%41"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["sip", "sips", "tel", "SIP", "urn"]), st.sampled_from(CONTACT_HOSTS),
       st.sampled_from(["", ":5060", ":40312", ":0", ":5070"]), st.sampled_from(CONTACT_TAILS),
       st.sampled_from([PUBLIC, Address("UDP", "192.168.1.20", 5060),
                        Address("TCP", "203.0.113.7", 5999, 1),
                        Address("UDP", "2001:db8::1", 5060),
                        Address("UDP", "Example.COM", 5060)]))
def test_contact_read_without_building_the_uri_agrees(scheme: str, host: str, port: str,
                                                      tail: str, peer: Address) -> None:
    contact = f"<{scheme}:a@{host}{port}{tail}>" if scheme != "urn" else "<urn:x:y>"
    try:
        msg = invite(contact=contact)
    except ValueError:
        return                                      # not a message the parser accepts
    expected = _behind_nat_by_built_uri(msg, peer)
    fresh = invite(contact=contact)                 # no URI built yet: the scanning path
    assert contact_behind_nat(fresh, peer) is expected, contact
    assert contact_behind_nat(msg, peer) is expected, contact   # the built URI's path
