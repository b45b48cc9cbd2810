"""Call forwarding in plain Python: examples/forward_*.py and examples/redirect.py, as
decisions (the real Router over a recording context, as tests/test_examples.py does) and end
to end -- ``fastsip serve`` running the example (its targets pointed at sipp processes on
loopback), a sipp caller, and sipp callees that are busy, ring forever or must never ring."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastsip.sip import Response

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    finish,
    header_values,
    register,
    request,
    run_uac,
    sip_exchange,
    sipp,
    start_uas,
    stop,
    successful,
)
from test_examples import EXAMPLES, STRANGER, decide, router_for, sip
from test_examples import register as register_binding

TARGET = "sip:+447700900123@gw.example.net"    # the forward target in the examples


@pytest.mark.parametrize("example", ["forward_unconditional.py", "forward_busy.py",
                                     "forward_noanswer.py", "forward_voicemail.py",
                                     "redirect.py"])
def test_examples_load_and_say_how_to_run(example: str) -> None:
    from fastsip.app import load_routes

    assert load_routes(EXAMPLES / example).request is not None
    assert "fastsip serve" in (EXAMPLES / example).read_text(encoding="utf-8")


# -- decisions ---------------------------------------------------------------------------------


def test_unconditional_never_looks_up_the_user() -> None:
    router = router_for("forward_unconditional.py")
    register_binding(router, "bob", "sip:bob@203.0.113.5:5062")
    ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}"), STRANGER)
    assert ctx.uris() == [TARGET]
    ctx = decide(router, sip("INVITE", f"sip:carol@{DOMAIN}", n=2), STRANGER)
    assert ctx.responses == [404]            # not forwarded: the default routing


def test_busy_forwards_486_only_once() -> None:
    router = router_for("forward_busy.py")
    register_binding(router, "bob", "sip:bob@203.0.113.5:5062")
    ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}"), STRANGER)
    assert ctx.uris() == ["sip:bob@203.0.113.5:5062"]
    assert router.on_failure(ctx, Response.create(486)) is True  # type: ignore[arg-type]
    assert ctx.uris() == [TARGET]
    router.on_failure(ctx, Response.create(486))  # type: ignore[arg-type]
    assert len(ctx.forwarded) == 2           # the target's own 486 goes back
    for n, status in enumerate((480, 404, 503), start=2):
        ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}", n=n), STRANGER)
        router.on_failure(ctx, Response.create(status))  # type: ignore[arg-type]
        assert len(ctx.forwarded) == 1, status


def test_no_answer_forwards_408_and_480_not_486() -> None:
    router = router_for("forward_noanswer.py")
    register_binding(router, "bob", "sip:bob@203.0.113.5:5062")
    for n, status in enumerate((408, 480), start=1):
        ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}", n=n), STRANGER)
        router.on_failure(ctx, Response.create(status))  # type: ignore[arg-type]
        assert ctx.uris() == [TARGET], status
    ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}", n=3), STRANGER)
    router.on_failure(ctx, Response.create(486))  # type: ignore[arg-type]
    assert len(ctx.forwarded) == 1


def run_async_example(example: str, *steps: Any) -> Any:
    """The async examples need a loop for their handlers (Router(spawn=...))."""
    async def main() -> Any:
        router = router_for(example)
        router.spawn = asyncio.get_running_loop().create_task
        results = []
        for step in steps:
            results.append(step(router))
            for _ in range(5):
                await asyncio.sleep(0)
        return results
    return asyncio.run(main())


def registering(user: str) -> Any:
    """A step registering ``user`` (through the example's async handler, which leaves
    REGISTER to the default routing)."""
    def step(router: Any) -> Any:
        return decide(router, sip("REGISTER", f"sip:{DOMAIN}", from_user=user,
                                  to=f"sip:{user}@{DOMAIN}", n=90,
                                  headers=[f"Contact: <sip:{user}@203.0.113.6:5062>",
                                           "Expires: 3600"]))
    return step


def test_voicemail_for_offline_users_and_every_failure() -> None:
    def offline(router: Any) -> Any:
        return decide(router, sip("INVITE", f"sip:bob@{DOMAIN}"), STRANGER)

    def online(router: Any) -> Any:
        return decide(router, sip("INVITE", f"sip:carol@{DOMAIN}", n=2), STRANGER)

    ctx_off, reg, ctx_on = run_async_example("forward_voicemail.py", offline,
                                             registering("carol"), online)
    assert reg.responses == [200]
    assert ctx_off.uris() == ["sip:bob@voicemail.example.net"]
    assert ctx_on.uris() == ["sip:carol@203.0.113.6:5062"]
    # Busy, unanswered, rejected: the mailbox; the mailbox failing too: as it is.
    def failing(status: int) -> Any:
        def step(router: Any) -> Any:
            ctx = decide(router, sip("INVITE", f"sip:carol@{DOMAIN}", n=status), STRANGER)
            return ctx, router
        return step

    steps = [registering("carol")] + [failing(s) for s in (486, 408, 480, 503)]
    _, *calls = run_async_example("forward_voicemail.py", *steps)
    for ctx, router in calls:
        router.on_failure(ctx, Response.create(486))
        assert ctx.uris() == ["sip:carol@voicemail.example.net"]
        router.on_failure(ctx, Response.create(500))
        assert len(ctx.forwarded) == 2


def test_redirect_answers_302_and_never_forwards() -> None:
    def moved(router: Any) -> Any:
        return decide(router, sip("INVITE", f"sip:carol@{DOMAIN}"), STRANGER)

    def registered(router: Any) -> Any:
        return decide(router, sip("INVITE", f"sip:bob@{DOMAIN}", n=2), STRANGER)

    def unknown(router: Any) -> Any:
        return decide(router, sip("INVITE", f"sip:dave@{DOMAIN}", n=3), STRANGER)

    for ctx, status in zip(run_async_example("redirect.py", moved, registering("bob"),
                                             registered, unknown), (302, 200, 302, 404)):
        assert ctx.responses == [status] and not ctx.forwarded, status


# -- end to end -----------------------------------------------------------------------------------

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp (sip-tester) is not installed")


def _write(tmp_path: Path, example: str, text: str) -> Path:
    path = tmp_path / example
    path.write_text(text, encoding="utf-8")     # Python source (Windows' default is cp1252)
    return path


def pointed(tmp_path: Path, example: str, pairs: list[tuple[str, str]]) -> Path:
    text = (EXAMPLES / example).read_text(encoding="utf-8")
    for old, new in pairs:
        assert old in text, (example, old)
        text = text.replace(old, new)
    return _write(tmp_path, example, text)


def invites_received(msg_file: Path) -> int:
    if not msg_file.exists():
        return 0
    n = 0
    for block in msg_file.read_text().split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        if "message received" in head and body.lstrip().startswith("INVITE "):
            n += 1
    return n


def registered_bob(tmp_path: Path, serve: Serve, contact_port: int) -> None:
    register(tmp_path, "reg", serve.port, "bob", contact_port)
    assert successful(tmp_path, "reg") == 1, serve.log()


@needs_sipp
def test_serve_forwards_on_busy(tmp_path: Path) -> None:
    busy_port, target_port = free_port(), free_port()
    routes = pointed(tmp_path, "forward_busy.py", [(TARGET, f"sip:bob@{HOST}:{target_port}")])
    busy = sipp("uas_busy.xml", tmp_path, "busy", "-p", str(busy_port), "-m", "1",
                background=True, timeout=30)
    target = start_uas(tmp_path, "target", target_port, 1)
    serve = Serve(tmp_path, free_port(), "--routes", str(routes))
    try:
        registered_bob(tmp_path, serve, busy_port)
        run_uac(tmp_path, "caller", serve.port, "bob", 1)
        assert successful(tmp_path, "caller") == 1, serve.log()[-3000:]
        finish(busy, 10)
        finish(target, 15)
        assert invites_received(tmp_path / "busy.msg") == 1
        assert successful(tmp_path, "target") == 1
    finally:
        serve.close()
        stop(busy)
        stop(target)


@needs_sipp
def test_serve_forwards_on_no_answer_after_the_ring_timeout(tmp_path: Path) -> None:
    ring_port, target_port = free_port(), free_port()
    routes = pointed(tmp_path, "forward_noanswer.py", [
        (TARGET, f"sip:bob@{HOST}:{target_port}"),
        ('RING_TIMEOUT: dict[str, float] = {"bob": 20.0}',
         'RING_TIMEOUT: dict[str, float] = {"bob": 2.0}')])
    ringing = sipp("uas_ring_cancel.xml", tmp_path, "ringing", "-p", str(ring_port), "-m", "1",
                   background=True, timeout=30)
    target = start_uas(tmp_path, "target", target_port, 1)
    serve = Serve(tmp_path, free_port(), "--routes", str(routes))
    try:
        registered_bob(tmp_path, serve, ring_port)
        started = time.monotonic()
        run_uac(tmp_path, "caller", serve.port, "bob", 1)
        elapsed = time.monotonic() - started
        assert successful(tmp_path, "caller") == 1, serve.log()[-3000:]
        assert elapsed >= 2.0                       # it rang for the ring timeout first
        finish(ringing, 10)
        # The first callee got its CANCEL (its scenario ends only after one) ...
        assert successful(tmp_path, "ringing") == 1, serve.log()[-3000:]
        finish(target, 15)
        assert successful(tmp_path, "target") == 1   # ... and the forward target the call.
    finally:
        serve.close()
        stop(ringing)
        stop(target)


@needs_sipp
def test_serve_forwards_unconditionally(tmp_path: Path) -> None:
    phone_port, target_port = free_port(), free_port()
    routes = pointed(tmp_path, "forward_unconditional.py",
                     [(TARGET, f"sip:bob@{HOST}:{target_port}")])
    # bob's phone: would answer anything; it must see no INVITE at all.
    phone = sipp("uas_gateway.xml", tmp_path, "phone", "-p", str(phone_port), background=True,
                 timeout=30)
    target = start_uas(tmp_path, "target", target_port, 1)
    serve = Serve(tmp_path, free_port(), "--routes", str(routes))
    try:
        registered_bob(tmp_path, serve, phone_port)
        run_uac(tmp_path, "caller", serve.port, "bob", 1)
        assert successful(tmp_path, "caller") == 1, serve.log()[-3000:]
        finish(target, 15)
        assert successful(tmp_path, "target") == 1
    finally:
        serve.close()
        stop(phone)
        finish(phone, 5)
        stop(target)
    assert (tmp_path / "phone.msg").exists()
    assert invites_received(tmp_path / "phone.msg") == 0


@needs_sipp
def test_serve_voicemail_for_an_offline_user(tmp_path: Path) -> None:
    vm_port = free_port()
    routes = pointed(tmp_path, "forward_voicemail.py",
                     [('VOICEMAIL = "sip:voicemail.example.net"',
                       f'VOICEMAIL = "sip:{HOST}:{vm_port}"')])
    voicemail = start_uas(tmp_path, "voicemail", vm_port, 1)
    serve = Serve(tmp_path, free_port(), "--routes", str(routes))
    try:
        run_uac(tmp_path, "caller", serve.port, "bob", 1)
        assert successful(tmp_path, "caller") == 1, serve.log()[-3000:]
        finish(voicemail, 15)
        assert successful(tmp_path, "voicemail") == 1
    finally:
        serve.close()
        stop(voicemail)


@needs_sipp
def test_serve_redirect_server(tmp_path: Path) -> None:
    serve = Serve(tmp_path, free_port(), "--routes", str(EXAMPLES / "redirect.py"))
    try:
        *_, reply = sip_exchange(serve.port, request("INVITE", f"sip:carol@{DOMAIN}",
                                                     call_id="redir-1"), full=True)
        assert reply.startswith("SIP/2.0 302"), reply
        assert header_values(reply, "Contact") == ["<sip:carol@branch-office.example.net>",
                                                   "<tel:+442079460000>"]
        lines = sip_exchange(serve.port, request("INVITE", f"sip:dave@{DOMAIN}",
                                                 call_id="redir-2"))
        assert lines[-1].startswith("SIP/2.0 404"), lines
    finally:
        serve.close()


# -- the ring timeout, with exact times (the proxy core over a simulated network) -----------------


def ring_timeout_net(ring_timeout: float, b2_policy: Any = None) -> tuple[Any, Any, Any]:
    """Alice calls through the proxy; the routes relay to b1 with ``ring_timeout`` and, on
    the first failure, to b2 (a Phone that answers, or follows ``b2_policy``)."""
    from test_proxy import call_via_proxy, ring, setup
    from test_proxy_net import Phone, Raw

    from fastsip.app import Router, Routes

    def initial(req: Any) -> Any:
        req.trusted = True
        return req.relay(to="sip:b1@127.0.0.1:5081", ring_timeout=ring_timeout)

    def failure(req: Any, response: Response) -> Any:
        req.data.setdefault("seen", []).append(response.status_code)
        if len(req.data["seen"]) == 1:
            return req.relay(to="sip:b2@127.0.0.1:5082")
        return None

    router = Router(Routes(initial, failure=failure))
    net, _proxy, alice = setup(router, timer_c=181.0)
    b2 = Phone(net, "b2", 5082, b2_policy)
    return net, (alice, call_via_proxy, ring, Phone, Raw), b2


def test_ring_timeout_cancels_the_ringing_branch_then_forwards() -> None:
    net, (alice, call_via_proxy, ring, Phone, _), b2 = ring_timeout_net(5.0)
    b1 = Phone(net, "b1", 5081, ring())
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(4.9)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" not in net.lines("proxy", "b1")
    assert not b2.calls
    net.run(6.0)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" in net.lines("proxy", "b1")
    assert b1.calls[0].status == 487
    assert b2.calls and call.status == 200      # forwarded, answered there


def test_ring_timeout_without_any_answer_is_408_and_forwards() -> None:
    net, (alice, call_via_proxy, _, _, Raw), b2 = ring_timeout_net(3.0)
    silent = Raw(net, "b1", 5081)              # not a word, not even 100 Trying
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(2.9)
    assert silent.requests("INVITE") and not b2.calls
    net.run(3.5)
    assert b2.calls and call.status == 200
    assert not silent.requests("CANCEL")       # §9.1: no CANCEL before a provisional


def test_ring_timeout_of_a_decision_does_not_cut_the_next_one() -> None:
    # b1 is busy at once; the call goes to b2, which rings past b1's ring timeout and is
    # answered: the first decision's timer must not cancel the second decision's branch.
    from test_proxy import reject
    from test_proxy import ring as ringing

    net, (alice, call_via_proxy, _, Phone, _), b2 = ring_timeout_net(2.0, ringing())
    Phone(net, "b1", 5081, reject(486))
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(5.0)
    assert "CANCEL" not in " ".join(net.lines("proxy", "b2"))
    b2.calls[0].answer(b"v=0\r\n", content_type="application/sdp")
    net.run(6.0)
    assert call.status == 200
