"""The routing API: plain Python functions decide what the proxy does with each request.

A routes module (see :mod:`fastsip.app.routes`)::

    from fastsip.app import on_failure, route

    @route
    async def initial(req):
        if req.method == "REGISTER":
            return req.register() if req.authenticate() else req.challenge()
        if req.uri.user and req.uri.user.startswith("+44"):
            return req.relay(to="sip:gw-uk.example.net")
        return req.fork(["sip:a@192.0.2.1", "sip:b@192.0.2.2"], parallel=False)

    @on_failure
    def failover(req, response):
        return req.relay(to="sip:gw-backup.example.net") if len(req.failures) == 1 else None

Wiring it (what ``fastsip serve`` does)::

    routes = load_routes("routes.py")
    registrar = Registrar(MemoryLocationStore(), domains=["example.com"])
    router = Router(routes, registrar=registrar, spawn=asyncio.get_running_loop().create_task)
    proxy = Proxy(router)
    endpoint = Endpoint(proxy, listen=["udp:0.0.0.0:5060"]); await endpoint.start()
    proxy.attach(endpoint.transactions)

A handler returns a :class:`Decision` -- ``req.relay()``, ``req.relay(to=...)``,
``req.fork([...], parallel=...)``, ``req.reply(code)``, ``req.redirect([...])``,
``req.challenge()``, ``req.register()`` -- or None for the default routing (``req.default()``).
"""

from __future__ import annotations

from fastsip.app.router import Decision, Request, Router
from fastsip.app.routes import Routes, load_routes, on_failure, on_response, route

__all__ = [
    "Decision",
    "Request",
    "Router",
    "Routes",
    "load_routes",
    "on_failure",
    "on_response",
    "route",
]
