"""The proxy layer: registrar, location service and digest authentication (and the proxy core).

Everything here is sans-IO: it takes parsed messages, transport addresses and the current time,
and returns responses and decisions.  The asyncio server and the CLI drive it.
"""

from __future__ import annotations

from fastsip.proxy.auth import (
    AuthResult,
    Credentials,
    CredentialsError,
    DigestAuthenticator,
)
from fastsip.proxy.core import (
    Proxy,
    ProxyContext,
    RequestRouter,
    ResponseContext,
    StatelessContext,
    Target,
)
from fastsip.proxy.location import (
    Binding,
    LocationStore,
    LocationStoreError,
    MemoryLocationStore,
    StoreWouldWait,
    aor_of,
    contact_key,
    run_immediately,
)
from fastsip.proxy.registrar import Registrar

__all__ = [
    "AuthResult",
    "Binding",
    "Credentials",
    "CredentialsError",
    "DigestAuthenticator",
    "LocationStore",
    "LocationStoreError",
    "MemoryLocationStore",
    "Proxy",
    "ProxyContext",
    "Registrar",
    "RequestRouter",
    "ResponseContext",
    "StatelessContext",
    "StoreWouldWait",
    "Target",
    "aor_of",
    "contact_key",
    "run_immediately",
]
