"""A redirect server (RFC 3261 §8.3): it never forwards a call, it tells the caller where to
try -- a 302 Moved Temporarily listing the places as Contacts.  Users in ``MOVED`` are sent
to the addresses listed there; other users of ours to their registered contacts; nobody
known gets 404.  REGISTER takes the default routing (the registrar fills the location store
this reads).

Run it::

    fastsip serve --domain example.com --routes examples/redirect.py
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, route

#: user -> where callers should try instead (first is preferred)
MOVED: dict[str, list[str]] = {"carol": ["sip:carol@branch-office.example.net",
                                         "tel:+442079460000"]}


@route
async def initial(req: Request) -> Any:
    if req.method != "INVITE" or not req.for_us or not req.uri.user:
        return None                                  # the default routing
    moved = MOVED.get(req.uri.user)
    if moved:
        return req.redirect(moved)
    bindings = await req.lookup()
    if bindings:
        return req.redirect([b.contact for b in bindings])
    return req.reply(404)
