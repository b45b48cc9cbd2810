"""Decorators that mark a user's routing functions, and loading them from a file.

A routes module is plain Python::

    from fastsip.app import on_failure, route

    @route
    async def initial(req):                 # every initial request (sync def is fine too)
        if req.uri.user and req.uri.user.startswith("+44"):
            return req.relay(to="sip:gw-uk.example.net")
        return req.default()               # registrar + location lookup

    @on_failure
    def failover(req, response):           # every branch failed (no 2xx, no 6xx)
        if not req.failures[1:]:           # first failure only
            return req.relay(to="sip:gw-backup.example.net")
        return None                        # None: send the best response

``@route(in_dialog=True)`` also hands in-dialog requests (To tag) to the function, which the
core otherwise loose-routes itself.  ``@on_response`` (sync only) sees each response from a
branch before it is forwarded.  :func:`load_routes` imports such a file and collects them.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, overload

__all__ = ["Routes", "load_routes", "on_failure", "on_response", "route"]

_F = TypeVar("_F", bound=Callable[..., Any])
_MARK = "__fastsip_hook__"


@overload
def route(fn: _F, /) -> _F: ...
@overload
def route(*, in_dialog: bool = False) -> Callable[[_F], _F]: ...


def route(fn: Any = None, /, *, in_dialog: bool = False) -> Any:
    """Mark ``fn(req)`` as the handler for initial requests (and in-dialog ones with
    ``in_dialog=True``).  It returns a decision (``req.relay()``, ``req.reply(404)``...) or
    None for the default routing; it may be ``async``."""
    def mark(f: _F) -> _F:
        setattr(f, _MARK, ("request", in_dialog))
        return f
    return mark(fn) if fn is not None else mark


def on_failure(fn: _F) -> _F:
    """Mark ``fn(req, response)`` as the failure hook: every branch ended without a 2xx or a
    6xx; ``response`` is the best one.  Return a decision (new targets: failover, serial
    forking) or None to send ``response``.  May be ``async``."""
    setattr(fn, _MARK, ("failure", False))
    return fn


def on_response(fn: _F) -> _F:
    """Mark ``fn(req, response)`` as the response hook: each response from a branch (not 100),
    before it is forwarded or kept.  It may edit the response; its return value is ignored.
    Must be a plain (sync) function: responses are never held up."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError("an @on_response hook must be a plain function, not async")
    setattr(fn, _MARK, ("response", False))
    return fn


class Routes:
    """The user's hooks, gathered: ``request`` (initial requests), ``failure``, ``response``;
    ``in_dialog``: the request handler wants in-dialog requests too."""

    __slots__ = ("failure", "in_dialog", "request", "response")

    def __init__(self, request: Callable[..., Any] | None = None, *,
                 failure: Callable[..., Any] | None = None,
                 response: Callable[..., Any] | None = None, in_dialog: bool = False) -> None:
        if response is not None and inspect.iscoroutinefunction(response):
            raise TypeError("a response hook must be a plain function, not async")
        self.request = request
        self.failure = failure
        self.response = response
        self.in_dialog = in_dialog

    @classmethod
    def from_module(cls, module: ModuleType) -> Routes:
        """Collect the marked functions of ``module`` (one of each kind at most)."""
        found: dict[str, Callable[..., Any]] = {}
        in_dialog = False
        for value in vars(module).values():
            mark = getattr(value, _MARK, None)
            if not isinstance(mark, tuple) or not callable(value):
                continue
            kind, wants_dialog = mark
            if kind in found and found[kind] is not value:
                raise ValueError(f"{module.__name__}: more than one @{_DECORATOR[kind]} "
                                 f"({found[kind].__name__}, {value.__name__})")
            found[kind] = value
            if kind == "request":
                in_dialog = bool(wants_dialog)
        return cls(found.get("request"), failure=found.get("failure"),
                   response=found.get("response"), in_dialog=in_dialog)

    def __repr__(self) -> str:
        names = {k: getattr(getattr(self, k), "__name__", None)
                 for k in ("request", "failure", "response")}
        return f"<Routes {names} in_dialog={self.in_dialog}>"


_DECORATOR = {"request": "route", "failure": "on_failure", "response": "on_response"}


def load_routes(path: str | Path) -> Routes:
    """Import the routes module at ``path`` (a .py file) and collect its hooks.  Errors in the
    module (syntax, import) propagate: a server should refuse to start with broken routes."""
    path = Path(path)
    name = f"fastsip_routes_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load routes from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return Routes.from_module(module)
