"""Failover between two gateways: calls to numbers go to the primary; when it fails with a
server error (5xx) or does not answer in time (408: the proxy's transaction timed out), the
call is sent to the backup.  A busy callee (486) or a rejected number (404, 6xx) is an answer,
not a failure of the gateway, so it goes back to the caller as it is.

Only our users (authenticated with ``--auth-users``) and trusted sources (``--trusted``, a
PBX of ours) may call out; the server's relay policy answers anyone else 407 or 403, so the
gateways are not free for whoever finds the server (toll fraud).

Run it::

    fastsip serve --domain example.com --routes examples/failover.py --auth-users users.txt

REGISTER and calls between registered users take the default routing.  Change ``PRIMARY``
and ``BACKUP`` to your gateways (a URI without a user part: the dialled number is kept).
"""

from __future__ import annotations

import logging
from typing import Any

from fastsip.app import Request, on_failure, route
from fastsip.sip import Response

PRIMARY = "sip:gw1.example.net"
BACKUP = "sip:gw2.example.net"

log = logging.getLogger("fastsip.app.routes.failover")


def is_number(user: str | None) -> bool:
    return bool(user) and user is not None and user.lstrip("+").isdigit()


@route
def initial(req: Request) -> Any:
    if req.method != "INVITE" or not is_number(req.uri.user):
        return None                                  # the default routing
    if not req.trusted:
        if not req.from_us:
            return req.reply(403, "Calls Out Only For Our Users")
        if not req.authenticate():
            return req.challenge()
    req.data["gateway"] = PRIMARY
    return req.relay(to=PRIMARY)


def gateway_failed(status: int) -> bool:
    """5xx (the gateway's own trouble) and 408 (no final response in time) mean "try the
    other gateway"; every other failure is the callee's answer."""
    return status >= 500 and status < 600 or status == 408


@on_failure
def failover(req: Request, response: Response) -> Any:
    if req.data.get("gateway") == PRIMARY and gateway_failed(response.status_code):
        log.warning("%s failed with %d for %s: trying %s", PRIMARY, response.status_code,
                    req.uri, BACKUP)
        req.data["gateway"] = BACKUP
        return req.relay(to=BACKUP)
    return None                                      # the best response goes back
