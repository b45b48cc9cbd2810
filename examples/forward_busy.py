"""Call forwarding on busy: a call to a user listed in ``FORWARD_BUSY`` rings the user's
registered phones; when they answer 486 Busy Here, the call goes to the forward target
instead of the 486 going back.  Any other answer (a 2xx, 404, 480, the caller's CANCEL) is
left as it is.

600 Busy Everywhere is not forwarded: a 6xx ends the search in the proxy core (RFC 3261
§16.7 step 5), so the failure hook never sees one -- the callee said "nowhere".

Run it::

    fastsip serve --domain example.com --routes examples/forward_busy.py
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, on_failure, route
from fastsip.sip import Response

#: user -> where their calls go when they are busy
FORWARD_BUSY: dict[str, str] = {"bob": "sip:+447700900123@gw.example.net"}


@route
def initial(req: Request) -> Any:
    target = FORWARD_BUSY.get(req.uri.user or "")
    if req.method != "INVITE" or not req.for_us or target is None:
        return None                                  # the default routing
    req.data["forward"] = target
    return req.relay()                               # the registered phones first


@on_failure
def busy(req: Request, response: Response) -> Any:
    target = req.data.pop("forward", None)           # once: the target's own 486 goes back
    if target is None or response.status_code != 486:
        return None                                  # the best response goes back
    req.trusted = True                               # our forward, not the caller's choice
    return req.relay(to=target)
