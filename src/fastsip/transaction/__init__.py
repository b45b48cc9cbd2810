"""RFC 3261 §17 transactions, sans-IO: see :mod:`fastsip.transaction.layer`."""

from fastsip.transaction.layer import (
    ACCEPTED,
    CALLING,
    COMPLETED,
    CONFIRMED,
    PROCEEDING,
    TERMINATED,
    TRYING,
    ClientHandler,
    ClientTransaction,
    Refusals,
    ServerTransaction,
    TimerConfig,
    TransactionLayer,
    TransactionUser,
    hop_by_hop_request,
    new_branch,
)

__all__ = [
    "ACCEPTED",
    "CALLING",
    "COMPLETED",
    "CONFIRMED",
    "PROCEEDING",
    "TERMINATED",
    "TRYING",
    "ClientHandler",
    "ClientTransaction",
    "Refusals",
    "ServerTransaction",
    "TimerConfig",
    "TransactionLayer",
    "TransactionUser",
    "hop_by_hop_request",
    "new_branch",
]
