"""The registrar (RFC 3261 §10.3, RFC 3327 Path) against real REGISTER messages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fastsip import Request, Response, parse
from fastsip.asyncio.stores import SqliteLocationStore
from fastsip.proxy.location import Binding, MemoryLocationStore, run_immediately
from fastsip.proxy.registrar import Registrar
from fastsip.transport import Address

RFC4475 = Path(__file__).parent / "data" / "rfc4475"
SOURCE = Address("UDP", "198.51.100.7", 40000)
T0 = 1_700_000_000.0
AOR = "sip:bob@example.com"


def register(
    *contacts: str,
    expires: int | str | None = None,
    call_id: str = "reg-1@192.168.1.2",
    cseq: int = 1,
    to: str = "<sip:bob@example.com>",
    ruri: str = "sip:example.com",
    extra: tuple[str, ...] = (),
) -> Request:
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.168.1.2:5060;branch=z9hG4bK-reg;rport",
        "Max-Forwards: 70",
        f"To: {to}",
        "From: <sip:bob@example.com>;tag=a73kszlfl",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {c}" for c in contacts),
        *([] if expires is None else [f"Expires: {expires}"]),
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    msg = parse("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def handle(registrar: Registrar, request: Request, source: Address, now: float,
           **kwargs: Any) -> Response:
    """The registrar over the in-memory store never waits: run it in place."""
    return run_immediately(registrar.handle(request, source, now, **kwargs))


def lookup(registrar: Registrar, aor: str, now: float) -> list[Binding]:
    return run_immediately(registrar.lookup(aor, now))


def contacts_of(response: Response) -> dict[str, str]:
    """Contact URI -> its parameters, from a 200 to REGISTER."""
    out = {}
    for c in response.contact:
        assert c.uri is not None
        out[str(c.uri)] = ";".join(f"{k}={v}" for k, v in c.params.items())
    return out


@pytest.fixture
def registrar() -> Registrar:
    return Registrar(MemoryLocationStore(), domains=["example.com"])


def test_lifecycle_add_refresh_expire_purge(registrar: Registrar) -> None:
    r = handle(registrar, register("<sip:bob@192.168.1.2:5060>", expires=600), SOURCE, T0)
    assert r.status_code == 200
    assert contacts_of(r) == {"sip:bob@192.168.1.2:5060": "expires=600"}
    assert r.headers.get("Date") == "Tue, 14 Nov 2023 22:13:20 GMT"
    (b,) = lookup(registrar, "sip:bob@EXAMPLE.com:5060", T0)
    assert b.source == "udp:198.51.100.7:40000" and b.cseq == 1 and b.registered_at == T0
    # A refresh from the same Call-ID with a higher CSeq extends the binding.
    r = handle(registrar, register("<sip:bob@192.168.1.2:5060>", cseq=2), SOURCE, T0 + 500)
    assert contacts_of(r) == {"sip:bob@192.168.1.2:5060": "expires=3600"}
    assert registrar.store.lookup_now(AOR, T0 + 500 + 3599)
    assert registrar.store.lookup_now(AOR, T0 + 500 + 3600) == []
    assert registrar.store.purge_now(T0 + 500 + 3600) == 1
    # A fetch (no Contact) after expiry lists nothing.
    r = handle(registrar, register(cseq=3), SOURCE, T0 + 5000)
    assert r.status_code == 200 and r.contact == []


def test_multiple_contacts_q_ordering_and_fetch(registrar: Registrar) -> None:
    req = register(
        "<sip:bob@10.0.0.1>;q=0.5, <sip:bob@10.0.0.2>;q=1.0;expires=120",
        "<sip:bob@10.0.0.3>;q=0.8",
        expires=300,
    )
    r = handle(registrar, req, SOURCE, T0)
    assert r.status_code == 200
    assert contacts_of(r) == {
        "sip:bob@10.0.0.2": "expires=120",
        "sip:bob@10.0.0.3": "expires=300;q=0.8",
        "sip:bob@10.0.0.1": "expires=300;q=0.5",
    }
    assert [b.contact for b in lookup(registrar, AOR, T0)] == [
        "sip:bob@10.0.0.2",
        "sip:bob@10.0.0.3",
        "sip:bob@10.0.0.1",
    ]
    # Another UA (another Call-ID) fetches: it sees all three, with the time left.
    r = handle(registrar, register(call_id="other"), SOURCE, T0 + 100)
    assert list(contacts_of(r).values()) == ["expires=20", "expires=200;q=0.8", "expires=200;q=0.5"]


def test_default_and_max_expires() -> None:
    reg = Registrar(MemoryLocationStore(), max_expires=7200, default_expires=3600)
    r = handle(reg, register("<sip:bob@a>"), SOURCE, T0)
    assert contacts_of(r) == {"sip:bob@a": "expires=3600"}
    r = handle(reg, register("<sip:bob@a>", expires=2**32 + 5, cseq=2), SOURCE, T0)
    assert contacts_of(r) == {"sip:bob@a": "expires=7200"}


def test_interval_too_brief_423(registrar: Registrar) -> None:
    r = handle(registrar, register("<sip:bob@a>;expires=30", "<sip:bob@b>"), SOURCE, T0)
    assert r.status_code == 423 and r.headers.get("Min-Expires") == "60"
    # The whole request failed: not even the valid contact was bound.
    assert lookup(registrar, AOR, T0) == []
    # Exactly the minimum is fine; 0 is a removal, not "too brief".
    assert handle(registrar, register("<sip:bob@a>", expires=60), SOURCE, T0).status_code == 200
    r = handle(registrar, register("<sip:bob@a>", expires=0, cseq=2), SOURCE, T0)
    assert r.status_code == 200 and r.contact == []


def test_remove_one_and_wildcard(registrar: Registrar) -> None:
    handle(registrar, register("<sip:bob@a>", "<sip:bob@b>", "<sip:bob@c>"), SOURCE, T0)
    r = handle(registrar, register("<sip:bob@b>;expires=0", cseq=2), SOURCE, T0 + 1)
    assert set(contacts_of(r)) == {"sip:bob@a", "sip:bob@c"}
    # A binding made by another UA (other Call-ID) is removed by "*" regardless of CSeq.
    handle(registrar, register("<sip:bob@d>", call_id="ua2", cseq=99), SOURCE, T0 + 2)
    r = handle(registrar, register("*", expires=0, cseq=3), SOURCE, T0 + 3)
    assert r.status_code == 200 and r.contact == []
    assert registrar.store.aors_now() == []


@pytest.mark.parametrize(
    ("contacts", "expires"),
    [(("*",), None), (("*",), 3600), (("*", "<sip:bob@a>"), 0), (("*, <sip:bob@a>",), 0)],
)
def test_wildcard_misuse_400(
    registrar: Registrar, contacts: tuple[str, ...], expires: int | None
) -> None:
    r = handle(registrar, register(*contacts, expires=expires), SOURCE, T0)
    assert r.status_code == 400


def test_call_id_cseq_ordering(registrar: Registrar) -> None:
    assert handle(registrar, register("<sip:bob@a>", cseq=5), SOURCE, T0).status_code == 200
    # Same Call-ID, CSeq not higher: out of order, rejected, binding untouched.
    for cseq in (5, 4):
        r = handle(registrar, register("<sip:bob@a>", expires=0, cseq=cseq), SOURCE, T0 + 1)
        assert r.status_code == 400
        assert len(lookup(registrar, AOR, T0 + 1)) == 1
    r = handle(registrar, register("*", expires=0, cseq=5), SOURCE, T0 + 1)
    assert r.status_code == 400
    # A different Call-ID may carry any CSeq.
    r = handle(registrar, register("<sip:bob@a>", expires=0, call_id="new", cseq=1), SOURCE, T0 + 2)
    assert r.status_code == 200 and r.contact == []


def test_path_stored_and_echoed_only_with_supported_path(registrar: Registrar) -> None:
    path = ("Path: <sip:edge2.example.net;lr>", "Path: <sip:edge1.example.net;lr>")
    r = handle(registrar, 
        register("<sip:bob@a>", extra=(*path, "Supported: gruu, path")), SOURCE, T0
    )
    assert r.headers.getall("Path") == ["<sip:edge2.example.net;lr>", "<sip:edge1.example.net;lr>"]
    (b,) = lookup(registrar, AOR, T0)
    assert b.path == ("<sip:edge2.example.net;lr>", "<sip:edge1.example.net;lr>")
    r = handle(registrar, register("<sip:bob@b>", extra=path, cseq=2), SOURCE, T0)
    assert r.status_code == 200 and r.headers.getall("Path") == []


def test_nat_source_instance_and_user_agent(registrar: Registrar) -> None:
    nat = Address("TCP", "203.0.113.9", 61000, connection=17)
    req = register(
        '<sip:bob@192.168.1.2:5060;transport=tcp;ob>;+sip.instance="<urn:uuid:f81d4fae>"',
        extra=("User-Agent: phone/2.1",),
    )
    r = handle(registrar, req, nat, T0)
    assert r.contact[0].params["+sip.instance"] == "<urn:uuid:f81d4fae>"
    (b,) = lookup(registrar, AOR, T0)
    assert b.source == "tcp:203.0.113.9:61000"
    assert b.instance == "<urn:uuid:f81d4fae>" and b.user_agent == "phone/2.1"


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"ruri": "sip:other.org"}, 403),
        ({"ruri": "tel:+123"}, 416),
        ({"to": "<sip:bob@other.org>"}, 404),
        ({"extra": ("Require: foo, path",)}, 420),
        ({"extra": ("Proxy-Require: bar",)}, 420),
        ({"expires": "soon"}, 400),
    ],
)
def test_rejections(registrar: Registrar, kwargs: dict[str, object], status: int) -> None:
    r = handle(registrar, register("<sip:bob@a>", **kwargs), SOURCE, T0)  # type: ignore[arg-type]
    assert r.status_code == status
    assert registrar.store.aors_now() == []
    if status == 420:
        assert r.headers.get("Unsupported") in ("foo", "bar")


def test_bad_contact_params_400(registrar: Registrar) -> None:
    for contact in ("<sip:bob@a>;expires=abc", "<sip:bob@a>;q=2", "<sip:bob@a>;q=x"):
        assert handle(registrar, register(contact), SOURCE, T0).status_code == 400


def test_authenticated_user_may_only_register_own_aor(registrar: Registrar) -> None:
    assert handle(registrar, register("<sip:bob@a>"), SOURCE, T0, user="alice").status_code == 403
    assert handle(registrar, register("<sip:bob@a>"), SOURCE, T0, user="bob").status_code == 200


def test_any_domain_when_none_configured() -> None:
    reg = Registrar(MemoryLocationStore())
    req = register("<sip:u@a>", ruri="sip:192.0.2.1:5060", to="<sip:u@192.0.2.1>")
    assert handle(reg, req, SOURCE, T0).status_code == 200
    assert reg.store.aors_now() == ["sip:u@192.0.2.1"]


def test_rfc4475_unknown_scheme_aor_is_400(registrar: Registrar) -> None:
    msg = parse((RFC4475 / "unksm2.dat").read_bytes())
    assert isinstance(msg, Request)
    assert handle(registrar, msg, SOURCE, T0).status_code == 400


def test_rfc4475_escaped_header_contact_is_kept(registrar: Registrar) -> None:
    msg = parse((RFC4475 / "regescrt.dat").read_bytes())
    assert isinstance(msg, Request)
    r = handle(registrar, msg, SOURCE, T0)
    assert r.status_code == 200
    (b,) = lookup(registrar, "sip:user@example.com", T0)
    assert b.contact == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
    assert r.contact[0].uri is not None and r.contact[0].uri.headers == {
        "Route": "<sip:sip.example.com>"
    }


def test_sqlite_registrar_bindings_survive_restart(tmp_path: Path) -> None:
    db = tmp_path / "loc.db"

    async def main() -> None:
        reg = Registrar(SqliteLocationStore(db))
        r = await reg.handle(register("<sip:bob@a>;q=0.3", "<sip:bob@b>", expires=600), SOURCE,
                             T0)
        assert r.status_code == 200 and len(r.contact) == 2
        await reg.store.close()
        reg = Registrar(SqliteLocationStore(db))
        assert [b.contact for b in await reg.lookup(AOR, T0 + 10)] == ["sip:bob@b", "sip:bob@a"]
        # Ordering state survived too: the old CSeq is still refused.
        r = await reg.handle(register("<sip:bob@a>", cseq=1), SOURCE, T0 + 10)
        assert r.status_code == 400
        await reg.store.close()

    asyncio.run(main())


def test_store_failure_is_500_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteLocationStore(tmp_path / "loc.db")
        reg = Registrar(store)
        await store.close()
        r = await reg.handle(register("<sip:bob@a>"), SOURCE, T0)
        assert r.status_code == 500 and r.headers.get("Retry-After") == "5"

    asyncio.run(main())


def test_rfc4475_regbadct_contact_without_brackets_is_rejected() -> None:
    # RFC 4475 3.1.2.13: an addr-spec Contact carrying escaped headers must be in < >.
    data = (Path(__file__).parent / "data" / "rfc4475" / "regbadct.dat").read_bytes()
    request = parse(data)
    assert isinstance(request, Request)
    registrar = Registrar(MemoryLocationStore(), domains=["example.com"])
    response = handle(registrar, request, Address("UDP", "135.180.130.133", 5060), 1000.0)
    assert response.status_code == 400 and "< >" in response.reason
    assert lookup(registrar, "sip:user@example.com", 1000.0) == []


@pytest.mark.parametrize(("contact", "why"), [
    ("<sip:bob@example.com;;;>", "invalid Contact URI"),
    ("<sips:bob@example.com;transport=udp>", "cannot be reached"),
    ("<tel:+15551234567>", "scheme 'tel'"),
    ("<sip:bob@example.com:0>", "port 0"),
    ("<sip:bob@example..com>", "not a valid name"),
    ("<sip:bob@192.0.2.1:5060;transport=foo>", "transport 'foo'"),
])
def test_contacts_the_proxy_could_never_reach_are_refused(contact: str, why: str) -> None:
    # Stored, such a binding would turn every later call to the AOR into a 400 or a timeout.
    registrar = Registrar(MemoryLocationStore(), domains=["example.com"])
    request = parse((
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        "From: <sip:bob@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\n"
        f"CSeq: 1 REGISTER\r\nContact: {contact}\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(request, Request)
    response = handle(registrar, request, Address("UDP", "192.0.2.1", 5060), 1000.0)
    assert response.status_code == 400 and why in response.reason, response.reason
    assert len(response.reason) <= 120
    assert lookup(registrar, "sip:bob@example.com", 1000.0) == []


def test_lookup_now_reads_the_memory_store_in_place_and_defers_to_any_other_lookup(
        registrar: Registrar) -> None:
    handle(registrar, register("<sip:bob@192.168.1.2:5060>", expires=600), SOURCE, T0)
    now = registrar.lookup_now("sip:bob@EXAMPLE.com", T0)
    assert now is not None and now == lookup(registrar, AOR, T0)
    assert registrar.lookup_now(AOR, T0 + 600) == []

    class OwnLookup(MemoryLocationStore):
        """A store built over the memory one, with its own lookup: never bypassed."""

        async def lookup(self, aor: str, now: float) -> list[Binding]:
            return []

    assert Registrar(OwnLookup()).lookup_now(AOR, T0) is None
    # The router reads memory_store: it follows the store a registrar is given later.
    assert registrar.memory_store is registrar.store
    registrar.store = OwnLookup()
    assert registrar.memory_store is None and registrar.lookup_now(AOR, T0) is None
