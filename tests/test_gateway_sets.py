"""Gateway sets: the sans-IO selection and probe state machine (exact times, no clock), the
routing API's relay_to_set with failover, and ``fastsip serve --gateway-set`` with two sipp
gateways on loopback (tests/data/sipp/uas_gateway.xml answers the OPTIONS probes itself):
calls shared by weight, a killed gateway leaving the set after the probe threshold, and
coming back."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fastsip.app import Router, load_routes
from fastsip.app.gateways import (
    ACTIVE,
    INACTIVE,
    GatewaySet,
    GatewaySetError,
    Prober,
    parse_gateway_set,
)
from fastsip.sip import Response

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import DOMAIN, HOST, SIPP, Serve, finish, run_uac, sipp, stop, successful
from test_examples import STRANGER, TRUSTED, decide
from test_examples import sip as make_request

# -- selection ----------------------------------------------------------------------------------


def test_parse_gateway_set_takes_our_parameters_off_the_uri() -> None:
    gs = parse_gateway_set("pstn=sip:gw1.example.net;weight=3;priority=2,"
                           "sip:gw2.example.net:5080;transport=tcp")
    assert gs.name == "pstn"
    g1, g2 = gs.gateways
    assert (str(g1.uri), g1.weight, g1.priority) == ("sip:gw1.example.net", 3, 2)
    assert (str(g2.uri), g2.weight, g2.priority) == ("sip:gw2.example.net:5080;transport=tcp",
                                                     1, 0)
    for bad in ("pstn", "=sip:gw", "pstn=", "pstn=sip:gw;weight=x", "pstn=http://gw",
                "pstn=sip:gw;weight=-1"):
        with pytest.raises(GatewaySetError):
            parse_gateway_set(bad)


def test_selection_by_priority_then_weight_by_call_id() -> None:
    gs = GatewaySet("pstn", ["sip:a.example.net;weight=3", "sip:b.example.net;weight=1",
                             "sip:backup.example.net;priority=-1"])
    firsts = Counter(str(gs.select(f"call-{n}@host")[0].uri) for n in range(4000))
    # Weighted rendezvous hashing: each gateway of the top priority first in proportion to
    # its weight (3:1); the lower priority never first while the others are active.
    assert 2800 < firsts["sip:a.example.net"] < 3200, firsts
    assert 800 < firsts["sip:b.example.net"] < 1200, firsts
    assert firsts["sip:backup.example.net"] == 0
    order = gs.select("one-call@host")
    assert [str(g.uri) for g in order][-1] == "sip:backup.example.net"   # the failover order
    assert gs.select("one-call@host") == order                          # same call, same order
    # A gateway leaving moves only its own calls.
    before = {n: gs.select(f"c{n}")[0] for n in range(500)}
    gs.gateways[1].state = INACTIVE
    after = {n: gs.select(f"c{n}")[0] for n in range(500)}
    moved = [n for n in before if before[n] is not after[n]]
    assert moved and all(str(before[n].uri) == "sip:b.example.net" for n in moved)
    for g in gs.gateways:
        g.state = INACTIVE
    assert gs.select("x") == []


def test_long_uris_with_a_common_beginning_still_share() -> None:
    base = "sip:gateway.a-rather-long-carrier-domain-name.example.net:5060;transport=tcp;x="
    gs = GatewaySet("long", [base + "1", base + "2"])
    firsts = Counter(str(gs.select(f"call-{n}")[0].uri)[-1] for n in range(1000))
    assert 400 < firsts["1"] < 600, firsts


# -- the probe state machine ---------------------------------------------------------------------


def test_prober_threshold_timeout_and_recovery() -> None:
    gs = GatewaySet("pstn", ["sip:a.example.net", "sip:b.example.net"])
    a, b = gs.gateways
    prober = Prober([gs], interval=10.0, threshold=3, recover=2)
    now = 100.0
    probes = prober.probes_due(now)
    assert [p.gateway for p in probes] == [a, b]
    assert prober.probes_due(now + 5) == []             # not before the interval
    assert prober.next_deadline() == now + 10
    for p in probes:
        prober.probe_result(p.id, 200 if p.gateway is a else 503, now + 0.1)
    # Any response counts as alive (503 too: the gateway answers), as dispatcher's default.
    assert (a.state, b.state, b.failures) == (ACTIVE, ACTIVE, 0)
    for n in range(1, 4):
        now += 10
        probes = prober.probes_due(now)
        assert len(probes) == 2
        for p in probes:
            if p.gateway is a:
                prober.probe_result(p.id, 200, now + 0.1)
            # b does not answer: its probe expires at the next round (timeout = interval)
        assert (b.state, b.failures) == (ACTIVE, n - 1)
    now += 10
    prober.probes_due(now)                              # the third unanswered one expires
    assert (b.state, b.failures) == (INACTIVE, 3)
    assert a.state == ACTIVE and a.failures == 0
    # A late answer to an expired probe changes nothing.
    prober.probe_result(probes[-1].id, 200, now)
    assert b.state == INACTIVE
    # Transport errors (status 0) are failures too; then two answers bring b back.
    for status, state in ((0, INACTIVE), (200, INACTIVE), (200, ACTIVE)):
        now += 10
        for p in prober.probes_due(now):
            if p.gateway is b:
                prober.probe_result(p.id, status, now + 0.1)
        assert b.state == state, status
    assert b.probes_sent == 8 and b.probes_answered == 3


def test_prober_alive_codes() -> None:
    gs = GatewaySet("pstn", ["sip:a.example.net"])
    prober = Prober([gs], interval=1.0, threshold=1, alive_codes={200})
    (p,) = prober.probes_due(0.0)
    prober.probe_result(p.id, 404, 0.1)
    assert gs.gateways[0].state == INACTIVE and gs.gateways[0].last_status == 404


# -- the routing API -----------------------------------------------------------------------------


ROUTES = '''
from fastsip.app import route


@route
def initial(req):
    if req.method == "INVITE":
        return req.relay_to_set("pstn")
    return None
'''


def set_router(tmp_path: Path, spec: str) -> Router:
    (tmp_path / "routes.py").write_text(ROUTES)
    router = Router(load_routes(tmp_path / "routes.py"), trusted=TRUSTED)
    gs = parse_gateway_set(spec)
    router.gateway_sets[gs.name] = gs
    return router


def test_relay_to_set_fails_over_on_gateway_failures_only(tmp_path: Path) -> None:
    router = set_router(tmp_path, "pstn=sip:gw1.example.net;priority=2,sip:gw2.example.net;"
                                  "priority=1,sip:gw3.example.net")
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com"))
    assert ctx.uris() == ["sip:+15551234567@gw1.example.net"]
    assert router.on_failure(ctx, Response.create(503)) is True  # type: ignore[arg-type]
    assert ctx.uris() == ["sip:+15551234567@gw2.example.net"]
    assert router.on_failure(ctx, Response.create(408)) is True  # type: ignore[arg-type]
    assert ctx.uris() == ["sip:+15551234567@gw3.example.net"]
    # The last one failing: nothing left, no failure hook: the best response goes back.
    assert router.on_failure(ctx, Response.create(500)) is False  # type: ignore[arg-type]
    # A busy callee is an answer, not a gateway failure.
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com", n=2))
    assert router.on_failure(ctx, Response.create(486)) is False  # type: ignore[arg-type]
    assert len(ctx.forwarded) == 1


def test_relay_to_set_without_active_gateway_is_503_with_reason(tmp_path: Path) -> None:
    router = set_router(tmp_path, "pstn=sip:gw1.example.net")
    router.gateway_sets["pstn"].gateways[0].state = INACTIVE
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com"))
    assert ctx.responses == [503] and not ctx.forwarded
    assert router.gateway_sets["pstn"].unavailable == 1


def test_relay_to_set_obeys_the_relay_policy(tmp_path: Path) -> None:
    router = set_router(tmp_path, "pstn=sip:gw1.example.net")
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com"), STRANGER)
    assert ctx.responses == [403] and not ctx.forwarded


def test_a_set_built_by_the_routes_is_remembered(tmp_path: Path) -> None:
    (tmp_path / "routes.py").write_text('''
from fastsip.app import route
from fastsip.app.gateways import GatewaySet

PSTN = GatewaySet("carrier", ["sip:gw9.example.net;weight=2"])


@route
def initial(req):
    return req.relay_to_set(PSTN)
''')
    router = Router(load_routes(tmp_path / "routes.py"), trusted=TRUSTED)
    assert router.gateway_sets == {}
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com"))
    assert ctx.uris() == ["sip:+15551234567@gw9.example.net"]
    assert list(router.gateway_sets) == ["carrier"]       # probed from now on (serve)
    ctx = decide(router, make_request("INVITE", "sip:+15551234567@example.com", n=2))
    assert ctx.uris() == ["sip:+15551234567@gw9.example.net"]


# -- fastsip serve with two sipp gateways ------------------------------------------------------

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp (sip-tester) is not installed")


def start_gateway(workdir: Path, name: str, port: int) -> object:
    return sipp("uas_gateway.xml", workdir, name, "-p", str(port), background=True,
                timeout=120)


def calls_by_gateway(msg_file: Path) -> Counter[int]:
    """Which gateway answered each call: the port in the Contact of each 200 to the INVITE."""
    counts: Counter[int] = Counter()
    for block in msg_file.read_text().split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith("SIP/2.0 200") and \
                re.search(r"^CSeq:\s*1 INVITE", body, re.MULTILINE | re.IGNORECASE):
            m = re.search(r"^Contact:\s*<sip:[^:>]+:(\d+)", body, re.MULTILINE)
            assert m is not None, body
            counts[int(m.group(1))] += 1
    return counts


CALLS = 30


@needs_sipp
def test_serve_gateway_set_shares_fails_and_recovers(tmp_path: Path) -> None:
    (tmp_path / "routes.py").write_text(ROUTES)
    p1, p2 = free_port(), free_port()
    gw1 = start_gateway(tmp_path, "gw1", p1)
    gw2 = start_gateway(tmp_path, "gw2", p2)
    serve = Serve(tmp_path, free_port(), "--routes", str(tmp_path / "routes.py"),
                  "--trusted", HOST, "--gateway-set",
                  f"pstn=sip:{HOST}:{p1},sip:{HOST}:{p2};weight=1",
                  "--gateway-probe-interval", "0.5", "--gateway-probe-failures", "3")
    gateways = [gw1, gw2]
    try:
        # 1. Both answer their probes: the calls are shared (1:1 weights, by Call-ID hash:
        # 30 calls put fewer than 5 on one side with a probability of ~1e-4).
        uac = run_uac(tmp_path, "uac1", serve.port, "+15551234567", CALLS, rate=20)
        assert successful(tmp_path, "uac1") == CALLS, finish(uac, 1) + serve.log()[-3000:]
        shared = calls_by_gateway(tmp_path / "uac1.msg")
        assert sum(shared.values()) == CALLS
        assert shared[p1] >= 5 and shared[p2] >= 5, shared

        # 2. gw1 dies: after 3 probes unanswered it leaves the set; every call goes to gw2.
        gw1.kill()  # type: ignore[attr-defined]
        finish(gw1, 5)  # type: ignore[arg-type]
        killed = time.monotonic()
        serve.wait_log(f"gateway sip:{HOST}:{p1} of set pstn is inactive", 10)
        assert time.monotonic() - killed >= 0.9         # 3 probes: two intervals at least
        run_uac(tmp_path, "uac2", serve.port, "+15551234567", CALLS, rate=20)
        assert successful(tmp_path, "uac2") == CALLS, serve.log()[-3000:]
        assert calls_by_gateway(tmp_path / "uac2.msg") == Counter({p2: CALLS})

        # 3. gw1 comes back: one answered probe and it is active again; shared again.
        gw1 = start_gateway(tmp_path, "gw1b", p1)
        gateways.append(gw1)
        serve.wait_log(f"gateway sip:{HOST}:{p1} of set pstn is active again", 10)
        run_uac(tmp_path, "uac3", serve.port, "+15551234567", CALLS, rate=20)
        assert successful(tmp_path, "uac3") == CALLS, serve.log()[-3000:]
        shared = calls_by_gateway(tmp_path / "uac3.msg")
        assert shared[p1] >= 5 and shared[p2] >= 5, shared
        assert re.search(r"WARNING.*inactive", serve.log())
    finally:
        serve.close()
        for gw in gateways:
            stop(gw)  # type: ignore[arg-type]
            finish(gw, 5)  # type: ignore[arg-type]
    assert "Traceback" not in serve.log()


@needs_sipp
def test_serve_gateway_set_fails_over_on_503(tmp_path: Path) -> None:
    """The preferred gateway answers its probes but refuses calls with 503: each call goes
    on to the next gateway of the set and is answered there."""
    (tmp_path / "routes.py").write_text(ROUTES)
    p_bad, p_good = free_port(), free_port()
    bad = sipp("uas_503.xml", tmp_path, "bad", "-p", str(p_bad),
               background=True, timeout=60)
    good = start_gateway(tmp_path, "good", p_good)
    serve = Serve(tmp_path, free_port(), "--routes", str(tmp_path / "routes.py"),
                  "--trusted", HOST, "--gateway-set",
                  f"pstn=sip:{HOST}:{p_bad};priority=1,sip:{HOST}:{p_good}")
    try:
        run_uac(tmp_path, "uac", serve.port, "+15551234567", 3, rate=10)
        assert successful(tmp_path, "uac") == 3, serve.log()[-3000:]
        assert calls_by_gateway(tmp_path / "uac.msg") == Counter({p_good: 3})
    finally:
        serve.close()
        for proc in (bad, good):
            stop(proc)  # type: ignore[arg-type]
            finish(proc, 5)  # type: ignore[arg-type]
    assert serve.log().count("gateway set pstn: 503") == 3, serve.log()[-3000:]


def test_serve_rejects_a_bad_gateway_set(tmp_path: Path) -> None:
    import subprocess

    from procutil import fastsip_env

    out = subprocess.run([sys.executable, "-m", "fastsip.cli", "serve", "--listen",
                          f"udp:{HOST}:{free_port()}", "--domain", DOMAIN, "--gateway-set",
                          "pstn=sip:gw;weight=heavy"], check=False, capture_output=True,
                         text=True, cwd=tmp_path,   # not the checkout: see fastsip_env
                         env=fastsip_env(), timeout=30)
    assert out.returncode == 2
    assert "--gateway-set" in out.stderr and "weight" in out.stderr


@needs_sipp
def test_serve_gateway_set_fails_over_from_a_dead_gateway_before_the_probes_notice(
        tmp_path: Path) -> None:
    """The preferred gateway is gone but still active (the next probe is a minute away): each
    call's INVITE to it fails -- a transport error, or Timer B's 408 (a short T1 here) -- and
    the call goes on to the other gateway."""
    (tmp_path / "routes.py").write_text(ROUTES)
    p_dead, p_good = free_port(), free_port()
    good = start_gateway(tmp_path, "good", p_good)
    serve = Serve(tmp_path, free_port(), "--routes", str(tmp_path / "routes.py"),
                  "--trusted", HOST, "--t1", "0.1", "--gateway-probe-interval", "60",
                  "--gateway-set", f"pstn=sip:{HOST}:{p_dead};priority=1,sip:{HOST}:{p_good}")
    try:
        run_uac(tmp_path, "uac", serve.port, "+15551234567", 3, rate=10)
        assert successful(tmp_path, "uac") == 3, serve.log()[-3000:]
        assert calls_by_gateway(tmp_path / "uac.msg") == Counter({p_good: 3})
    finally:
        serve.close()               # (its log lines are all written once it has stopped)
        stop(good)  # type: ignore[arg-type]
        finish(good, 5)  # type: ignore[arg-type]
    log = serve.log()
    assert len(re.findall(r"gateway set pstn: (503|408) for INVITE", log)) == 3, log[-3000:]
    assert "is inactive" not in log                      # the calls found out, not the probes


@needs_sipp
def test_serve_answers_503_with_reason_when_no_gateway_is_left(tmp_path: Path) -> None:
    from serveutil import header_values, request, sip_exchange
    from test_serve_metrics import scrape, value

    (tmp_path / "routes.py").write_text(ROUTES)
    nobody, metrics_port = free_port(), free_port()
    serve = Serve(tmp_path, free_port(), "--routes", str(tmp_path / "routes.py"),
                  "--trusted", HOST, "--gateway-probe-interval", "0.2",
                  "--gateway-probe-failures", "2",
                  "--gateway-set", f"pstn=sip:{HOST}:{nobody}",   # nobody there
                  "--metrics", f"{HOST}:{metrics_port}")
    try:
        serve.wait_log("of set pstn is inactive", 10)
        *_, reply = sip_exchange(serve.port, request("INVITE", f"sip:+15551234567@{DOMAIN}",
                                                     call_id="no-gw"), full=True)
        assert reply.startswith("SIP/2.0 503"), reply
        assert header_values(reply, "Reason") == [
            'SIP;cause=503;text="no active gateway in set pstn"']
        # What an operator's dashboard shows: the gateway out of its set, the call refused.
        samples = scrape(metrics_port)
        assert value(samples, "fastsip_gateway_active", set="pstn",
                     gateway=f"sip:{HOST}:{nobody}") == 0
        assert value(samples, "fastsip_gateway_set_unavailable_total", set="pstn") == 1
    finally:
        serve.close()
    assert "gateway set pstn unavailable=1" in serve.log()
