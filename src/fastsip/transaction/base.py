"""What the transaction machines share with their users, in plain Python: the timer values,
the state names, the branch cookie and the overload counter.

The machines themselves are compiled (:mod:`fastsip.transaction._layer`); these stay Python
because nothing on the per-message path calls them, and users build and read them.  So does
the one builder of the two requests made from an INVITE hop by hop (CANCEL, and the ACK of a
non-2xx final response), which the transaction layer, the UA and the proxy all need.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from fastsip.sip import Request

__all__ = [
    "ACCEPTED",
    "CALLING",
    "COMPLETED",
    "CONFIRMED",
    "MAGIC_COOKIE",
    "PROCEEDING",
    "TERMINATED",
    "TRYING",
    "Refusals",
    "TimerConfig",
    "hop_by_hop_request",
    "new_branch",
]

MAGIC_COOKIE = "z9hG4bK"


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie and 64 random bits (§8.1.1.7)."""
    return MAGIC_COOKIE + os.urandom(8).hex()


def hop_by_hop_request(invite: Request, method: str, *, to: str | None = None,
                       headers: Iterable[tuple[str, str]] = ()) -> Request:
    """A CANCEL (§9.1) or the ACK of a non-2xx final response (§17.1.1.3) for ``invite``: its
    Request-URI, Call-ID, From, CSeq number, single top Via (same branch: the request goes
    where the INVITE went, and matches its transaction there) and Route set; To as in the
    INVITE, or ``to`` (the ACK takes the response's, with its tag); ``headers`` added last."""
    cseq = invite.cseq
    hdrs = [("Via", str(invite.via[0]))]
    hdrs += [("Route", str(r)) for r in invite.route]
    hdrs += [
        ("Max-Forwards", "70"),
        ("From", invite.headers.get("From") or ""),
        ("To", to if to is not None else invite.headers.get("To") or ""),
        ("Call-ID", invite.call_id or ""),
        ("CSeq", f"{cseq.seq if cseq is not None else 0} {method}"),
        *headers,
    ]
    return Request.create(method, str(invite.uri), hdrs)


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1 (RTT estimate), T2 (maximum retransmit interval for non-INVITE requests and INVITE
    responses) and T4 (maximum duration a message stays in the network), §17.1.1.1."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J (unreliable), L, M."""
        return 64 * self.t1


# States (RFC 3261 figures 5-8, RFC 6026 figures 5 and 7), as a transaction's ``state`` reads.
CALLING = "calling"
TRYING = "trying"
PROCEEDING = "proceeding"
COMPLETED = "completed"
ACCEPTED = "accepted"
CONFIRMED = "confirmed"
TERMINATED = "terminated"


class Refusals:
    """Counts requests refused for overload and says when a log line is due: at most one
    every ``every`` seconds (under a flood a line per refused request would be a second
    flood, into the log).  ``count`` is the total, for the next line and for metrics."""

    __slots__ = ("_last", "count", "every")

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.count = 0
        self._last = float("-inf")

    def refused(self, now: float) -> bool:
        """One more refusal at ``now``; True when it should be logged."""
        self.count += 1
        if now - self._last >= self.every:
            self._last = now
            return True
        return False
