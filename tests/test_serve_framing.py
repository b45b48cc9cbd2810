"""A message that came by UDP without Content-Length and leaves by TCP is framed (RFC 3261
§18.3, §20.14): a real ``fastsip serve``, a phone registered over TCP, another on UDP.

Over UDP a body may go without Content-Length (it is the rest of the datagram); over TCP the
header alone frames a message, so a proxy that passed such a message on unchanged would have
its body read as the next message on the connection: the phone would see garbage, and the
response that follows would be lost in it (the fuzz run of issue 9 caught serve doing that
when a fuzzed MESSAGE reached a user registered over TCP).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import DOMAIN, HOST, Serve

from fastsip import message_length, parse
from fastsip.sip import Request, Response

BODY = b"Watson, come here."


def _head(method: str, uri: str, via: str, call_id: str, to: str, extra: str = "") -> bytes:
    return (f"{method} {uri} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:tester@{DOMAIN}>;tag=f-{call_id}\r\nTo: <{to}>\r\n"
            f"Call-ID: {call_id}@{HOST}\r\nCSeq: 1 {method}\r\n{extra}").encode()


class StreamReader:
    """Messages from a TCP socket, framed as serve frames them (:func:`message_length`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self, timeout: float = 5.0) -> Request | Response:
        deadline = time.monotonic() + timeout
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            if self.buf:
                n = message_length(self.buf)
                if 0 < n <= len(self.buf):
                    data, self.buf = self.buf[:n], self.buf[n:]
                    return parse(data)
            left = deadline - time.monotonic()
            assert left > 0, f"no whole message within {timeout}s: {self.buf[:300]!r}"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; left over: {self.buf[:300]!r}"
            self.buf += chunk


def _udp_final(sock: socket.socket, timeout: float = 5.0) -> Response:
    sock.settimeout(timeout)
    while True:
        msg = parse(sock.recv(65536))
        if isinstance(msg, Response) and msg.status_code >= 200:
            return msg


def test_udp_bodies_without_content_length_are_framed_on_tcp(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, port, tcp=True)
    try:
        with socket.create_connection((HOST, port), timeout=5) as alice, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bob:
            bob.bind((HOST, 0))
            bob_port = bob.getsockname()[1]
            a_port = alice.getsockname()[1]
            alice_in = StreamReader(alice)
            # alice registers over TCP (her contact is the connection's address), bob over UDP.
            alice.sendall(_head("REGISTER", f"sip:{DOMAIN}",
                                f"SIP/2.0/TCP {HOST}:{a_port};branch=z9hG4bK-ra",
                                "ra", f"sip:alice@{DOMAIN}",
                                f"Contact: <sip:alice@{HOST}:{a_port};transport=tcp>\r\n"
                                "Expires: 600\r\nContent-Length: 0\r\n") + b"\r\n")
            ok = alice_in.next()
            assert isinstance(ok, Response) and ok.status_code == 200, bytes(ok)
            bob.sendto(_head("REGISTER", f"sip:{DOMAIN}",
                             f"SIP/2.0/UDP {HOST}:{bob_port};branch=z9hG4bK-rb", "rb",
                             f"sip:bob@{DOMAIN}",
                             f"Contact: <sip:bob@{HOST}:{bob_port}>\r\nExpires: 600\r\n"
                             "Content-Length: 0\r\n") + b"\r\n", (HOST, port))
            assert _udp_final(bob).status_code == 200

            # 1. bob -> alice: a UDP MESSAGE whose body has no Content-Length.
            bob.sendto(_head("MESSAGE", f"sip:alice@{DOMAIN}",
                             f"SIP/2.0/UDP {HOST}:{bob_port};branch=z9hG4bK-m1", "m1",
                             f"sip:alice@{DOMAIN}", "Content-Type: text/plain\r\n")
                       + b"\r\n" + BODY, (HOST, port))
            message = alice_in.next()
            assert isinstance(message, Request) and message.method == "MESSAGE", bytes(message)
            assert message.headers.get("Content-Length") == str(len(BODY))
            assert bytes(message.body) == BODY
            # Nothing of the body is left to be read as a message of its own.
            assert alice_in.buf.strip(b"\r\n") == b"", alice_in.buf
            alice.sendall(bytes(message.reply(200, to_tag="a1")))
            assert _udp_final(bob).status_code == 200

            # 2. alice -> bob over TCP; bob's UDP 200 carries a body and no Content-Length.
            alice.sendall(_head("MESSAGE", f"sip:bob@{DOMAIN}",
                                f"SIP/2.0/TCP {HOST}:{a_port};branch=z9hG4bK-m2", "m2",
                                f"sip:bob@{DOMAIN}",
                                f"Content-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n")
                          + b"\r\n" + BODY)
            bob.settimeout(5)
            data = bob.recv(65536)
            forwarded = parse(data)
            assert isinstance(forwarded, Request) and forwarded.method == "MESSAGE"
            vias = b"".join(b"Via: " + str(v).encode() + b"\r\n" for v in forwarded.via)
            answer = (b"SIP/2.0 200 OK\r\n" + vias +
                      f"From: {forwarded.headers['From']}\r\nTo: {forwarded.headers['To']};tag=b1"
                      f"\r\nCall-ID: {forwarded.call_id}\r\nCSeq: 1 MESSAGE\r\n"
                      "Content-Type: text/plain\r\n\r\n".encode() + b"pong")
            bob.sendto(answer, (HOST, port))
            # Then another request follows on alice's connection at once: it must frame too.
            bob.sendto(_head("OPTIONS", f"sip:alice@{DOMAIN}",
                             f"SIP/2.0/UDP {HOST}:{bob_port};branch=z9hG4bK-o3", "o3",
                             f"sip:alice@{DOMAIN}", "Content-Length: 0\r\n") + b"\r\n",
                       (HOST, port))
            got = [alice_in.next(), alice_in.next()]
            final = next(m for m in got if isinstance(m, Response))
            options = next(m for m in got if isinstance(m, Request))
            assert final.status_code == 200 and bytes(final.body) == b"pong", bytes(final)
            assert final.headers.get("Content-Length") == "4"
            assert options.method == "OPTIONS", bytes(options)
    finally:
        serve.close()
    assert "Traceback" not in serve.log()
