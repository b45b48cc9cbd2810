"""The routing API (fastsip.app) over the proxy core, sans-IO: default routing with an in-memory
location store and digest auth, user routes loaded from a file, async handlers with a bounded
concurrency (503), handler exceptions (500), failover through @on_failure."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import textwrap
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_proxy_net import Net, Phone, ProxyNode, Raw, raw_request

from fastsip.app import Request, Router, Routes, load_routes, on_failure, on_response, route
from fastsip.proxy import Credentials, DigestAuthenticator, MemoryLocationStore, Registrar
from fastsip.proxy.auth import digest_response
from fastsip.proxy.edge import TrustedNetworks
from fastsip.sip import Response

DOMAIN = "example.com"
#: The test network's callers (127.0.0.1) as a trusted PBX: for the tests of routing
#: mechanics (gateways, failover, hooks) that the relay policy would otherwise stop.
PBX = TrustedNetworks(["127.0.0.1"])


def register(up: Raw, user: str, contact_port: int, *, extra: str = "", cseq: int = 1,
             call_id: str = "reg") -> None:
    up.send_to(
        f"REGISTER sip:{DOMAIN} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{up.port};branch=z9hG4bKreg{cseq}{user}\n"
        "Max-Forwards: 70\n"
        f"From: <sip:{user}@{DOMAIN}>;tag=r{user}\n"
        f"To: <sip:{user}@{DOMAIN}>\n"
        f"Call-ID: {call_id}{user}\n"
        f"CSeq: {cseq} REGISTER\n"
        f"Contact: <sip:{user}@127.0.0.1:{contact_port}>\n"
        "Expires: 3600\n"
        f"{extra}"
        "Content-Length: 0\n\n")


class Tasks:
    """The ``spawn`` of a test: coroutines are kept and stepped by hand."""

    def __init__(self) -> None:
        self.pending: list[Coroutine[Any, Any, None]] = []

    def __call__(self, coro: Coroutine[Any, Any, None]) -> object:
        self.pending.append(coro)
        return None

    def run(self) -> None:
        """Step every task once (new tasks spawned meanwhile too); keep the unfinished."""
        still: list[Coroutine[Any, Any, None]] = []
        while self.pending:
            coro = self.pending.pop(0)
            try:
                coro.send(None)
            except StopIteration:
                continue
            still.append(coro)
        self.pending = still


class Gate:
    """An awaitable that stays pending until opened (a slow database)."""

    def __init__(self) -> None:
        self.open = False

    def __await__(self) -> Generator[None, None, None]:
        while not self.open:
            yield


def app(router: Router, **kw: Any) -> tuple[Net, ProxyNode, Raw]:
    net = Net()
    proxy = ProxyNode(net, router, **kw)
    up = Raw(net, "up", 5071)
    return net, proxy, up


def default_router(**kw: Any) -> Router:
    registrar = Registrar(MemoryLocationStore(), domains=[DOMAIN])
    return Router(registrar=registrar, wallclock=lambda: 1000.0, **kw)


# -- default routing ----------------------------------------------------------------------------


def test_default_register_then_call_reaches_contact_unknown_404() -> None:
    net, _proxy, up = app(default_router())
    bob = Phone(net, "bob", 5080)
    register(up, "bob", 5080)
    net.run(0.1)
    assert up.statuses() == [200]
    to = up.responses()[0].to
    assert to is not None and to.tag  # §8.2.6.2, added by the proxy core
    alice = Phone(net, "alice", 5070)
    call = alice.ua.invite(f"sip:bob@{DOMAIN}", body=b"v=0\r\n", proxy="sip:127.0.0.1:5060")
    net.run(1.0)
    assert call.status == 200 and bob.calls
    assert str(bob.calls[0].invite.uri) == "sip:bob@127.0.0.1:5080"
    nobody = alice.ua.invite(f"sip:nobody@{DOMAIN}", proxy="sip:127.0.0.1:5060")
    net.run(2.0)
    assert nobody.status == 404


def test_default_forks_over_all_bindings() -> None:
    net, _proxy, up = app(default_router())
    b1 = Phone(net, "b1", 5081, lambda c: c.ring())
    b2 = Phone(net, "b2", 5082, lambda c: c.ring())
    up.send_to(
        f"REGISTER sip:{DOMAIN} SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bKm\n"
        f"Max-Forwards: 70\nFrom: <sip:bob@{DOMAIN}>;tag=x\nTo: <sip:bob@{DOMAIN}>\n"
        "Call-ID: m\nCSeq: 1 REGISTER\n"
        "Contact: <sip:bob@127.0.0.1:5081>, <sip:bob@127.0.0.1:5082>\nContent-Length: 0\n\n")
    net.run(0.1)
    alice = Phone(net, "alice", 5070)
    alice.ua.invite(f"sip:bob@{DOMAIN}", proxy="sip:127.0.0.1:5060")
    net.run(0.5)
    assert b1.calls and b2.calls


def test_default_relay_policy_and_options() -> None:
    net, _proxy, up = app(default_router())
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    # Not from one of our users, not to our domain: not an open relay.
    up.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5090").replace(
        "From: <sip:alice@127.0.0.1:5071>", "From: <sip:alice@elsewhere.net>"))
    # A From that merely claims our domain proves nothing without authentication: refused.
    up.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5090").replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>"))
    # OPTIONS to us: 200 with Allow.
    up.send_to(raw_request("OPTIONS", f"sip:{DOMAIN}"))
    net.run(0.2)
    by_method = {(r.cseq.method if r.cseq else ""): r for r in up.responses()}
    assert sorted(up.statuses()) == [200, 403, 403]
    assert not down.requests()
    assert by_method["MESSAGE"].reason == "Relaying Forbidden"
    assert "INVITE" in (by_method["OPTIONS"].headers.get("Allow") or "")


def test_trusted_source_relays_and_handler_can_vouch() -> None:
    # A trusted source (a gateway, an SBC) may relay anywhere without authentication.
    net, _proxy, up = app(default_router(), trusted=TrustedNetworks(["127.0.0.1"]))
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    up.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5090"))
    net.run(0.2)
    assert up.statuses() == [200] and len(down.requests("MESSAGE")) == 1

    # A handler may vouch for a request the policy would stop (req.trusted = True) ...
    @route
    def vouch(req: Request) -> Any:
        req.trusted = req.request.headers.get("X-Key") == "sesame"
        return req.relay(to="sip:gw@127.0.0.1:5091")

    module = type(sys)("m")
    module.vouch = vouch  # type: ignore[attr-defined]
    net, _proxy, up = app(Router(Routes.from_module(module)))
    gw = Raw(net, "gw", 5091, auto=lambda r: r.reply(200, to_tag="g"))
    up.send_to(raw_request("MESSAGE", "sip:x@example.org", extra="X-Key: sesame\n"))
    # ... and without it, a gateway the handler chose is as off-limits as a foreign domain.
    up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.2)
    assert sorted(up.statuses()) == [200, 403]
    assert len(gw.requests("MESSAGE")) == 1
    assert gw.requests("MESSAGE")[0].headers.get("X-Key") == "sesame"


def test_open_relay() -> None:
    net, _proxy, up = app(default_router(open_relay=True))
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    up.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5090").replace(
        "From: <sip:alice@127.0.0.1:5071>", "From: <sip:alice@elsewhere.net>"))
    net.run(0.2)
    assert up.statuses() == [200] and down.requests("MESSAGE")


def authorization(challenge: Response, user: str, password: str, method: str, uri: str,
                  header: str) -> str:
    value = challenge.headers.getall(header)[-1]  # the MD5 one
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', value))
    realm, nonce = params["realm"], params["nonce"]
    algorithm = params.get("algorithm", "MD5")
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    resp = digest_response(algorithm, ha1, nonce, method, uri, qop="auth", nc="00000001",
                           cnonce="abc")
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm={algorithm}, qop=auth, nc=00000001, cnonce="abc", '
            f'opaque="{params["opaque"]}"')


def test_default_register_with_digest_auth_and_invite_from_our_user_challenged() -> None:
    creds = Credentials()
    creds.add("bob", password="secret")
    auth = DigestAuthenticator(DOMAIN, creds, algorithms=("MD5",))
    net, _proxy, up = app(default_router(authenticator=auth))
    register(up, "bob", 5080)
    net.run(0.1)
    (challenge,) = up.responses()
    assert challenge.status_code == 401
    value = authorization(challenge, "bob", "secret", "REGISTER", f"sip:{DOMAIN}",
                          "WWW-Authenticate")
    register(up, "bob", 5080, cseq=2, extra=f"Authorization: {value}\n")
    net.run(0.2)
    assert up.statuses() == [401, 200]
    # An INVITE from our domain without credentials: 407.
    up.send_to(raw_request("INVITE", f"sip:bob@{DOMAIN}").replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:bob@{DOMAIN}>"))
    net.run(0.3)
    assert up.statuses()[-1] == 407


# -- user routes --------------------------------------------------------------------------------


def test_load_routes_from_file_relay_to_gateway_keeps_user(tmp_path: Path) -> None:
    path = tmp_path / "routes.py"
    path.write_text(textwrap.dedent("""
        from fastsip.app import route

        @route
        def initial(req):
            if req.uri.user and req.uri.user.startswith("+44"):
                return req.relay(to="sip:127.0.0.1:5090")
            if req.uri.user == "busy":
                return req.reply(486, headers=[("X-Why", "test")])
            if req.uri.user == "moved":
                return req.redirect(["sip:a@192.0.2.1", "sip:b@192.0.2.2"])
            return None
    """))
    routes = load_routes(path)
    assert routes.request is not None and routes.failure is None
    net, _proxy, up = app(Router(routes, trusted=PBX, registrar=Registrar(MemoryLocationStore(),
                                                            domains=[DOMAIN])))
    gw = Raw(net, "gw", 5090, auto=lambda r: r.reply(200, to_tag="g"))
    up.send_to(raw_request("MESSAGE", f"sip:+442071234567@{DOMAIN}"))
    up.send_to(raw_request("MESSAGE", f"sip:busy@{DOMAIN}"))
    up.send_to(raw_request("MESSAGE", f"sip:moved@{DOMAIN}"))
    up.send_to(raw_request("MESSAGE", f"sip:nobody@{DOMAIN}"))  # None: default routing
    net.run(0.2)
    assert str(gw.requests("MESSAGE")[0].uri) == "sip:+442071234567@127.0.0.1:5090"
    by_status = {r.status_code: r for r in up.responses()}
    assert sorted(by_status) == [200, 302, 404, 486]
    assert by_status[486].headers.get("X-Why") == "test"
    assert len(by_status[302].headers.getall("Contact")) == 2


def test_handler_exception_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def initial(req: Request) -> Any:
        calls.append(req.method)
        if len(calls) == 1:
            raise RuntimeError("database down")
        return req.reply(488)

    net, _proxy, up = app(Router(Routes(initial)))
    with caplog.at_level(logging.ERROR, logger="fastsip.app"):
        up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
        up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
        net.run(0.1)
    assert up.statuses() == [500, 488]
    assert any("database down" in (r.exc_text or "") for r in caplog.records)


def test_bad_return_value_is_500() -> None:
    net, _proxy, up = app(Router(Routes(lambda req: 42)))
    up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.1)
    assert up.statuses() == [500]


def test_async_handler_runs_as_task() -> None:
    gate = Gate()
    tasks = Tasks()

    async def initial(req: Request) -> Any:
        await gate
        return req.relay(to="sip:bob@127.0.0.1:5090")

    router = Router(Routes(initial), spawn=tasks, trusted=PBX)
    net, _proxy, up = app(router)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    up.send_to(raw_request("INVITE", "sip:bob@example.org"))
    net.run(0.1)
    tasks.run()
    assert up.statuses() == [100]   # §16.2: the 100 went out while the handler waits
    assert router.running == 1
    gate.open = True
    tasks.run()
    net.run(0.2)
    assert down.requests("INVITE")
    assert up.statuses()[-1] == 200
    assert router.running == 0


def test_overload_503_retry_after_and_per_source_fairness() -> None:
    gate = Gate()
    tasks = Tasks()

    async def initial(req: Request) -> Any:
        await gate
        return req.reply(200)

    router = Router(Routes(initial), spawn=tasks, max_concurrency=4, max_per_source=2,
                    retry_after=7)
    net, _proxy, up = app(router)
    other = Raw(net, "other", 5072)
    other.host = "127.0.0.2"  # a different source host
    net.nodes[("127.0.0.2", 5072)] = other
    for _ in range(3):
        up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.1)
    tasks.run()
    # The flooding source got 2 slots and a 503 for the third.
    assert up.statuses() == [503]
    assert up.responses()[0].headers.get("Retry-After") == "7"
    # Another source still gets in.
    other.send_to(raw_request("MESSAGE", "sip:x@example.org").replace(
        "127.0.0.1:5071", "127.0.0.2:5072"))
    net.run(0.2)
    tasks.run()
    assert router.running == 3
    gate.open = True
    tasks.run()
    net.run(0.3)
    assert sorted(up.statuses()) == [200, 200, 503]
    assert other.statuses() == [200]


def test_async_handler_exception_is_500() -> None:
    tasks = Tasks()

    async def initial(req: Request) -> Any:
        raise ValueError("nope")

    net, _proxy, up = app(Router(Routes(initial), spawn=tasks))
    up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.1)
    tasks.run()
    net.run(0.2)
    assert up.statuses() == [500]


def test_async_without_spawn_is_500() -> None:
    async def initial(req: Request) -> Any:
        return req.reply(200)

    net, _proxy, up = app(Router(Routes(initial)))
    up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.1)
    assert up.statuses() == [500]


def test_cancel_while_async_handler_decides() -> None:
    gate = Gate()
    tasks = Tasks()

    async def initial(req: Request) -> Any:
        await gate
        return req.relay(to="sip:bob@127.0.0.1:5090")

    net, _proxy, up = app(Router(Routes(initial), spawn=tasks))
    down = Raw(net, "down", 5090)
    up.send_to(raw_request("INVITE", "sip:bob@example.org", branch="z9hG4bKcc", call_id="cc"))
    net.run(0.1)
    tasks.run()
    up.send_to(raw_request("CANCEL", "sip:bob@example.org", branch="z9hG4bKcc", call_id="cc"))
    net.run(0.2)
    gate.open = True
    tasks.run()
    net.run(0.3)
    assert sorted(up.statuses()) == [100, 200, 487]
    assert down.requests("INVITE") == []


def test_failover_and_serial_fork_via_hooks() -> None:
    seen: list[int] = []

    @route
    def initial(req: Request) -> Any:
        return req.fork(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"], parallel=False)

    @on_failure
    def failover(req: Request, response: Response) -> Any:
        seen.append(response.status_code)
        if len(req.failures) == 1:
            return req.relay(to="sip:gw@127.0.0.1:5083")
        return None

    routes = Routes(initial, failure=failover)
    net, _proxy, up = app(Router(routes, trusted=PBX))
    b1 = Raw(net, "b1", 5081, auto=lambda r: r.reply(480, to_tag="1"))
    b2 = Raw(net, "b2", 5082, auto=lambda r: r.reply(486, to_tag="2"))
    gw = Raw(net, "gw", 5083, auto=lambda r: r.reply(503, to_tag="3"))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.org"))
    net.run(0.5)
    assert [len(n.requests("MESSAGE")) for n in (b1, b2, gw)] == [1, 1, 1]
    # serial: b1 then b2, then the hook (best: 480, same class as 486, first kept) -> gateway
    # -> its 503 -> the hook declines -> the best of the whole context (480, not the 503).
    assert seen == [480, 480]
    assert up.statuses() == [480]


def test_async_failure_hook() -> None:
    tasks = Tasks()

    async def failover(req: Request, response: Response) -> Any:
        return req.relay(to="sip:gw@127.0.0.1:5083")

    routes = Routes(lambda req: req.relay(to="sip:b1@127.0.0.1:5081"), failure=failover)
    net, _proxy, up = app(Router(routes, spawn=tasks, trusted=PBX))
    Raw(net, "b1", 5081, auto=lambda r: r.reply(486, to_tag="1"))
    gw = Raw(net, "gw", 5083, auto=lambda r: r.reply(200, to_tag="3"))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.org"))
    net.run(0.1)
    tasks.run()
    net.run(0.2)
    assert gw.requests("MESSAGE") and up.statuses() == [200]


def test_response_hook_and_in_dialog_opt_in() -> None:
    seen: list[int] = []
    methods: list[str] = []

    @route(in_dialog=True)
    def initial(req: Request) -> Any:
        methods.append(req.method)
        return req.relay(to="sip:bob@127.0.0.1:5090") if not req.in_dialog else req.relay()

    @on_response
    def watch(req: Request, response: Response) -> None:
        seen.append(response.status_code)
        response.add_header("X-Seen", "1")

    module = type(sys)("m")
    module.initial = initial  # type: ignore[attr-defined]
    module.watch = watch  # type: ignore[attr-defined]
    routes = Routes.from_module(module)
    assert routes.in_dialog
    net, _proxy, up = app(Router(routes, trusted=PBX))
    Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.org"))
    up.send_to(raw_request("BYE", "sip:bob@127.0.0.1:5090", to_tag="t"))
    net.run(0.2)
    assert methods == ["MESSAGE", "BYE"]
    assert seen == [200, 200]
    assert up.responses()[0].headers.get("X-Seen") == "1"


def test_async_response_hook_refused() -> None:
    with pytest.raises(TypeError):
        @on_response
        async def bad(req: Request, response: Response) -> None:
            pass


def test_two_route_handlers_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.py"
    path.write_text("from fastsip.app import route\n"
                    "@route\ndef a(req): return None\n@route\ndef b(req): return None\n")
    with pytest.raises(ValueError, match="more than one"):
        load_routes(path)


def test_hung_async_handler_times_out_with_500() -> None:
    tasks = Tasks()
    gate = Gate()

    async def initial(req: Request) -> Any:
        await gate
        return req.reply(200)

    router = Router(Routes(initial), spawn=tasks, handler_timeout=10.0)
    net, _, up = app(router)
    up.send_to(raw_request("MESSAGE", "sip:x@example.org"))
    net.run(0.1)
    tasks.run()
    net.run(9.0)
    assert up.statuses() == []
    net.run(11.0)
    assert up.statuses() == [500]
    assert router.running == 1          # still holds its slot until it really ends
    gate.open = True
    tasks.run()
    net.run(12.0)
    assert up.statuses() == [500] and router.running == 0


# -- a location store that waits (a database across the network) --------------------------------


class GatedStore(MemoryLocationStore):
    """The in-memory store behind a gate: every operation waits until the gate opens, as one
    across the network waits for its round trip."""

    immediate_reads = False
    immediate_writes = False

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def lookup(self, aor: str, now: float) -> list[Any]:
        await self.gate
        return self.lookup_now(aor, now)

    async def update(self, aor: str, put: Any = (), remove: Any = ()) -> None:
        await self.gate
        self.update_now(aor, put, remove)


def test_a_store_that_waits_is_awaited_in_tasks_by_plain_handlers() -> None:
    """``req.register()`` and ``req.relay()`` in plain handlers over a store that waits: the
    answer goes out only once the store has answered (the 200 after the write), the waits
    run as tasks under the concurrency bound, and a request beyond it gets 503 at once."""
    gate, tasks = Gate(), Tasks()
    seen: list[str] = []

    def initial(req: Request) -> Any:
        seen.append(req.method)
        return None                 # the default routing: register(), relay() to our user

    registrar = Registrar(GatedStore(gate), domains=[DOMAIN])
    router = Router(Routes(initial), registrar=registrar, spawn=tasks, max_concurrency=1,
                    wallclock=lambda: 1000.0)
    net, _proxy, up = app(router)
    bob = Phone(net, "bob", 5080)
    register(up, "bob", 5080)
    net.run(0.1)
    tasks.run()
    assert up.statuses() == [] and router.running == 1     # the write has not landed
    register(up, "carol", 5081)                            # beyond max_concurrency=1
    net.run(0.1)
    assert up.statuses() == [503]
    gate.open = True
    tasks.run()
    net.run(0.1)
    assert up.statuses() == [503, 200] and router.running == 0
    gate.open = False
    alice = Phone(net, "alice", 5070)
    call = alice.ua.invite(f"sip:bob@{DOMAIN}", proxy="sip:127.0.0.1:5060")
    net.run(0.1)
    tasks.run()
    assert not bob.calls and router.running == 1           # the lookup waits
    gate.open = True
    tasks.run()
    net.run(1.0)
    assert call.status == 200 and str(bob.calls[0].invite.uri) == "sip:bob@127.0.0.1:5080"
    assert seen == ["REGISTER", "REGISTER", "INVITE"]


def test_a_store_that_waits_without_spawn_is_500(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    registrar = Registrar(GatedStore(gate), domains=[DOMAIN])
    net, _proxy, up = app(Router(registrar=registrar, wallclock=lambda: 1000.0))
    with caplog.at_level(logging.ERROR, logger="fastsip.app"):
        register(up, "bob", 5080)
        net.run(0.1)
    assert up.statuses() == [500]
    assert any("spawn" in r.getMessage() for r in caplog.records)
