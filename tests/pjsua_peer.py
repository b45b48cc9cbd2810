"""One PJSIP user agent (the ``pjsua2`` Python binding) as a process, for the real-client tests.

The tests run it as a child: PJSIP is a C library with its own sockets and timers, and a crash
or a hang in it must not take pytest down, so everything PJSIP does happens here.  The options
set up one account (its transport, outbound proxy, registrar, TLS files, how it answers); the
test then drives it with commands on stdin, one a line::

    call URI        place a call (INVITE) to URI
    hangup [CODE]   end the call: CANCEL while ringing, BYE once established, or reject an
                    incoming call with CODE (default: PJSIP's, 603)
    answer CODE     answer the incoming call with CODE (180, 200, 486 ...)
    quit            unregister and stop

and reads what happens on stdout, one event a line, each starting with ``EVENT``::

    EVENT READY transport=udp local=127.0.0.1:PORT
    EVENT REG code=200 expires=300 reason=OK
    EVENT INCOMING from=<sip:alice@example.com>
    EVENT CALL state=CONFIRMED code=200 reason=OK
    EVENT ERROR text
    EVENT EXIT

PJSIP's own log (SIP messages included) goes to ``--log``; nothing else is printed on stdout.
PJSIP runs without worker threads: the main loop polls it (``libHandleEvents``) in short
slices and executes the queued commands between them, so every callback comes on the main
thread and the process ends by ``--lifetime`` at the latest, whatever the test does.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from typing import Any

import pjsua2 as pj

TRANSPORTS = {
    ("udp", 4): pj.PJSIP_TRANSPORT_UDP, ("udp", 6): pj.PJSIP_TRANSPORT_UDP6,
    ("tcp", 4): pj.PJSIP_TRANSPORT_TCP, ("tcp", 6): pj.PJSIP_TRANSPORT_TCP6,
    ("tls", 4): pj.PJSIP_TRANSPORT_TLS, ("tls", 6): pj.PJSIP_TRANSPORT_TLS6,
}

STATE_NAMES = {
    pj.PJSIP_INV_STATE_NULL: "NULL", pj.PJSIP_INV_STATE_CALLING: "CALLING",
    pj.PJSIP_INV_STATE_INCOMING: "INCOMING", pj.PJSIP_INV_STATE_EARLY: "EARLY",
    pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING", pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
    pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
}


def emit(*words: Any) -> None:
    print("EVENT", *words, flush=True)


class Peer:
    """The account and its calls (at most one at a time: the tests need no more)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calls: list[Call] = []     # PJSIP holds no Python reference to them: we do
        self.account: Account | None = None

    def answer(self, call: Call, code: int) -> None:
        prm = pj.CallOpParam()
        prm.statusCode = code
        call.answer(prm)

    def on_incoming(self, call: Call) -> None:
        self.calls.append(call)
        emit("INCOMING", f"from={call.getInfo().remoteUri}")
        for code in self.args.answer:
            self.answer(call, code)

    def current(self) -> Call | None:
        for call in reversed(self.calls):
            if call.isActive():
                return call
        return None

    def command(self, line: str) -> bool:
        """Execute one stdin command; False when it is ``quit``."""
        words = line.split()
        if not words:
            return True
        verb = words[0]
        if verb == "quit":
            return False
        if verb == "call" and len(words) == 2:
            assert self.account is not None
            outgoing = Call(self, self.account)
            self.calls.append(outgoing)
            outgoing.makeCall(words[1], pj.CallOpParam(True))
            return True
        call = self.current()
        if call is None:
            emit("ERROR", f"no call for {line!r}")
        elif verb == "answer" and len(words) == 2:
            self.answer(call, int(words[1]))
        elif verb == "hangup":
            prm = pj.CallOpParam()
            prm.statusCode = int(words[1]) if len(words) > 1 else 0   # 0: PJSIP's choice
            call.hangup(prm)
        else:
            emit("ERROR", f"unknown command {line!r}")
        return True


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self, peer: Peer) -> None:
        super().__init__()
        self.peer = peer

    def onRegState(self, prm: Any) -> None:
        emit("REG", f"code={prm.code}", f"expires={prm.expiration}", f"reason={prm.reason}")

    def onIncomingCall(self, prm: Any) -> None:
        self.peer.on_incoming(Call(self.peer, self, prm.callId))


class Call(pj.Call):  # type: ignore[misc]
    def __init__(self, peer: Peer, account: Account, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(account, call_id)
        self.peer = peer

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        emit("CALL", f"state={STATE_NAMES.get(info.state, info.state)}",
             f"code={info.lastStatusCode}", f"reason={info.lastReason}")


def read_stdin(commands: queue.Queue[str | None]) -> None:
    """Commands arrive on their own thread (it never touches PJSIP); EOF means quit."""
    for line in sys.stdin:
        commands.put(line.strip())
    commands.put(None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--user", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    p.add_argument("--bind", default="127.0.0.1", help="local address (an IPv6 one: v6 transport)")
    p.add_argument("--proxy", default="", help="outbound proxy URI, e.g. sip:127.0.0.1:5060;lr")
    p.add_argument("--registrar", required=True, help="registrar URI (the REGISTER's R-URI)")
    p.add_argument("--ca", default="", help="CA list file (TLS)")
    p.add_argument("--cert", default="", help="our certificate (TLS)")
    p.add_argument("--key", default="", help="our private key (TLS)")
    p.add_argument("--verify-server", action="store_true")
    p.add_argument("--answer", type=lambda s: [int(c) for c in s.split(",") if c], default=[],
                   help="answer an incoming call at once with these codes, e.g. 180,200")
    p.add_argument("--no-nat-rewrite", action="store_true",
                   help="keep Contact and Via when the registrar's Via says received/rport "
                   "differ (PJSIP's rewrite asserts on TCP over IPv6 in the PyPI wheel; a UA "
                   "behind a NAT that does not learn its public address)")
    p.add_argument("--public-address", default="",
                   help="the address to put in Via, Contact and SDP instead of the bound one "
                   "(a UA behind NAT that believes it is reached there)")
    p.add_argument("--lifetime", type=float, default=60.0, help="exit after this many seconds")
    p.add_argument("--log", default="", help="PJSIP's log file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.lifetime
    family = 6 if ":" in args.bind else 4
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0          # polled from the main loop below
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.userAgent = "pjsua2-peer"
    cfg.logConfig.consoleLevel = 0      # stdout carries only our events
    cfg.logConfig.level = 5 if args.log else 0
    cfg.logConfig.filename = args.log
    cfg.medConfig.noVad = True
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()     # no sound card here

    tcfg = pj.TransportConfig()
    tcfg.port = 0
    tcfg.boundAddress = args.bind
    tcfg.publicAddress = args.public_address
    if args.transport == "tls":
        tls = tcfg.tlsConfig
        tls.CaListFile = args.ca
        tls.certFile = args.cert
        tls.privKeyFile = args.key
        tls.verifyServer = args.verify_server
    tid = ep.transportCreate(TRANSPORTS[(args.transport, family)], tcfg)
    ep.libStart()
    local = ep.transportGetInfo(tid).localName
    emit("READY", f"transport={args.transport}", f"local={local}")

    peer = Peer(args)
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{args.user}@{args.domain}"
    acfg.regConfig.registrarUri = args.registrar
    acfg.regConfig.timeoutSec = 300
    acfg.regConfig.retryIntervalSec = 0     # one attempt: a failure is the test's answer
    acfg.regConfig.unregWaitMsec = 1000
    if args.proxy:
        acfg.sipConfig.proxies.append(args.proxy)
    acfg.sipConfig.transportId = tid
    # RTP on IPv4 loopback even when SIP is on IPv6: the wheel's PJSIP opens IPv6 SIP
    # transports but is built without IPv6 media (an account asking for it fails an assertion).
    acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acfg.mediaConfig.transportConfig.port = 0
    if args.no_nat_rewrite:
        acfg.natConfig.contactRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.sdpNatRewriteUse = 0
    account = Account(peer)
    peer.account = account
    account.create(acfg)

    commands: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_stdin, args=(commands,), daemon=True).start()
    running = True
    try:
        while running and time.monotonic() < deadline:
            ep.libHandleEvents(20)
            while running:
                try:
                    line = commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    running = line is not None and peer.command(line)
                except pj.Error as e:
                    emit("ERROR", e.info().replace("\n", " "))
        if running:
            emit("ERROR", f"lifetime of {args.lifetime:g} s over")
        ep.hangupAllCalls()
        for _ in range(25):                 # let the BYE/CANCEL leave
            ep.libHandleEvents(20)
        account.shutdown()
    finally:
        peer.calls.clear()
        ep.libDestroy()
        emit("EXIT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
