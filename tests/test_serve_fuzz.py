"""``fastsip serve`` answers every bad input it can answer, through the network (issue 9).

Two runs of ``tests/fuzzserve.py``, each in a private network namespace (see its docstring:
mutated Request-URIs and Contacts make a proxy resolve and reach arbitrary hosts; there only
loopback exists and every foreign name leads to the harness's sink):

- **fuzz**: 20,000 mutated datagrams from two UDP sockets at 1,000/s and 300 TCP streams
  (pipelined, keep-alives, cut mid-message, garbage, broken Content-Length, written in pieces)
  against serve with ``--auth-users`` (so digest-authenticated REGISTERs reach the registrar
  and authenticated INVITE/MESSAGEs are relayed), and a probe OPTIONS from a third socket
  every 400 datagrams.  Serve runs with ``--t1 0.05``: a transaction lives 64*T1 = 3.2 s, so a
  forwarded request that nobody answers gets its 408 within the run.
- **torture**: every RFC 4475 and RFC 5118 message, and the messages issue 9 names, once over
  UDP and once over TCP, each from its own loopback address, against serve without
  authentication; the verdict for each is :data:`VERDICTS`.

``FASTSIP_FUZZ_LONG=N`` (and ``-m slow``) runs an N-datagram fuzz run too (default 200,000).
Where unprivileged user and network namespaces are unavailable the tests are skipped: without
one the run could send to the world.

The failure classes this found (docs of the fixes: git log; the findings report of the run
that found them is in the issue's closing note) are all asserted here as fixed.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzzserve

UNAVAILABLE = fuzzserve.netns_unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

CI_DATAGRAMS = 20_000
CI_TCP_STREAMS = 300
CI_SEED = 9
#: RSS growth allowed from idle (after startup) to the end of the settle pause.  Measured on
#: this run with the per-request reference cycles collected promptly (serve under a wrapper
#: that runs gc.collect() twice a second): +20 MB (31 -> 51 MB), almost all of it in the first
#: 64*T1 (live transactions) and then a slow creep; today's serve grows +48 MB and keeps
#: growing with traffic.  Twice the measured growth.
RSS_GROWTH_BOUND_KB = 40 * 1024
#: After the traffic stops nothing may keep growing (a retransmission loop, a task leak...).
RSS_SETTLE_SLACK_KB = 2 * 1024

#: Two sockets at 1,000 datagrams/s are a flood to serve's default rate limit (100/s per
#: source), and their mutated credentials are failed logins that would get them banned: this
#: run is about parsing and answering, so rate limits and bans are off here (the flood and
#: security tests exercise them).
NO_RATE_LIMIT = ("--serve-arg=--rate-limit", "--serve-arg=0", "--serve-arg=--ban-time",
                 "--serve-arg=0")


#: The 20,000-datagram run behind these tests takes ~40 s: a stress test (``-m "not slow"``, as
#: the wheel builds run, leaves it out; the CI script runs it).
slow_fuzz = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("fuzz")
    return fuzzserve.run_isolated(
        ["--datagrams", str(CI_DATAGRAMS), "--tcp-streams", str(CI_TCP_STREAMS),
         "--seed", str(CI_SEED), "--keep-going", *NO_RATE_LIMIT], workdir, timeout=600)


@pytest.fixture(scope="module")
def torture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return fuzzserve.run_isolated(["--torture"], tmp_path_factory.mktemp("torture"),
                                  timeout=600)


def _show(cases: list[dict[str, Any]], n: int = 5) -> str:
    out = []
    for c in cases[:n]:
        # Where it was lost: "sink" counts the copies serve forwarded to the harness's sink
        # (0: serve never relayed it), "stream" names the TCP stream (-1: a datagram) and
        # "closed_after" when the harness closed it (seconds after sending).
        out.append(f"#{c['idx']} {c['seed']} {c['transport']} {c['mutations']} "
                   f"statuses={c['statuses']} sink={c.get('sink')} sends={c.get('sends')} "
                   f"stream={c.get('stream')} closed_after={c.get('closed_after')}\n"
                   f"{base64.b64decode(c['data'])[:600]!r}")
    return "\n".join(out)


# -- the fuzz run ----------------------------------------------------------------------------


@slow_fuzz
def test_fuzz_run_covers_what_it_claims(fuzz: dict[str, Any]) -> None:
    """The harness did what the numbers in this module say, and its templates mean what
    their names say (pristine cases get the answers default routing gives): otherwise every
    other assertion here would be about a different run."""
    assert not fuzz["stopped_early"], fuzz["stopped_early"]
    udp = sum(v for k, v in fuzz["outcomes"].items()
              if k.startswith("udp:") and "forwarded" not in k)
    assert udp == CI_DATAGRAMS
    assert sum(fuzz["tcp_kinds"].values()) == CI_TCP_STREAMS
    assert set(fuzz["tcp_kinds"]) == {"clean", "keepalive", "cut", "garbage", "chunked",
                                      "broken-length"}
    answerable = fuzz["outcomes"].get("udp:answer:final", 0)
    assert answerable > CI_DATAGRAMS * 0.4, fuzz["outcomes"]
    assert fuzz["outcomes"].get("tcp:answer:final", 0) > CI_TCP_STREAMS
    pristine = fuzz["pristine"]
    expected = {
        "udp:options-server": "200", "udp:options-user": "404", "udp:options-foreign": "407",
        "udp:options-zero-mf": "483", "udp:invite-local": "404", "udp:invite-foreign": "407",
        "udp:register-noauth": "401", "udp:register-foreign": "403",
        "udp:cancel-stray": "481", "udp:subscribe": "404",
    }
    for key, status in expected.items():
        got = pristine.get(key, {})
        assert got and set(got) == {status}, (key, got)
    # Digest credentials computed from the live nonce work: the registrar and the relay ran.
    assert "200" in pristine.get("udp:register-auth", {}) or \
        "423" in pristine.get("udp:register-auth", {}), pristine.get("udp:register-auth")
    assert fuzz["sink"]["received"] > 100
    assert fuzz["outcomes"].get("udp:forwarded-to-sink", 0) > 100


@slow_fuzz
def test_probe_from_another_socket_always_gets_200(fuzz: dict[str, Any]) -> None:
    probes = fuzz["probes"]
    assert len(probes) >= CI_DATAGRAMS // 400
    failed = [p for p in probes if p["status"] != 200]
    assert not failed, failed[:5]
    assert max(p["latency"] for p in probes) < 2.0


@slow_fuzz
def test_acks_and_responses_get_no_answer(fuzz: dict[str, Any]) -> None:
    """§17: an ACK is never answered; a response is never answered."""
    bad = fuzz["answered_but_must_not"]
    assert not bad, _show(bad)


@slow_fuzz
def test_no_error_or_traceback_in_serve_log(fuzz: dict[str, Any]) -> None:
    assert fuzz["exit_status"] == 0
    assert not fuzz["log"]["errors"], fuzz["log"]["groups"]


@slow_fuzz
def test_messages_serve_sends_over_tcp_stay_framed(fuzz: dict[str, Any]) -> None:
    """A request serve forwards to a user registered over one of the harness's TCP streams
    arrives framed: a body it relayed from a datagram without Content-Length must not be read
    as a message of its own (it was, "v=0" and "Watson," stood as request lines, and the
    response behind them was lost)."""
    bad = {k: n for k, n in fuzz["stray"].items() if k.startswith("unframed:")}
    assert not bad, bad


@slow_fuzz
def test_every_answerable_request_is_answered(fuzz: dict[str, Any]) -> None:
    """Every request with a Request-Line and usable Via/From/To/Call-ID/CSeq got a final
    response (after three retransmissions, so a datagram lost in a socket buffer does not
    count), over UDP and over TCP."""
    missing = fuzz["unanswered"] + fuzz["provisional_only"]
    assert not missing, f"{len(missing)} unanswered:\n{_show(missing)}"


@slow_fuzz
def test_rss_stops_growing_once_traffic_stops(fuzz: dict[str, Any]) -> None:
    settle = [kb for _, kb, phase in fuzz["rss"] if phase == "settle"]
    assert len(settle) >= 10
    assert max(settle) - settle[0] <= RSS_SETTLE_SLACK_KB, settle


@slow_fuzz
def test_rss_growth_is_bounded(fuzz: dict[str, Any]) -> None:
    idle = [kb for _, kb, phase in fuzz["rss"] if phase == "idle"]
    final = fuzz["rss"][-1][1]
    assert final - idle[-1] <= RSS_GROWTH_BOUND_KB, (idle[-1], final)


@slow_fuzz
def test_what_reaches_the_sink_is_recorded(fuzz: dict[str, Any]) -> None:
    """Recorded, not asserted: how many forwarded requests carried a mutation that *may*
    make them refusable (the harness cannot tell a still-valid mutated URI from a broken
    one; the relay policy itself is asserted in test_serve_security and test_edge_proxy).
    The harness must see them to report them: every entry names its case."""
    sink = fuzz["sink"]
    assert sink["from_refusable"] == len(
        [e for e in sink["log"] if e["refuse"]]) or len(sink["log"]) == 2000
    assert all(e["case"] is not None for e in sink["from_refusable_examples"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTSIP_FUZZ_LONG"),
                    reason="set FASTSIP_FUZZ_LONG=N (datagrams) for the long run")
def test_long_fuzz_run(tmp_path: Path) -> None:
    n = int(os.environ.get("FASTSIP_FUZZ_LONG") or 0) or 200_000
    result = fuzzserve.run_isolated(
        ["--datagrams", str(n), "--tcp-streams", str(max(n // 60, 300)), "--seed",
         os.environ.get("FASTSIP_FUZZ_SEED", "1"), "--keep-going", *NO_RATE_LIMIT], tmp_path,
        timeout=n / 100 + 900)
    assert not result["log"]["errors"], result["log"]["groups"]
    assert not result["unanswered"], _show(result["unanswered"])
    assert all(p["status"] == 200 for p in result["probes"])
    idle = [kb for _, kb, phase in result["rss"] if phase == "idle"]
    assert result["rss"][-1][1] - idle[-1] <= RSS_GROWTH_BOUND_KB


# -- RFC 4475 / 5118 through serve -----------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What serve must do with one message on one transport.

    ``statuses``: the final status must be one of these (None: nothing may come back at
    all).  ``forwarded``: it must reach the sink.  ``parsed``: well-formed, so any final
    answer except 400 (a downstream failure may be a 5xx: the foreign IPv6 hosts are
    unreachable in the namespace, and no ERROR line may come with it).  ``closed_ok``: over
    TCP, closing the connection without an answer is also right (RFC 4475 §3.1.2.3, §3.3.9).
    ``check``: a further predicate on the final response.
    """

    statuses: frozenset[int] | None = frozenset()
    forwarded: bool = False
    parsed: bool = False
    closed_ok: bool = False
    check: Callable[[bytes], bool] | None = None
    why: str = ""


def status(*codes: int, **kw: Any) -> Verdict:
    return Verdict(statuses=frozenset(codes), **kw)


SILENT = Verdict(statuses=None)
PARSED = Verdict(parsed=True)
FORWARDED = Verdict(forwarded=True)
UNOBSERVABLE = Verdict(statuses=frozenset(), why="top Via is TLS: the UDP answer goes to 5061")


def _contacts(response: bytes) -> list[str]:
    return [h.partition(b":")[2].strip().decode("latin-1")
            for h in fuzzserve.header_lines(response, b"contact")]


def _inside(response: bytes, needle: str, present: bool = True) -> bool:
    uris = [c[c.find("<") + 1: c.find(">")] for c in _contacts(response)]
    return bool(uris) and any(needle in u for u in uris) == present


#: (udp, tcp) verdicts.  Where RFC 4475 lets an element accept or reject, the choice is the
#: one test_rfc4475.py documents for the parser; serve's default routing (domain example.com,
#: nobody registered) answers what it accepts: 404 for our users, 403 for foreign ones from
#: foreign senders, and 403 for in-dialog requests that did not come through our
#: Record-Route and for preloaded routes (the relay policy: docs/security.md).
VERDICTS: dict[str, tuple[Verdict, Verdict]] = {
    # 3.1.1 valid
    # (in a dialog -- it has a To tag -- but not through our Record-Route: the relay policy)
    "wsinv": (status(403), status(403)),
    "intmeth": (PARSED, PARSED),
    "esc01": (PARSED, PARSED),
    "escnull": (status(200, check=lambda r: len(_contacts(r)) == 2),) * 2,
    "esc02": (PARSED, PARSED),
    "lwsdisp": (PARSED, PARSED),
    "longreq": (PARSED, PARSED),
    "dblreq": (status(200), status(200)),
    "semiuri": (PARSED, PARSED),
    "transports": (PARSED, PARSED),
    # (a preloaded Route from an unauthenticated, untrusted source: the relay policy)
    "mpart01": (status(403), status(403)),
    "unreason": (SILENT, SILENT),
    "noreason": (SILENT, SILENT),
    # 3.1.2 invalid
    "badinv01": (status(400), status(400)),
    "clerr": (status(400), Verdict(statuses=None, why="TCP: waits for the rest of the body")),
    "ncl": (status(400), status(400, closed_ok=True)),
    "scalar02": (status(400), status(400)),
    "scalarlg": (SILENT, SILENT),
    "quotbal": (status(400), status(400)),
    "ltgtruri": (status(400), status(400)),
    "lwsruri": (status(400), status(400)),
    "lwsstart": (status(400), status(400)),
    "trws": (status(400), status(400)),
    "escruri": (PARSED, PARSED),
    "baddate": (PARSED, PARSED),
    "regbadct": (status(400), status(400)),
    "badaspec": (PARSED, PARSED),
    "baddn": (status(400), status(400)),
    "badvers": (status(505), status(505)),
    "mismatch01": (status(400), status(400)),
    "mismatch02": (status(400, 501), status(400, 501)),
    "bigcode": (SILENT, SILENT),
    # 3.2-3.4 semantic
    "badbranch": (status(400, 404), status(400, 404)),
    "insuf": (status(400), status(400)),
    "unkscm": (status(416), status(416)),
    "novelsc": (status(416), status(416)),
    "unksm2": (status(400), status(400)),
    "bext01": (UNOBSERVABLE, status(420, check=lambda r: b"noProxiesSupportThis" in r)),
    "invut": (PARSED, PARSED),
    "regaut01": (status(200, 401), status(200, 401)),
    "multi01": (status(400), status(400)),
    "mcl01": (status(400), status(400, closed_ok=True)),
    "bcast": (SILENT, SILENT),
    "zeromf": (status(483), status(483)),
    "cparam01": (status(200, check=lambda r: _inside(r, "unknownparam", present=False)),) * 2,
    "cparam02": (status(200, check=lambda r: _inside(r, ";unknownparam")),) * 2,
    "regescrt": (status(200, check=lambda r: _inside(r, "?Route=%3Csip:sip.example.com%3E")),)
    * 2,
    "sdp01": (PARSED, PARSED),
    "inv2543": (PARSED, PARSED),
    # No Via and no CSeq: no response can be built, let alone routed (§8.2.6.2).
    "test": (SILENT, SILENT),
    # RFC 5118
    "5118-ipv6-good": (PARSED, PARSED),
    "5118-ipv6-bad": (status(400), status(400)),
    "5118-port-ambiguous": (PARSED, PARSED),
    "5118-port-unambiguous": (PARSED, PARSED),
    "5118-via-received-param-with-delim": (PARSED, PARSED),
    "5118-via-received-param-no-delim": (PARSED, PARSED),
    "5118-ipv6-in-sdp": (status(400), Verdict(statuses=None,
                                              why="Content-Length 268 > body: TCP waits")),
    "5118-mult-ip-in-header": (status(403), status(403)),
    "5118-mult-ip-in-sdp": (PARSED, PARSED),
    "5118-ipv4-mapped-ipv6": (PARSED, PARSED),
    "5118-ipv6-bug-abnf-3-colons": (PARSED, PARSED),
    "5118-ipv6-correct-abnf-2-colons": (PARSED, PARSED),
    # issue 9's own examples
    "x-to-space-in-host": (status(400), status(400)),
    "x-colonless-line": (status(400), status(400)),
    "x-2543-bad-from": (status(400), status(400)),
    "x-cancel-bad-to": (status(400), status(400)),
    "x-register-bad-contact": (status(400), status(400)),
}

def _final(entry: dict[str, Any]) -> tuple[int | None, bytes]:
    for r in entry["responses"]:
        if r["status"] is not None and r["status"] >= 200:
            return r["status"], base64.b64decode(r["data"])
    return None, b""


def _params() -> list[Any]:
    return [pytest.param(name, transport, id=f"{name}-{transport}")
            for name in VERDICTS for transport in ("udp", "tcp")]


def test_every_torture_message_has_a_verdict(torture: dict[str, Any]) -> None:
    names = set(fuzzserve.torture_messages()) | set(fuzzserve.SYNTHETIC)
    assert len(names) == 50 + 12 + len(fuzzserve.SYNTHETIC)
    assert set(VERDICTS) == names
    assert set(torture["results"]) == names
    for name, entry in torture["results"].items():
        assert set(entry) == {"udp", "tcp"}, name


@pytest.mark.parametrize(("name", "transport"), _params())
def test_torture_verdict_through_serve(torture: dict[str, Any], name: str,
                                       transport: str) -> None:
    verdict = VERDICTS[name][0 if transport == "udp" else 1]
    entry = torture["results"][name][transport]
    final, response = _final(entry)
    seen = f"{name}/{transport}: {[r['first'] for r in entry['responses']]} " \
           f"sink={[s['first'] for s in entry['sink']]} closed={entry['closed']}"
    assert not entry["errors"], (seen, [e["text"][:1500] for e in entry["errors"]])
    if verdict is UNOBSERVABLE:
        return
    if verdict.statuses is None:
        assert not entry["responses"] and not entry["sink"], seen
        return
    if verdict.forwarded:
        assert entry["sink"], seen
        assert final != 400, seen
        # A proxy never forwards a URI's escaped headers as headers (RFC 4475 3.1.2.11).
        for s in entry["sink"]:
            first = fuzzserve.first_line(base64.b64decode(s["data"]))
            assert "?" not in first.split(" ")[1], first
        return
    if verdict.parsed:
        assert final is not None or entry["sink"], seen
        assert final != 400, seen
        return
    if verdict.closed_ok and final is None:
        assert entry["closed"], seen
        return
    assert final in verdict.statuses, seen
    if verdict.check is not None:
        assert verdict.check(response), (seen, response.decode("latin-1"))


def test_torture_errors_are_all_tied_to_a_message(torture: dict[str, Any]) -> None:
    """Every ERROR record of the torture runs names the address of the message that caused
    it, so the per-message verdicts above see it (none is a background failure)."""
    for transport, scan in torture["log"].items():
        tied = sum(len(e[transport]["errors"]) for e in torture["results"].values())
        assert len(scan["errors"]) == tied, (transport, scan["groups"])


def test_escaped_route_is_never_forwarded_as_a_header(torture: dict[str, Any]) -> None:
    """RFC 4475 3.1.2.11 / 3.3.14: ``?Route=`` in a URI never becomes a Route header."""
    for entry in torture["results"].values():
        for transport in ("udp", "tcp"):
            for s in entry[transport]["sink"]:
                data = base64.b64decode(s["data"])
                assert not re.search(rb"\r\nRoute:\s*<sip:sip\.example\.com", data), data[:300]
