"""The proxy core and the default routing on a public address, sans-IO (the in-memory network
of test_proxy_net): the relay policy, stateless local answers, sanity checks ahead of
everything, bounded tables, and failed-login defence.  Each attack test asserts what did *not*
happen too: nothing reached the victim, no state was kept, no answer was repeated."""

from __future__ import annotations

import gc
import hashlib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_proxy_net import Net, Phone, ProxyNode, Raw, raw_request

from fastsip.app import Router
from fastsip.proxy import Credentials, DigestAuthenticator, MemoryLocationStore, Registrar
from fastsip.proxy.auth import digest_response
from fastsip.proxy.core import UNREACHABLE
from fastsip.proxy.edge import SourceGuard, TrustedNetworks
from fastsip.sip import Response
from fastsip.transport import Address
from fastsip.transport.rules import LOCAL_TAG_PREFIX, local_tag

DOMAIN = "example.com"
VICTIM = 5099          # a UDP "victim" of relay attempts: it must never receive anything


def edge(*, auth: bool = False, trusted: list[str] | None = None,
         guard: SourceGuard | None = None, **kw: object) -> tuple[Net, ProxyNode, Raw, Raw]:
    """A proxy for example.com with default routing (optionally digest auth), an attacker on
    127.0.0.1:5071 and a victim on 127.0.0.1:5099."""
    net = Net()
    registrar = Registrar(MemoryLocationStore(), domains=[DOMAIN])
    authenticator = None
    if auth:
        creds = Credentials()
        creds.add("alice", password="secret")
        authenticator = DigestAuthenticator(DOMAIN, creds, algorithms=("MD5",))
    router = Router(registrar=registrar, authenticator=authenticator, wallclock=lambda: 1000.0,
                    guard=guard)
    proxy = ProxyNode(net, router, aliases=[DOMAIN],
                      trusted=TrustedNetworks(trusted or []), **kw)
    attacker = Raw(net, "attacker", 5071)
    victim = Raw(net, "victim", VICTIM, auto=lambda r: r.reply(200, to_tag="v"))
    return net, proxy, attacker, victim


def victim_uri(user: str = "x") -> str:
    return f"sip:{user}@127.0.0.1:{VICTIM}"


# -- the relay policy -------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
def test_no_relay_to_a_foreign_uri_or_along_a_preloaded_route(auth: bool) -> None:
    net, _proxy, attacker, victim = edge(auth=auth)
    expected = 407 if auth else 403
    # A foreign Request-URI, From a foreign domain.
    attacker.send_to(raw_request("INVITE", victim_uri()).replace(
        "From: <sip:alice@127.0.0.1:5071>", "From: <sip:mallory@evil.example>"))
    # A Request-URI of ours, but a preloaded Route to the victim.
    attacker.send_to(raw_request("INVITE", f"sip:bob@{DOMAIN}",
                                 extra=f"Route: <sip:127.0.0.1:{VICTIM};lr>\n"))
    # Our own Route first, then the victim's: still a preloaded route elsewhere.
    attacker.send_to(raw_request("MESSAGE", f"sip:bob@{DOMAIN}",
                                 extra=f"Route: <sip:127.0.0.1:5060;lr>, "
                                       f"<sip:127.0.0.1:{VICTIM};lr>\n"))
    # A From that claims our domain, to a foreign URI.
    attacker.send_to(raw_request("MESSAGE", victim_uri()).replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>"))
    net.run(40.0)
    assert not victim.received, [m.start_line for m in victim.received]
    assert attacker.statuses() == [expected] * 4


def test_an_authenticated_user_may_relay_and_a_trusted_source_too() -> None:
    net, _proxy, attacker, victim = edge(auth=True, trusted=["127.0.0.2"])
    attacker.send_to(raw_request("MESSAGE", victim_uri(), call_id="m1").replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>"))
    net.run(0.1)
    [challenge] = attacker.responses()
    assert challenge.status_code == 407
    attacker.send_to(with_credentials(challenge, "MESSAGE", victim_uri(), "alice", "secret",
                                      call_id="m1"))
    net.run(0.1)
    assert len(victim.requests("MESSAGE")) == 1
    assert attacker.statuses() == [407, 200]
    # A trusted source (an SBC on 127.0.0.2) relays without credentials.
    sbc = Raw(net, "sbc", 5072)
    sbc.host = "127.0.0.2"
    net.nodes[("127.0.0.2", 5072)] = sbc
    sbc.send_to(raw_request("MESSAGE", victim_uri(), port=5072).replace("127.0.0.1:5072",
                                                                         "127.0.0.2:5072"))
    net.run(0.1)
    assert len(victim.requests("MESSAGE")) == 2 and sbc.statuses() == [200]


def test_in_dialog_requests_must_come_through_our_record_route() -> None:
    net, _proxy, attacker, victim = edge()
    # A BYE "in a dialog" (To tag) straight at the victim: 403, not loose-routed there.
    attacker.send_to(raw_request("BYE", victim_uri(), to_tag="t1"))
    # The same along a Route to the victim that does not name us first.
    attacker.send_to(raw_request("BYE", f"sip:bob@{DOMAIN}", to_tag="t2",
                                 extra=f"Route: <sip:127.0.0.1:{VICTIM};lr>\n"))
    # An ACK "for a 2xx" at the victim: dropped (never answered).
    attacker.send_to(raw_request("ACK", victim_uri(), to_tag="t3"))
    net.run(1.0)
    assert not victim.received
    assert attacker.statuses() == [403, 403]
    assert all(r.reason == "Forbidden (not routed through this proxy)"
               for r in attacker.responses())
    # Through our Record-Route (our Route first) it is loose-routed, as a dialog needs.
    attacker.send_to(raw_request("BYE", victim_uri(), to_tag="t4",
                                 extra="Route: <sip:127.0.0.1:5060;lr>\n"))
    net.run(1.0)
    assert len(victim.requests("BYE")) == 1


# -- stateless local answers ------------------------------------------------------------------


def test_local_negative_answers_are_stateless_one_datagram_no_state() -> None:
    net, proxy, attacker, _victim = edge(auth=True)
    # 50 INVITEs to nobody: each gets exactly one 404, never retransmitted (no Timer G),
    # and no transaction is left behind to be retransmitted or to hold memory.
    for n in range(50):
        attacker.send_to(raw_request("INVITE", f"sip:nobody{n}@{DOMAIN}"))
    net.run(40.0)
    assert attacker.statuses() == [404] * 50
    assert proxy.layer.server_transactions == 0 and proxy.proxy.pending == 0
    # A retransmitted INVITE gets the very same answer (same To tag), again statelessly.
    invite = raw_request("INVITE", f"sip:nobody@{DOMAIN}", branch="z9hG4bKretx")
    attacker.send_to(invite)
    attacker.send_to(invite)
    net.run(1.0)
    first, second = attacker.responses()[-2:]
    assert first.to is not None and second.to is not None
    assert first.to.tag == second.to.tag and first.to.tag.startswith(LOCAL_TAG_PREFIX)
    # Its ACK is recognized as ours and goes nowhere.
    attacker.send_to(raw_request("ACK", f"sip:nobody@{DOMAIN}", to_tag=first.to.tag,
                                 branch="z9hG4bKretx"))
    net.run(1.0)
    assert len(net.lines(sender="proxy")) == 52


def test_a_forged_via_draws_one_response_not_eleven() -> None:
    net, _proxy, attacker, _victim = edge(auth=True)
    reflector = Raw(net, "reflector", 5098)
    # The Via names the reflector (another port on our host): the challenge goes there once.
    attacker.send_to(raw_request("INVITE", f"sip:bob@{DOMAIN}").replace(
        "Via: SIP/2.0/UDP 127.0.0.1:5071", "Via: SIP/2.0/UDP 127.0.0.1:5098").replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>"))
    net.run(40.0)
    assert [r.status_code for r in reflector.responses()] == [407]


def test_options_to_us_answered_statelessly() -> None:
    net, proxy, attacker, _victim = edge()
    for _ in range(20):
        attacker.send_to(raw_request("OPTIONS", f"sip:{DOMAIN}"))
    net.run(0.1)
    assert attacker.statuses() == [200] * 20
    assert proxy.layer.server_transactions == 0


def test_settled_contexts_are_freed_by_reference_counting() -> None:
    net, _proxy, attacker, _victim = edge()
    gc.collect()
    gc.disable()
    try:
        for n in range(200):
            attacker.send_to(raw_request("INVITE", f"sip:nobody{n}@{DOMAIN}"))
            attacker.send_to(raw_request("OPTIONS", f"sip:{DOMAIN}"))
        net.run(40.0)
        # Nothing a request left behind needs the cyclic GC (serve runs it rarely).
        assert gc.collect() < 50
    finally:
        gc.enable()


# -- sanity checks before anything else ------------------------------------------------------


@pytest.mark.parametrize(("extra", "reason"), [
    ("Call-ID: second@test\n", "more than one Call-ID"),
    ("From: <sip:eve@evil.example>;tag=e\n", "more than one From"),
    ("To: <sip:eve@evil.example>\n", "more than one To"),
    ("CSeq: 2 INVITE\n", "more than one CSeq"),
    ("Max-Forwards: 69\n", "more than one Max-Forwards"),
    ("Contact: <sip:bob@exa mple.com>\n", "Bad Request ("),
    ("Route: <sip:bob@exa mple.com;lr>\n", "Bad Request ("),
    ("Via: SIP/2.0/UDP exa mple.com;branch=z9hG4bKx\n", "Bad Request ("),
])
def test_malformed_or_duplicated_headers_get_400_before_auth(extra: str, reason: str) -> None:
    net, proxy, attacker, victim = edge(auth=True)
    attacker.send_to(raw_request("INVITE", f"sip:bob@{DOMAIN}", extra=extra).replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>", 1))
    net.run(1.0)
    [response] = attacker.responses()
    assert response.status_code == 400 and reason in response.reason
    assert not victim.received and proxy.layer.server_transactions == 0


def test_bad_to_uri_gets_400_not_silence() -> None:
    net, _proxy, attacker, _victim = edge()
    attacker.send_to(raw_request("OPTIONS", f"sip:{DOMAIN}").replace(
        f"To: <sip:{DOMAIN}>", "To: <sip:bob@exa mple.com>"))
    net.run(0.5)
    [response] = attacker.responses()
    assert response.status_code == 400


def test_cancel_for_nothing_gets_481_statelessly() -> None:
    net, proxy, attacker, _victim = edge()
    attacker.send_to(raw_request("CANCEL", f"sip:bob@{DOMAIN}"))
    net.run(0.5)
    assert attacker.statuses() == [481] and proxy.layer.server_transactions == 0


# -- caps ------------------------------------------------------------------------------------


def test_server_transaction_cap_answers_503_statelessly() -> None:
    net, proxy, attacker, _victim = edge()
    proxy.layer.max_server_transactions = 10
    bob = Phone(net, "bob", 5080, lambda c: c.ring())   # rings forever: INVITEs stay open
    attacker.send_to(
        f"REGISTER sip:{DOMAIN} SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bKr\n"
        f"Max-Forwards: 70\nFrom: <sip:bob@{DOMAIN}>;tag=r\nTo: <sip:bob@{DOMAIN}>\n"
        "Call-ID: reg\nCSeq: 1 REGISTER\nContact: <sip:bob@127.0.0.1:5080>\n"
        "Content-Length: 0\n\n")
    net.run(0.1)
    for n in range(15):
        attacker.send_to(raw_request("INVITE", f"sip:bob@{DOMAIN}", call_id=f"c{n}"))
    net.run(0.2)
    statuses = attacker.statuses()
    assert statuses.count(503) >= 5
    assert proxy.layer.server_transactions <= 10
    assert len(bob.calls) <= 10
    assert all(r.headers.get("Retry-After") for r in attacker.responses()
               if r.status_code == 503)


# -- password guessing ------------------------------------------------------------------------


def with_credentials(challenge: Response, method: str, uri: str, user: str, password: str, *,
                     call_id: str, cseq: int = 2, register: bool = False) -> str:
    header = "WWW-Authenticate" if challenge.status_code == 401 else "Proxy-Authenticate"
    value = challenge.headers.getall(header)[-1]
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', value))
    realm, nonce = params["realm"], params["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    response = digest_response("MD5", ha1, nonce, method, uri, qop="auth", nc="00000001",
                               cnonce="c0ffee")
    cred = (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="c0ffee", '
            f'opaque="{params["opaque"]}"')
    name = "Authorization" if register else "Proxy-Authorization"
    return raw_request(method, uri, cseq=cseq, call_id=call_id,
                       extra=f"{name}: {cred}\n").replace(
        "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:{user}@{DOMAIN}>")


def test_a_password_guesser_is_stopped_and_the_real_user_is_not() -> None:
    guard = SourceGuard(rate=0, user_failures=5, source_failures=10)
    net, _proxy, attacker, victim = edge(auth=True, guard=guard)
    uri = victim_uri()
    answers = []
    for n in range(12):
        attacker.send_to(raw_request("MESSAGE", uri, call_id=f"g{n}").replace(
            "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:alice@{DOMAIN}>"))
        net.run(net.wheel.time() + 0.05)
        challenge = attacker.responses()[-1]
        if challenge.status_code != 407:
            answers.append(challenge.status_code)
            continue
        attacker.send_to(with_credentials(challenge, "MESSAGE", uri, "alice", f"guess{n}",
                                          call_id=f"g{n}"))
        net.run(net.wheel.time() + 0.05)
        answers.append(attacker.responses()[-1].status_code)
    # Five guesses are checked (a wrong one gets a fresh 407), the fifth blocks alice from
    # there (403, no nonce to guess with); no guess got through, and the source is banned
    # at the tenth failure (the shell then drops whatever it sends).
    assert answers[:4] == [407] * 4 and answers[4:] == [403] * 8
    assert guard.banned("127.0.0.1", net.wheel.time())
    assert not victim.received
    # Meanwhile alice herself, from her phone elsewhere, still gets through.
    phone = Raw(net, "phone", 5073)
    phone.host = "127.0.0.3"
    net.nodes[("127.0.0.3", 5073)] = phone
    first = raw_request("MESSAGE", uri, call_id="real", port=5073).replace(
        "From: <sip:alice@127.0.0.1:5073>", f"From: <sip:alice@{DOMAIN}>").replace(
        "127.0.0.1:5073", "127.0.0.3:5073")
    phone.send_to(first)
    net.run(net.wheel.time() + 0.05)
    [challenge] = phone.responses()
    phone.send_to(with_credentials(challenge, "MESSAGE", uri, "alice", "secret",
                                   call_id="real").replace("127.0.0.1:5071", "127.0.0.3:5073"))
    net.run(net.wheel.time() + 0.05)
    assert phone.statuses() == [407, 200] and len(victim.requests("MESSAGE")) == 1


def test_an_unreachable_next_hop_is_503_a_downstream_503_is_500() -> None:
    net, proxy, attacker, _victim = edge(trusted=["127.0.0.1"])
    attacker.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5097"))    # nobody listens
    net.run(0.01)
    proxy.layer.transport_error(Address("UDP", "127.0.0.1", 5097))      # as the shell reports
    net.run(0.1)
    [unreachable] = attacker.responses()
    assert unreachable.status_code == 503 and unreachable.reason == UNREACHABLE
    # A 503 from a downstream server means *it* is overloaded: 500 upstream (§16.7 step 6).
    Raw(net, "busy", 5096, auto=lambda r: r.reply(503, to_tag="busy"))
    attacker.send_to(raw_request("MESSAGE", "sip:x@127.0.0.1:5096"))
    net.run(0.1)
    assert attacker.statuses()[-1] == 500


def test_bytes_that_are_not_utf8_get_their_answer() -> None:
    # Tags and Call-IDs off the wire may hold any byte; hashing them for the stateless To
    # tag and the loop check must not fail (it did: UnicodeEncodeError, no answer).
    net, proxy, attacker, _victim = edge()
    raw = raw_request("INVITE", f"sip:%ff@{DOMAIN}", branch="1234")  # RFC 2543: no cookie
    data = raw.replace("\n", "\r\n").encode().replace(b"Call-ID: ", b"Call-ID: \xff\xfe", 1)
    attacker.send_to(data)
    net.run(0.5)
    assert attacker.statuses() == [404] and proxy.layer.server_transactions == 0


def test_rfc4475_zeromf_max_forwards_zero_to_a_user_is_483() -> None:
    net, _proxy, attacker, _victim = edge()
    attacker.send_to(raw_request("OPTIONS", f"sip:user@{DOMAIN}", max_forwards=0))
    attacker.send_to(raw_request("OPTIONS", f"sip:{DOMAIN}", max_forwards=0))   # to us: answered
    net.run(0.5)
    assert attacker.statuses() == [483, 200]


def test_the_ack_for_any_answer_of_ours_goes_nowhere_even_from_a_trusted_source() -> None:
    # A stateless answer (ours, or the transport's 400 to a malformed request) leaves no
    # transaction to absorb its ACK: the tag says it is ours, so it is not forwarded.
    net, _proxy, attacker, victim = edge(trusted=["127.0.0.1"])
    attacker.send_to(raw_request("ACK", victim_uri(), to_tag=local_tag()))
    attacker.send_to(raw_request("ACK", victim_uri(), to_tag="theirs"))   # a 2xx's ACK: on
    net.run(0.5)
    assert [r.headers.get("To") for r in victim.requests("ACK")] == \
        [f"<{victim_uri()}>;tag=theirs"]
