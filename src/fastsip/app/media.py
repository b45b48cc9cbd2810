"""``fastsip media``: an RTP/RTCP relay driven over rtpengine's ng control protocol.

Kamailio's ``rtpengine`` module, OpenSIPS's, or ``fastsip serve --media`` send it ``offer``,
``answer``, ``delete`` and ``query`` commands; it allocates port pairs on its
``--interface`` addresses, rewrites the SDP and relays both directions with latching.  The
packet path is compiled and batched (:mod:`fastsip.rtp._relay`); this module only parses the
options and assembles the shell (:mod:`fastsip.asyncio.media`) with the ng core
(:mod:`fastsip.relay`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
import time
from typing import Any

from fastsip.app import logqueue

__all__ = ["add_parser", "run"]

log = logging.getLogger("fastsip.app.media")

EXIT_FAILED = 1
EXIT_USAGE = 2

#: rtpengine's conventional ng port (Kamailio's examples: ``udp:127.0.0.1:2223``).
DEFAULT_NG = "127.0.0.1:2223"


def _fail(message: str) -> None:
    logqueue.flush()
    print(f"fastsip media: {message}", file=sys.stderr, flush=True)


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` (or a bare host with ``default_port``)."""
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not port:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: bad port {port!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


async def run(args: argparse.Namespace) -> int:
    """Run the relay until SIGTERM/SIGINT; returns the exit status."""
    from fastsip.asyncio import StopSignals

    with StopSignals() as stop:
        return await _media(args, stop)


async def _media(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from fastsip.asyncio.media import NgServer, SocketMediaPlane, parse_interface
    from fastsip.relay.calls import CallRegistry
    from fastsip.relay.ng import NgControl
    from fastsip.rtp import _relay

    try:
        interfaces = [parse_interface(spec) for spec in args.interface]
        ng_host, ng_port = parse_host_port(args.ng)
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    names = [i.name for i in interfaces]
    if len(set(names)) != len(names):
        _fail(f"--interface: the names must differ ({', '.join(names)}); name them "
              "NAME/ADDRESS")
        return EXIT_USAGE
    if args.port_min >= args.port_max or args.port_min < 1024 or args.port_max > 65535:
        _fail(f"--port-min/--port-max: {args.port_min}-{args.port_max} is not a range of "
              "ports above 1023")
        return EXIT_USAGE
    loop = asyncio.get_running_loop()
    # The packet thread relays a batch only while it holds the GIL: this thread (ng commands,
    # timers) hands it over within 1 ms rather than Python's default 5 ms, which bounds what
    # a long ng command adds to RTP's latency.
    sys.setswitchinterval(0.001)
    plane = SocketMediaPlane(interfaces, args.port_min, args.port_max, loop=loop,
                             threaded=True)
    calls = CallRegistry(plane)
    control = NgControl(calls)
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: NgServer(control.receive), local_addr=(ng_host, ng_port))
    except OSError as exc:
        plane.close_all()            # the packet thread too
        _fail(f"cannot listen for ng commands on {args.ng}: {exc.strerror or exc}")
        return EXIT_FAILED
    if not ipaddress.ip_address(ng_host).is_loopback:
        # Whoever reaches this socket can open ports and redirect any call's media: it
        # belongs on a trusted network, as rtpengine's listen-ng does.
        log.warning("the ng control socket %s is not on loopback: only trusted proxies may "
                    "reach it (firewall it)", args.ng)
    log.info("fastsip media: ng on udp:%s; interfaces %s; ports %d-%d; %s packet path",
             args.ng, ", ".join(f"{i.name}={i.address}"
                                + (f"!{i.advertised}" if i.advertised != i.address else "")
                                for i in interfaces),
             args.port_min, args.port_max,
             "io_uring, own thread" if plane.relay.threaded
             else "io_uring" if plane.relay.backend == "io_uring"
             else "batched (recvmmsg/sendmmsg)" if _relay.batched else "per-datagram")
    logqueue.flush()  # the start-up lines are out before we say we are up
    host = f"[{ng_host}]" if ":" in ng_host else ng_host
    print(f"listening on udp:{host}:{transport.get_extra_info('sockname')[1]} (ng)", flush=True)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            # Wall-clock time, as everywhere in the relay: ng replies report Unix times.
            for expired in calls.expire(time.time(), args.timeout):
                log.info("call %s: no media for %gs: deleted", _show(expired), args.timeout)
    finally:
        transport.close()
        n = len(calls)
        for call in list(calls.calls.values()):
            calls.delete(call)
        plane.close_all()
        log.info("fastsip media: stopped (%d calls deleted)", n)
    return 0


def _show(call: Any) -> str:
    return str(getattr(call, "call_id", call))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1-65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "media",
        help="an RTP/RTCP relay driven over rtpengine's ng protocol",
        description="An RTP/RTCP media relay for SIP proxies: Kamailio's or OpenSIPS's "
                    "rtpengine module, or 'fastsip serve --media', drive it over the ng "
                    "control protocol (offer, answer, delete, query, ping).  It allocates an "
                    "RTP/RTCP port pair per stream and side, rewrites the SDP, and relays "
                    "both directions with latching (each side's media goes to where its "
                    "packets come from).",
        epilog="examples:\n"
               "  fastsip media --interface 192.0.2.10\n"
               "  fastsip media --interface internal/10.0.0.5 "
               "--interface external/10.0.1.5!203.0.113.5 --ng 127.0.0.1:2223\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interface", action="append", required=True,
                   metavar="[NAME/]ADDRESS[!ADVERTISED]",
                   help="an address to relay media on; repeat for more (the ng 'direction' "
                        "option names them).  '!ADVERTISED' is the address written in the SDP "
                        "when the relay is behind 1:1 NAT")
    p.add_argument("--ng", default=DEFAULT_NG, metavar="HOST:PORT",
                   help=f"the ng control socket, UDP (default {DEFAULT_NG}); only trusted "
                        "proxies may reach it")
    p.add_argument("--port-min", type=_port, default=30000,
                   help="lowest media port (default 30000)")
    p.add_argument("--port-max", type=_port, default=40000,
                   help="highest media port (default 40000)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="S",
                   help="delete a call whose streams carried no media for S seconds "
                        "(default 60, as rtpengine)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log detail on stderr (default info)")
    from fastsip.asyncio import LOOPS

    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: uvloop when installed (auto), or plain asyncio")
    p.set_defaults(func=run)
    return p
