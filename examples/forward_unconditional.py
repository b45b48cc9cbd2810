"""Unconditional call forwarding: calls to a user listed in ``FORWARD_ALWAYS`` go straight to
the forward target; the user's registered phones never ring.  Everyone else takes the default
routing (REGISTER, calls to registered users, 404).

The forward target is our configuration, not the caller's choice, so the handler vouches for
the request (``req.trusted = True``): the relay policy would otherwise refuse to send an
unauthenticated caller to a foreign URI.  A target without a user part keeps the dialled
user (``sip:voicemail.example.net`` → ``sip:bob@voicemail.example.net``).

Run it::

    fastsip serve --domain example.com --routes examples/forward_unconditional.py
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, route

#: user -> where their calls go instead
FORWARD_ALWAYS: dict[str, str] = {"bob": "sip:+447700900123@gw.example.net"}


@route
def initial(req: Request) -> Any:
    target = FORWARD_ALWAYS.get(req.uri.user or "")
    if req.method != "INVITE" or not req.for_us or target is None:
        return None                                  # the default routing
    req.trusted = True                               # our forward, not the caller's choice
    return req.relay(to=target)
