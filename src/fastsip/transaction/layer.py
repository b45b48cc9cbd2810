"""RFC 3261 §17 transactions (with RFC 6026's Accepted state), sans-IO.

The layer takes parsed messages with their source address (:meth:`TransactionLayer.receive`) and
requests to send (:meth:`TransactionLayer.request`); it sends through a
:class:`~fastsip.transport.Transport` and keeps its timers on a clock with ``call_later`` and
``time`` (a :class:`~fastsip.TimerWheel`, or the asyncio ``WheelDriver`` over one).  It never
reads a clock or touches a socket itself, so every timer can be tested at exact times.

Retransmissions of requests and responses, and the ACK of a non-2xx final response, are handled
here: the transaction user (UA core, proxy) sees each request once, each response once (2xx
retransmissions excepted: RFC 6026 hands those to the TU, which owns the 2xx/ACK exchange).

The transaction table and its four state machines are compiled
(:mod:`fastsip.transaction._layer`: every message of a call passes through them); the timer
values, state names and overload counter are plain Python (:mod:`fastsip.transaction.base`).
This module is their public home, with the protocols the layer's users implement.  A compiled
handler or TU may inherit :class:`ClientHandlerBase` or :class:`TransactionUserBase` (the
proxy core does): the layer then calls it by C calls instead of Python ones; any object with
the methods serves as well.  Likewise a clock that is a ``WheelDriver`` (its methods are its
wheel's own, checked when the layer is built) has its timers scheduled on the wheel by C calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastsip.sip import Request, Response
from fastsip.transaction._layer import (
    ClientHandlerBase,
    ClientTransaction,
    ServerTransaction,
    TransactionLayer,
    TransactionUserBase,
)
from fastsip.transaction.base import (
    ACCEPTED,
    CALLING,
    COMPLETED,
    CONFIRMED,
    MAGIC_COOKIE,
    PROCEEDING,
    TERMINATED,
    TRYING,
    Refusals,
    TimerConfig,
    hop_by_hop_request,
    new_branch,
)
from fastsip.transport import Address

__all__ = [
    "ACCEPTED",
    "CALLING",
    "COMPLETED",
    "CONFIRMED",
    "MAGIC_COOKIE",
    "PROCEEDING",
    "TERMINATED",
    "TRYING",
    "ClientHandler",
    "ClientHandlerBase",
    "ClientTransaction",
    "Clock",
    "Refusals",
    "ServerTransaction",
    "TimerConfig",
    "TransactionLayer",
    "TransactionUser",
    "TransactionUserBase",
    "hop_by_hop_request",
    "new_branch",
]


class Clock(Protocol):
    """What the layer schedules on.  A clock may also offer ``call_later_lax`` (the wheel and
    its loop driver do): the same, for a timer whose exact moment does not matter, which it may
    fire a little late so that many share a wakeup; without it, ``call_later`` is used."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Any: ...
    def time(self) -> float: ...


class ClientHandler(Protocol):
    """The transaction user's side of a client transaction."""

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        """Each provisional and final response once; for INVITE, every 2xx (RFC 6026)."""

    def on_timeout(self, txn: ClientTransaction) -> None:
        """Timer B or F: no final response (the TU acts as if a 408 had come, §8.1.3.1)."""

    def on_transport_error(self, txn: ClientTransaction) -> None:
        """The request could not be sent (the TU acts as if a 503 had come, §8.1.3.1)."""


class TransactionUser(Protocol):
    """The transaction user above the server side (UA core or proxy core)."""

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        """A new request (never a retransmission; never an ACK)."""

    def on_ack(self, request: Request, source: Address) -> None:
        """An ACK that belongs to no INVITE server transaction in Completed state: the ACK
        for a 2xx, which the UA core (or a proxy, end to end) handles (§13.3.1.4, §16.7)."""

    def on_stray_response(self, response: Response, source: Address) -> None:
        """A response that matches no client transaction: a proxy forwards it statelessly
        (§16.7), a UAC ACKs a retransmitted 2xx (§13.2.2.4)."""

    def on_server_timeout(self, txn: ServerTransaction) -> None:
        """Timer H: the ACK for a non-2xx final response never came (§17.2.1)."""

    # Optional: ``sheds_messages = True`` says the TU never reads a transaction's ``request``
    # or ``last_response`` once it has its final response (the proxy core).  The layer then
    # drops both when the transaction starts to linger (Timers D, J, K, L, M: up to 32 s, and
    # at carrier rates every byte a lingering transaction keeps is multiplied by tens of
    # thousands); ``request`` then raises, ``last_response`` is None.
