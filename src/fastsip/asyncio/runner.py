"""Running a fastsip program: which event loop, and how it is told to stop.

The shell owns the loop: :func:`run` picks uvloop where it is installed (it measured ~30% less
CPU per call than asyncio's loop on ``fastsip serve``) and runs the program's main coroutine to
an exit status; :class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (a service manager's
stop) into an :class:`asyncio.Event` the program waits on, so it can drain and say what it did
instead of dying mid-transaction; :class:`ReloadSignals` turns SIGHUP into a call on the loop
(``fastsip serve`` reads its configuration again).  :func:`loop_name` names the loop in use, for the log.

    async def main() -> int:
        with StopSignals() as stop:
            ...                      # start serving
            await stop.wait()
            ...                      # drain
        return 0

    sys.exit(run(main(), loop="auto"))
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Iterable
from types import FrameType, TracebackType
from typing import Any, Final

from fastsip.errors import FastSIPError

__all__ = ["LOOPS", "RELOAD_SIGNALS", "STOP_SIGNALS", "LoopUnavailableError", "ReloadSignals",
           "StopSignals", "loop_name", "run"]

log = logging.getLogger("fastsip.asyncio.runner")

#: The ``loop`` choices of :func:`run` (and of the CLI's ``--loop``): ``auto`` is uvloop when
#: it is installed, else asyncio's own loop.
LOOPS: Final = ("auto", "asyncio", "uvloop")

#: What stops a server: Ctrl-C, and the signal service managers (systemd, Docker, Kubernetes)
#: send before they kill.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

#: What makes a server read its configuration again (none on Windows, which has no SIGHUP).
RELOAD_SIGNALS: Final[tuple[signal.Signals, ...]] = (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class LoopUnavailableError(FastSIPError):
    """The event loop asked for cannot run here (``uvloop`` is not installed: Windows, or a
    platform it does not build on)."""


def run(main: Coroutine[Any, Any, int], loop: str = "auto") -> int:
    """Run ``main`` to completion on a new event loop of the kind ``loop`` names (one of
    :data:`LOOPS`) and return its result, the exit status.

    Raises :class:`LoopUnavailableError` for ``loop="uvloop"`` without uvloop, ``ValueError``
    for a name not in :data:`LOOPS`; ``main`` is closed unrun then, so no "never awaited"
    warning follows the error.
    """
    if loop not in LOOPS:
        main.close()
        raise ValueError(f"unknown event loop {loop!r}: expected one of {', '.join(LOOPS)}")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                raise LoopUnavailableError(
                    "the uvloop event loop was asked for, but uvloop is not installed") from None
        else:
            return int(uvloop.run(main))
    return int(asyncio.run(main))


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The package whose event loop runs (``"uvloop"``, ``"asyncio"``; another loop's own
    package name): ``loop``, or the running loop."""
    if loop is None:
        loop = asyncio.get_running_loop()
    return type(loop).__module__.partition(".")[0]


class _SignalHandlers:
    """Handlers for ``signals`` on the running loop (what :class:`StopSignals` says), each
    calling :meth:`_receive` on the loop."""

    def __init__(self, signals: Iterable[int]) -> None:
        self._signals = tuple(signal.Signals(s) for s in signals)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_loop: list[signal.Signals] = []          # through loop.add_signal_handler
        self._previous: dict[signal.Signals, Any] = {}    # the handlers to restore

    def _receive(self, signum: int) -> None:
        raise NotImplementedError

    def _install(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for sig in self._signals:
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._receive, sig)
            except NotImplementedError:
                self._install_plain(loop, sig)
            except (RuntimeError, ValueError) as exc:  # not the main thread
                log.debug("%s not handled: %s", sig.name, exc)
            else:
                self._on_loop.append(sig)
                self._previous[sig] = previous

    def _install_plain(self, loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            # A Python signal handler runs between two bytecodes of the main thread, perhaps
            # inside the loop's own bookkeeping: hand the signal to the loop, touch nothing here.
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._receive, signum)

        try:
            previous = signal.signal(sig, handler)
        except (OSError, ValueError) as exc:  # not the main thread
            log.debug("%s not handled: %s", sig.name, exc)
        else:
            self._previous[sig] = previous if previous is not None else signal.SIG_DFL

    def remove(self) -> None:
        """Put back the handling each signal had before :meth:`install` (idempotent)."""
        if self._loop is not None and not self._loop.is_closed():
            for sig in self._on_loop:
                self._loop.remove_signal_handler(sig)
        self._on_loop.clear()
        for sig, previous in self._previous.items():
            # The loop's remove_signal_handler puts back the default action, not what was there
            # (asyncio.run's own SIGINT handler, an inherited SIG_IGN); None is a handler not
            # set from Python, which Python cannot restore: the loop's choice stands then.
            if previous is not None:
                signal.signal(sig, previous)
        self._previous.clear()


class StopSignals(_SignalHandlers):
    """While installed, each of ``signals`` (default :data:`STOP_SIGNALS`) sets :attr:`stop`
    on the running loop, instead of its default action (KeyboardInterrupt, or termination).

    Use it as a context manager (``with`` or ``async with``) inside a coroutine on the loop, or
    call :meth:`install` and :meth:`remove`.  Removing restores what was there before.  Loops
    with ``add_signal_handler`` (asyncio's on Unix, uvloop) get the signals through it; where a
    loop has none (asyncio's loops on Windows), a plain :func:`signal.signal` handler hands each
    one to the loop with ``call_soon_threadsafe``.  Only the main thread receives signals: on a
    loop in another thread nothing is installed (whoever runs that loop stops it otherwise).
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        super().__init__(signals)
        self.stop = asyncio.Event()
        #: The first stop signal received, or None.
        self.received: signal.Signals | None = None

    def install(self) -> asyncio.Event:
        """Install the handlers on the running loop; returns :attr:`stop`."""
        self._install()
        return self.stop

    def _receive(self, signum: int) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.debug("%s received: stopping", self.received.name)
        self.stop.set()

    def __enter__(self) -> asyncio.Event:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    async def __aenter__(self) -> asyncio.Event:
        return self.install()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


class ReloadSignals(_SignalHandlers):
    """While installed, each of ``signals`` (default :data:`RELOAD_SIGNALS`: SIGHUP, the
    daemon convention for "read your configuration again") calls ``on_reload(signum)`` on the
    running loop instead of its default action (termination).  Installed and removed as
    :class:`StopSignals` is; ``on_reload`` must not block (start a task for the work).
    Where the platform has no SIGHUP (Windows) nothing is installed."""

    def __init__(self, on_reload: Callable[[int], None],
                 signals: Iterable[int] = RELOAD_SIGNALS) -> None:
        super().__init__(signals)
        self.on_reload = on_reload
        #: Reload signals received (logs, tests).
        self.received = 0

    def install(self) -> None:
        """Install the handlers on the running loop."""
        self._install()

    def _receive(self, signum: int) -> None:
        self.received += 1
        log.debug("%s received: reloading", signal.Signals(signum).name)
        self.on_reload(signum)

    def __enter__(self) -> None:
        self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
