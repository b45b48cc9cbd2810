"""Type stub for the compiled relay packet path (fastsip/rtp/_relay.pyx)."""

from typing import Final, Literal, TypedDict, type_check_only

LATCH_OFF: Final[int]
LATCH_FIRST: Final[int]
LATCH_STRICT: Final[int]
batched: Final[bool]
"""True where recvmmsg/sendmmsg move a batch per system call (Linux); elsewhere per datagram."""
uring_compiled: Final[bool]
"""True where the io_uring packet path is built in (Linux); whether it runs is Relay.backend."""
BACKEND_ENV: Final[str]
"""The environment variable that, set to ``mmsg``, makes backend="auto" skip io_uring."""
THREAD_ENV: Final[str]
"""The environment variable that, set to ``0``, makes ``Relay(threaded=True)`` loop-driven."""
TWIN_ENV: Final[str]
"""The environment variable that, set to ``0``, makes io_uring send with the address from each
leg's own socket instead of a connected twin."""

@type_check_only
class LegStats(TypedDict, total=False):
    # every leg
    packets: int          # datagrams received (a too-long one is only an error)
    bytes: int
    errors: int           # received but not relayed (too long, strict-dropped, nowhere to
    #                       send, family mismatch, send failed) and receive errors
    #                       (a connected socket's include its peer's ICMP unreachables)
    sent: int             # datagrams sent out of this leg's fd (its partner's traffic)
    last_packet: float    # `now` of the last drain that read a datagram; 0.0 if none
    peer: tuple[str, int] | None      # where this leg's remote end is sent to now
    sdp_peer: tuple[str, int] | None  # what set_peer gave
    latched: bool
    connected: bool       # sends leave a socket connected to the latched peer (io_uring)
    # RTP legs: RFC 3550 receive figures of the current SSRC
    ssrc: int | None
    lost: int             # cumulative (expected - received)
    jitter: float         # milliseconds
    expected: int
    received: int

class Relay:
    def __init__(self, batch: int = 64, *, max_batches: int = 8,
                 backend: Literal["auto", "io_uring", "io_uring_coop", "mmsg"] = "auto",
                 threaded: bool = False) -> None: ...
    @property
    def backend(self) -> Literal["io_uring", "mmsg"]: ...
    @property
    def deferred(self) -> bool: ...
    @property
    def threaded(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def add_leg(self, leg: int, fd: int, *, rtcp: bool = False) -> None: ...
    def set_peer(self, leg: int, host: str, port: int) -> None: ...
    def set_latching(self, leg: int, mode: int) -> None: ...
    def bridge(self, leg_a: int, leg_b: int) -> None: ...
    def set_clock_rate(self, leg: int, rate: int) -> None: ...
    def fileno(self) -> int: ...
    def poll(self, now: float) -> int: ...
    def drain(self, leg: int, now: float) -> int: ...
    def stats(self, leg: int) -> LegStats: ...
    def remove_leg(self, leg: int) -> None: ...
    @property
    def legs(self) -> int: ...
