"""Call forwarding on no answer: a call to a user listed in ``FORWARD_NO_ANSWER`` rings the
user's phones for their ``RING_TIMEOUT`` (seconds); then the ringing branches are CANCELled
and the call goes to the forward target.  A phone that says 480 Temporarily Unavailable
(do not disturb) is forwarded too; a busy phone's 486 goes back to the caller.

``req.relay(ring_timeout=S)`` is the per-call ring timeout: a branch that rang that long is
CANCELled as Timer C would (its 487 counts as 408), one that never answered at all fails
with 408.  ``serve --ring-timeout`` (Timer C, default 180 s) is the limit for every call.

Run it::

    fastsip serve --domain example.com --routes examples/forward_noanswer.py
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, on_failure, route
from fastsip.sip import Response

#: user -> where their unanswered calls go
FORWARD_NO_ANSWER: dict[str, str] = {"bob": "sip:+447700900123@gw.example.net"}
#: user -> seconds their phones ring before the call is forwarded
RING_TIMEOUT: dict[str, float] = {"bob": 20.0}
DEFAULT_RING_TIMEOUT = 30.0


@route
def initial(req: Request) -> Any:
    user = req.uri.user or ""
    if req.method != "INVITE" or not req.for_us or user not in FORWARD_NO_ANSWER:
        return None                                  # the default routing
    req.data["forward"] = FORWARD_NO_ANSWER[user]
    return req.relay(ring_timeout=RING_TIMEOUT.get(user, DEFAULT_RING_TIMEOUT))


@on_failure
def no_answer(req: Request, response: Response) -> Any:
    target = req.data.pop("forward", None)
    if target is None or response.status_code not in (408, 480):
        return None                                  # busy, rejected: as it is
    req.trusted = True                               # our forward, not the caller's choice
    return req.relay(to=target)
