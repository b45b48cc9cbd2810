"""Least-cost routing: calls to telephone numbers go to the cheapest gateway for the longest
matching prefix, the next cheapest tried when one fails (serial forking, RFC 3261 §16.6).

Everything else (REGISTER, calls between our registered users) takes the default routing.
Only our own users may call out, and they must prove it: with ``--auth-users`` they answer a
407 challenge; a PBX of ours is listed with ``--trusted``.  Anyone else gets 403 -- the
server's relay policy refuses to send an unauthenticated, untrusted call to a gateway, so
the server is not a free gateway for anyone who finds it (toll fraud).

Run it::

    fastsip serve --domain example.com --routes examples/lcr.py --auth-users users.txt \
                  [--trusted 192.0.2.0/24]

and call ``sip:+442079460000@example.com`` through it: the INVITE goes to
``sip:+442079460000@gw-b.example.net`` (the cheapest for +4420), then to gw-a if gw-b fails.
Edit ``RATES`` (or load it from a file or a database at import time) for real gateways.
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, route

#: prefix -> [(price per minute, gateway)]; the longest prefix that matches wins.
RATES: dict[str, list[tuple[float, str]]] = {
    "+1": [(0.0040, "sip:gw-us.example.net"), (0.0055, "sip:gw-a.example.net")],
    "+44": [(0.0100, "sip:gw-a.example.net"), (0.0120, "sip:gw-b.example.net")],
    "+4420": [(0.0080, "sip:gw-b.example.net"), (0.0090, "sip:gw-a.example.net")],
    "+447": [(0.0310, "sip:gw-a.example.net")],   # UK mobiles: one carrier only
}
_LONGEST = max(len(p) for p in RATES)


def normalize(user: str) -> str | None:
    """An E.164 number (+ and digits) from a dialled user part, or None if it is not one:
    visual separators go (RFC 3966), an international ``00`` becomes ``+``."""
    number = "".join(c for c in user if c not in " -.()")
    if number.startswith("00"):
        number = "+" + number[2:]
    if number.startswith("+") and number[1:].isdigit() and len(number) > 2:
        return number
    return None


def gateways(number: str) -> list[str]:
    """The gateways for ``number``, cheapest first (longest matching prefix)."""
    for n in range(min(_LONGEST, len(number)), 0, -1):
        rates = RATES.get(number[:n])
        if rates is not None:
            return [gw for _, gw in sorted(rates)]
    return []


@route
def initial(req: Request) -> Any:
    user = req.uri.user
    number = normalize(user) if user is not None else None
    if req.method != "INVITE" or number is None:
        return None                                  # the default routing
    if not req.trusted:                              # our PBXs (--trusted) may call out
        if not req.from_us:
            return req.reply(403, "Calls Out Only For Our Users")
        if not req.authenticate():                   # 407 (without --auth-users the relay
            return req.challenge()                   # policy answers 403 instead)
    candidates = gateways(number)
    if not candidates:
        return req.reply(404, "No Route To Number")
    req.data["number"] = number
    # Serial: the next gateway only when the previous one failed (no 2xx, no 6xx).
    return req.fork([gw.replace("sip:", f"sip:{number}@", 1) for gw in candidates],
                    parallel=False)
