"""``fastsip serve --metrics HOST:PORT``: a real serve, real sipp calls, ``/metrics`` scraped
over HTTP and parsed with prometheus_client's own parser.

- calls through serve move the counters by exactly what was sent: requests by method,
  responses by code, outcomes, the handler histogram (a routes module), registered contacts,
  calls up while they are up and none after their BYEs;
- a malformed datagram is a ``malformed`` drop (and its 400 a response sent); a flood from
  one source is ``rate_limited`` drops, a ban and a banned source; an address that is not
  loopback gets a warning in the log; a path other than /metrics gets 404;
- ``--workers 2``: one endpoint, each worker's series labelled ``worker``, their sum the
  calls made (a Redis server started here is the shared store).
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastsip.asyncio.workers import reuse_port_supported

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port, wait_until
from redisutil import RedisServer
from serveutil import (
    CALLS,
    HOST,
    SIPP,
    Serve,
    finish,
    register,
    request,
    run_uac,
    sip_exchange,
    start_uas,
    successful,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ROUTES = '''
from fastsip.app import route


@route
def initial(req):
    return None          # the default routing, timed as the routes module's handler
'''


def scrape(port: int, path: str = "/metrics") -> Samples:
    """Every sample of ``http://127.0.0.1:PORT/metrics``: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter nothing has moved yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` that carry ``labels`` (and any others)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_calls_move_the_counters_by_exactly_the_calls_made(tmp_path: Path) -> None:
    port, uas_port, metrics = free_port(), free_port(), free_port()
    routes = tmp_path / "routes.py"
    routes.write_text(ROUTES)
    serve = Serve(tmp_path, port, "--metrics", f"{HOST}:{metrics}", "--routes", str(routes))
    uas = None
    try:
        before = scrape(metrics)
        uas = start_uas(tmp_path, "uas", uas_port, CALLS)
        assert register(tmp_path, "register", port, "service", uas_port).returncode == 0
        # Each call is held 2 s: all CALLS are up together for a while.
        uac = run_uac(tmp_path, "uac", port, "service", CALLS, "-d", "2000", background=True)
        wait_until(lambda: value(scrape(metrics), "fastsip_calls_active") == CALLS, 10,
                   "every call in fastsip_calls_active")
        finish(uac, 40)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == CALLS, serve.log()
        assert successful(tmp_path, "uas") == CALLS
        after = scrape(metrics)
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    for method, n in (("INVITE", CALLS), ("ACK", CALLS), ("BYE", CALLS), ("REGISTER", 1)):
        assert moved(before, after, "fastsip_requests_total", method=method) == n, method
    # 200s: the REGISTER's, and the callee's to each INVITE and BYE, relayed.
    assert moved(before, after, "fastsip_responses_total", code="200", **{"class": "2xx"}) \
        == 1 + 2 * CALLS
    assert moved(before, after, "fastsip_responses_total", code="180", **{"class": "1xx"}) \
        == CALLS
    assert moved(before, after, "fastsip_responses_total", code="100", **{"class": "1xx"}) \
        == CALLS
    assert total(after, "fastsip_responses_total", **{"class": "4xx"}) == 0
    assert moved(before, after, "fastsip_outcomes_total", outcome="answered") == CALLS
    assert moved(before, after, "fastsip_outcomes_total", outcome="registered") == 1
    assert total(after, "fastsip_outcomes_total") == CALLS + 1
    # The routes module's handler ran for each initial request: the REGISTER and INVITEs.
    assert value(after, "fastsip_handler_duration_seconds_count") == CALLS + 1
    assert value(after, "fastsip_handler_duration_seconds_bucket", le="+Inf") == CALLS + 1
    assert 0 < value(after, "fastsip_handler_duration_seconds_sum") < 1.0
    assert value(after, "fastsip_calls_active") == 0
    assert value(after, "fastsip_registered_contacts") == 1
    assert value(after, "fastsip_transactions_active", side="server") >= 0
    assert 0 <= value(after, "fastsip_event_loop_lag_seconds") < 1.0
    for reason in ("malformed", "rate_limited", "overload"):
        assert value(after, "fastsip_dropped_total", reason=reason) == 0, reason
    # The stop summary counts from the same dict as the metrics.
    assert f"stopped answered={CALLS} registered=1" in serve.log()


@pytest.fixture
def flood_serve(tmp_path: Path) -> Iterator[tuple[Serve, int, int]]:
    port, metrics = free_port(), free_port()
    # On every address: a warning; scraped over loopback.
    serve = Serve(tmp_path, port, "--metrics", f"0.0.0.0:{metrics}", "--rate-limit", "5",
                  "--rate-burst", "10", "--ban-time", "60")
    try:
        yield serve, port, metrics
    finally:
        assert serve.close() == 0


def test_malformed_and_flood_are_counted_as_drops(flood_serve: tuple[Serve, int, int]) -> None:
    serve, port, metrics = flood_serve
    before = scrape(metrics)
    # A CSeq without a number: the parse fails, the 400 goes back, a malformed drop.
    lines = sip_exchange(port, request("OPTIONS", f"sip:{HOST}:{port}", call_id="m1",
                                       omit=["CSeq"], headers=["CSeq: bad"]))
    assert lines and lines[-1].startswith("SIP/2.0 400"), lines
    after = scrape(metrics)
    assert moved(before, after, "fastsip_dropped_total", reason="malformed") == 1
    assert moved(before, after, "fastsip_responses_total", code="400", **{"class": "4xx"}) == 1
    assert moved(before, after, "fastsip_dropped_total", reason="rate_limited") == 0
    # 200 OPTIONS at once from one source: past the burst, dropped and the source banned.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        me = s.getsockname()[1]
        for n in range(200):
            s.sendto(request("OPTIONS", f"sip:{HOST}:{port}", call_id=f"f{n}")
                     .replace("{me}", str(me)).encode(), (HOST, port))
    wait_until(lambda: value(scrape(metrics), "fastsip_banned_sources") == 1, 10,
               "the ban in fastsip_banned_sources")
    flooded = scrape(metrics)
    assert moved(after, flooded, "fastsip_dropped_total", reason="rate_limited") > 0
    assert moved(after, flooded, "fastsip_bans_total") == 1
    assert moved(after, flooded, "fastsip_dropped_total", reason="malformed") == 0
    # What got through before the ban was answered; no more than that was counted.
    answered = moved(after, flooded, "fastsip_responses_total", code="200", **{"class": "2xx"})
    assert 0 < answered <= 10 + 1
    assert answered + moved(after, flooded, "fastsip_dropped_total", reason="rate_limited") \
        <= 200
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(metrics, "/")
    assert err.value.code == 404
    assert "is not a loopback address" in serve.log()


def workers_load_scraped(tmp_path: Path, calls: int, *serve_args: str) -> Samples:
    """``serve --workers 2`` (Redis started here) with metrics: a registered sipp callee, then
    ``calls`` sipp calls that all complete; the supervisor's endpoint scraped at the end."""
    redis = RedisServer(tmp_path / "redis")
    port, uas_port, metrics = free_port(), free_port(), free_port()
    serve = Serve(tmp_path, port, "--workers", "2", "--db", redis.url, "--rate-limit", "0",
                  *serve_args, "--metrics", f"{HOST}:{metrics}")
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", uas_port, calls)
        assert register(tmp_path, "register", port, "service", uas_port).returncode == 0
        uac = run_uac(tmp_path, "uac", port, "service", calls)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == calls, serve.log()
        return scrape(metrics)
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        try:
            assert serve.close() == 0
        finally:
            redis.stop()


@pytest.mark.skipif(not reuse_port_supported(), reason="--workers needs Linux SO_REUSEPORT")
def test_workers_are_scraped_from_one_endpoint_with_a_worker_label(tmp_path: Path) -> None:
    """Each worker counts what it handled (a call belongs to one worker: by Call-ID here,
    ``--spread-above 0``, so both get some); the supervisor's endpoint serves all of them,
    labelled: their sum is the calls made."""
    calls = 2 * CALLS
    after = workers_load_scraped(tmp_path, calls, "--spread-above", "0")
    workers = {dict(labels).get("worker") for (_, labels) in after}
    assert workers == {"0", "1"}, workers
    assert total(after, "fastsip_requests_total", method="INVITE") == calls
    assert total(after, "fastsip_requests_total", method="BYE") == calls
    assert total(after, "fastsip_outcomes_total", outcome="answered") == calls
    assert total(after, "fastsip_outcomes_total", outcome="registered") == 1
    # Both did some of the calls (crc32 of sipp's Call-IDs spreads them).
    for worker in ("0", "1"):
        assert 0 < total(after, "fastsip_requests_total", method="INVITE", worker=worker) \
            < calls, worker
    # One series per worker, never merged into one without the label.
    assert ("fastsip_calls_active", frozenset()) not in after
    assert ("fastsip_calls_active", frozenset({("worker", "0")})) in after


@pytest.mark.skipif(not reuse_port_supported(), reason="--workers needs Linux SO_REUSEPORT")
def test_packed_workers_say_where_their_calls_went(tmp_path: Path) -> None:
    """Packed (the default), a light load stays in one worker: the workers' placement
    counters add up to the calls made, none was passed or lost, and each publishes a load."""
    calls = 2 * CALLS
    after = workers_load_scraped(tmp_path, calls)
    # Every INVITE and the REGISTER: a new call each, kept where it arrived.
    assert total(after, "fastsip_worker_calls_total", placement="kept") == calls + 1
    assert total(after, "fastsip_worker_calls_total", placement="passed") == 0
    assert total(after, "fastsip_worker_calls_total", placement="claimed") == 0
    assert total(after, "fastsip_worker_handoffs_total", direction="lost") == 0
    loads = [v for (n, labels), v in after.items() if n == "fastsip_worker_load"]
    assert len(loads) == 2 and all(0.0 <= v <= 1.0 for v in loads), loads
    assert total(after, "fastsip_transactions_ended_early_total") == 0


# -- in-process: the pieces the end-to-end runs do not reach -----------------------------------


def test_handler_timer_times_async_handlers_until_they_end() -> None:
    import asyncio

    from fastsip.app.metrics import HandlerTimer

    now = [0.0]
    timer = HandlerTimer(buckets=(0.001, 0.1, 1.0), clock=lambda: now[0])

    async def slow(req: object) -> str:
        await asyncio.sleep(0)
        now[0] += 0.05                       # 50 ms pass while it awaits
        return "done"

    def quick(req: object) -> str:
        now[0] += 0.0005
        return "ok"

    timed_slow, timed_quick = timer.wrap(slow), timer.wrap(quick)
    assert asyncio.iscoroutinefunction(timed_slow)     # the Router still sees an async hook
    assert asyncio.run(timed_slow(None)) == "done"
    assert timed_quick(None) == "ok"
    assert timer.counts == [1, 1, 0, 0]                # <=1 ms, <=100 ms, <=1 s, +Inf
    assert abs(timer.sum - 0.0505) < 1e-9
    family = timer.family("h", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert buckets == {"0.001": 1, "0.1": 2, "1.0": 2, "+Inf": 2}


def test_calls_end_at_their_bye_or_after_the_maximum_age() -> None:
    from fastsip.app.metrics import CALL_MAX_AGE, MessageCounts
    from fastsip.sip import parse

    counts = MessageCounts()
    counts.answered("old", 0.0)
    counts.answered("a", 100.0)
    counts.answered("b", 200.0)
    bye = parse(b"BYE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                b"Call-ID: a\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    delivered = []
    counts.receiving(lambda m, s: delivered.append(m))(bye, None)
    assert delivered == [bye] and counts.requests == {"BYE": 1}
    assert counts.active_calls(150.0) == 2                       # "a" ended
    assert counts.active_calls(CALL_MAX_AGE + 50.0) == 1         # "old" aged out
    sent = []
    send = counts.sending(lambda d, dest: sent.append(d))
    send(b"SIP/2.0 486 Busy Here\r\n\r\n", None)
    send(b"INVITE sip:x SIP/2.0\r\n\r\n", None)
    assert len(sent) == 2 and counts.responses_by_code() == {486: 1}
