"""The UA core (RFC 3261 §8, §12-15): dialogs, UAC and UAS over the transaction layer, sans-IO.

:class:`UserAgent` is a transaction user; :class:`Call` is one INVITE session with callbacks
for its outcome; :class:`Dialog` holds §12's state and builds in-dialog requests.
"""

from __future__ import annotations

from fastsip.ua.core import (
    ALLOW,
    AutoAnswer,
    Call,
    OptionsResult,
    UAError,
    UserAgent,
    uri_destination,
)
from fastsip.ua.dialog import Dialog, DialogError, DialogId, new_tag

__all__ = [
    "ALLOW",
    "AutoAnswer",
    "Call",
    "Dialog",
    "DialogError",
    "DialogId",
    "OptionsResult",
    "UAError",
    "UserAgent",
    "new_tag",
    "uri_destination",
]
