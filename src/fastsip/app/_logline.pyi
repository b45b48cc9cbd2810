"""Type stub for the compiled text of a log line (fastsip/app/_logline.pyx)."""

import time
from collections.abc import Callable
from typing import Any

class TextLines:
    def __init__(self, time_format: str = "%Y-%m-%d %H:%M:%S",
                 converter: Callable[[float | None], time.struct_time] = ...) -> None: ...
    def asctime(self, created: float) -> str: ...
    def line(self, created: float, levelname: str, name: str, msg: str,
             args: tuple[Any, ...] | None, extra: dict[str, Any] | None = None) -> str: ...

class QueueEmitter:
    def __init__(self, handler: Any, queue: Any, name: str, levelname: str,
                 bound: int) -> None: ...
    def __call__(self, msg: str, args: tuple[Any, ...],
                 extra: dict[str, Any] | None = None) -> None: ...
