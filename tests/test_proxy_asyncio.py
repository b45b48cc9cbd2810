"""Smoke test over real sockets on 127.0.0.1: a UA calls another UA through the proxy (an async
routing handler spawned on the running loop), the call is answered, ACKed and hung up along the
Record-Route, over UDP and TCP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastsip.app import Request, Router, Routes
from fastsip.asyncio import Endpoint
from fastsip.proxy import Proxy
from fastsip.proxy.edge import TrustedNetworks
from fastsip.ua import Call, UserAgent


async def _call_through_proxy(transport: str) -> None:
    t = transport.lower()
    loop = asyncio.get_running_loop()
    bob_ua = UserAgent(user="bob")
    bob = Endpoint(bob_ua, listen=[f"{t}:127.0.0.1:0"])
    await bob.start()
    bob_ua.attach(bob.transactions)
    bob_addr = bob.address(transport)

    async def initial(req: Request) -> Any:
        await asyncio.sleep(0)  # as if a database were asked
        return req.relay(to=f"sip:bob@127.0.0.1:{bob_addr.port};transport={t}")

    # alice is a trusted PBX here: the relay policy lets her reach a gateway-like target.
    proxy = Proxy(Router(Routes(initial), spawn=loop.create_task),
                  trusted=TrustedNetworks(["127.0.0.1"]))
    proxy_ep = Endpoint(proxy, listen=[f"{t}:127.0.0.1:0"])
    await proxy_ep.start()
    proxy.attach(proxy_ep.transactions)
    proxy_port = proxy_ep.address(transport).port

    alice_ua = UserAgent(user="alice")
    alice = Endpoint(alice_ua, listen=[f"{t}:127.0.0.1:0"])
    await alice.start()
    alice_ua.attach(alice.transactions)
    try:
        answered = loop.create_future()
        ended = loop.create_future()
        call = alice_ua.invite("sip:bob@example.com", body=b"v=0\r\n", transport=transport,
                               proxy=f"sip:127.0.0.1:{proxy_port};transport={t}")

        def on_answer(c: Call) -> None:
            if not answered.done():
                answered.set_result(c.status)

        def on_end(c: Call) -> None:
            if not ended.done():
                ended.set_result(c.bye_status)

        call.on_answer = on_answer
        call.on_end = on_end
        assert await asyncio.wait_for(answered, 5) == 200
        assert call.dialog is not None
        assert any(f"127.0.0.1:{proxy_port}" in r for r in call.dialog.route_set)
        await asyncio.sleep(0.05)
        call.bye()
        assert await asyncio.wait_for(ended, 5) == 200
        assert proxy.pending == 0
    finally:
        await alice.close()
        await proxy_ep.close()
        await bob.close()


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_call_through_proxy_real_sockets(transport: str) -> None:
    asyncio.run(_call_through_proxy(transport))
