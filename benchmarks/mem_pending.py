"""Memory per pending proxied INVITE in ``fastsip serve``: what one slot of
``--max-transactions`` costs, for sizing that cap (docs/security.md states the bound).

    python benchmarks/mem_pending.py [--invites 20000]

serve (default options, its caller in ``--trusted`` so no rate limit applies) forwards N
INVITEs to a UDP socket that never answers, so every one holds a server transaction, a
client transaction (retransmitting) and a response context; the RSS growth divided by N is
the cost of one pending call.  Loopback only; Linux (/proc).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from procutil import fastsip_env, free_port


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(invites: int) -> tuple[int, int]:
    """(RSS before, RSS after) in kB with ``invites`` INVITEs pending."""
    port = free_port()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.3", 0))
    sink_port = sink.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        serve = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:127.0.0.1:{port}",
             "--domain", "example.com", "--trusted", "127.0.0.1",
             "--max-transactions", str(max(50_000, invites + 100))],
            cwd=workdir, env=fastsip_env(), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        try:
            assert serve.stdout is not None and serve.stdout.readline().startswith("listening")
            caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            caller.bind(("127.0.0.1", 0))
            me = caller.getsockname()[1]
            sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                   "m=audio 4000 RTP/AVP 0\r\n")
            time.sleep(0.5)
            before = rss_kb(serve.pid)
            for i in range(invites):
                caller.sendto((
                    f"INVITE sip:u{i}@127.0.0.3:{sink_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK-mem{i};rport\r\n"
                    f"Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag={i}\r\n"
                    f"To: <sip:u{i}@127.0.0.3>\r\nCall-ID: mem{i}@bench\r\nCSeq: 1 INVITE\r\n"
                    f"Contact: <sip:a@127.0.0.1:{me}>\r\nContent-Type: application/sdp\r\n"
                    f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode(), ("127.0.0.1", port))
                if i % 200 == 199:
                    time.sleep(0.02)          # paced: nothing may be lost in the socket buffer
            time.sleep(2.0)
            return before, rss_kb(serve.pid)
        finally:
            serve.terminate()
            serve.wait(10)
            sink.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--invites", type=int, default=20_000)
    args = ap.parse_args()
    before, after = measure(args.invites)
    per = (after - before) * 1024 / args.invites
    print(f"{args.invites} pending proxied INVITEs: RSS {before} -> {after} kB, "
          f"{per:.0f} bytes each; at --max-transactions 50000: ~{before / 1024 + per * 50_000 / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
