"""Header-based rules for a multi-tenant edge:

- ``X-Tenant`` picks the tenant's PBX: a call with ``X-Tenant: acme`` goes to acme's PBX,
  whatever the Request-URI's domain; an unknown tenant gets 403.  The header is internal: it
  is only believed from the trust domain (the SBCs that set it), and removed before the
  request leaves.
- ``P-Asserted-Identity`` (RFC 3325) is only believed from the trust domain: from any other
  source it is removed, so nobody outside can claim an identity our PBXs would trust.

The trust domain is the server's ``--trusted`` networks (``req.trusted``), the same set the
relay policy lets relay without authentication.  Requests without a believed ``X-Tenant``
take the default routing (registrar, our users' contacts).

Run it::

    fastsip serve --domain example.com --routes examples/header_rule.py \
                  --trusted 192.0.2.10 --trusted 192.0.2.11

and try ``sipp`` from a trusted address with ``X-Tenant: acme`` added to its INVITE (a
scenario file), or any UA that can add a header.
"""

from __future__ import annotations

from typing import Any

from fastsip.app import Request, route

#: tenant -> its PBX (the Request-URI's user is kept).
TENANTS = {
    "acme": "sip:pbx.acme.example.net",
    "globex": "sip:pbx.globex.example.net;transport=tcp",
}


@route
def initial(req: Request) -> Any:
    request = req.request
    if not req.trusted:                              # outside the trust domain (RFC 3325 §2.3)
        for name in ("P-Asserted-Identity", "X-Tenant"):
            if name in request.headers:
                request.remove_header(name)
        return None                                  # the default routing
    tenant = request.headers.get("X-Tenant")
    if tenant is None:
        return None
    pbx = TENANTS.get(tenant.strip().lower())
    if pbx is None:
        return req.reply(403, "Unknown Tenant")
    request.remove_header("X-Tenant")
    return req.relay(to=pbx)
