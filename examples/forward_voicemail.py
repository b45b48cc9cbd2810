"""Voicemail as the final fallback: a call to one of our users rings their phones for
``RING_TIMEOUT`` seconds; if nobody answers, the line is busy, the phone rejects the call or
the user has no phone registered at all, the call goes to the voicemail server, with the
dialled user kept in the Request-URI (``sip:bob@voicemail.example.net``: the mailbox).

The handler is ``async`` because it asks the location store whether the user is online
(``await req.lookup()``); ``req.relay()`` alone would answer 404 for an offline user.

Run it::

    fastsip serve --domain example.com --routes examples/forward_voicemail.py
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, on_failure, route
from fastsip.sip import Response

VOICEMAIL = "sip:voicemail.example.net"              # no user part: the mailbox is the user
RING_TIMEOUT = 25.0


def to_voicemail(req: Request) -> Any:
    req.data["voicemail"] = True
    req.trusted = True                               # our voicemail, not the caller's choice
    return req.relay(to=VOICEMAIL)


@route
async def initial(req: Request) -> Any:
    if req.method != "INVITE" or not req.for_us or not req.uri.user:
        return None                                  # the default routing
    if not await req.lookup():
        return to_voicemail(req)                     # offline: straight to the mailbox
    return req.relay(ring_timeout=RING_TIMEOUT)


@on_failure
def fallback(req: Request, response: Response) -> Any:
    if req.data.get("voicemail") or not req.for_us or not req.uri.user:
        return None                                  # voicemail itself failed: as it is
    return to_voicemail(req)
