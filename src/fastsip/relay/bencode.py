"""Strict bencode for the ng control protocol: untrusted UDP in, bounded work out.

bencode has four types: integers (``i42e``), byte strings (``4:spam``), lists (``l...e``) and
dictionaries (``d...e``, byte-string keys).  The decoder is iterative (an explicit stack, never
recursion), checks every length against what is left of the input, and enforces limits on the
total size, the nesting depth and the number of elements, so a hostile datagram costs at most
one linear pass.  Canonical-form rules that catch corrupted input are enforced (no leading
zeros, no ``-0``, no duplicate keys); key *order* is not, because rtpengine and Kamailio's module
emit dictionaries unsorted.  The encoder sorts keys, as the bencode specification asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from fastsip.errors import FastSIPError

#: The Python shapes :func:`decode` returns (``bytes`` for strings: bencode strings are bytes).
Value: TypeAlias = int | bytes | list["Value"] | dict[bytes, "Value"]

MAX_SIZE = 1 << 20
MAX_DEPTH = 32
MAX_ITEMS = 1 << 16
#: Integers are bounded to what rtpengine and Kamailio store (signed 64-bit).
_MAX_INT_DIGITS = 19
_INT_LIMIT = 1 << 63


class BencodeError(FastSIPError, ValueError):
    """Input that is not strict bencode, or that exceeds a limit.

    ``offset`` is the byte offset where decoding stopped, ``reason`` a short cause.
    """

    def __init__(self, reason: str, offset: int = -1) -> None:
        self.reason = reason
        self.offset = offset
        where = f" at byte {offset}" if offset >= 0 else ""
        super().__init__(f"{reason}{where}")


def _read_int(data: bytes, start: int, end_byte: int, what: str) -> tuple[int, int]:
    """Parse the decimal digits at ``start`` up to ``end_byte``; returns (value, index after)."""
    end = data.find(end_byte, start, start + _MAX_INT_DIGITS + 2)
    if end < 0:
        raise BencodeError(f"unterminated or too long {what}", start)
    digits = data[start:end]
    negative = digits.startswith(b"-")
    body = digits[1:] if negative else digits
    if not body or not body.isdigit():
        raise BencodeError(f"bad {what}: {digits[:24]!r}", start)
    if len(body) > 1 and body[0:1] == b"0":
        raise BencodeError(f"{what} with a leading zero", start)
    if negative and body == b"0":
        raise BencodeError(f"{what} is negative zero", start)
    value = int(body)
    if value >= _INT_LIMIT:
        raise BencodeError(f"{what} out of range", start)
    return (-value if negative else value), end + 1


class _Dict:
    """A dictionary under construction: its items, and the key waiting for its value."""

    __slots__ = ("items", "key", "key_offset")

    def __init__(self) -> None:
        self.items: dict[bytes, Value] = {}
        self.key: bytes | None = None
        self.key_offset = -1


def decode(data: bytes | bytearray | memoryview, *, max_size: int = MAX_SIZE,
           max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Value:
    """Decode one bencoded value that fills ``data`` exactly.

    Raises :class:`BencodeError` (and nothing else) for malformed input, for trailing bytes and
    when ``max_size`` bytes, ``max_depth`` nested containers or ``max_items`` values (of any kind,
    in total) would be exceeded.
    """
    data = bytes(data)
    size = len(data)
    if size > max_size:
        raise BencodeError(f"input of {size} bytes exceeds the limit of {max_size}", 0)
    if not size:
        raise BencodeError("empty input", 0)
    stack: list[list[Value] | _Dict] = []
    items = 0
    pos = 0
    result: Value | None = None
    while True:
        if pos >= size:
            raise BencodeError("truncated input", pos)
        start = pos
        c = data[pos]
        value: Value
        if c == 0x65:  # 'e': close the innermost container
            if not stack:
                raise BencodeError("unexpected end marker", pos)
            top = stack.pop()
            pos += 1
            if isinstance(top, _Dict):
                if top.key is not None:
                    raise BencodeError("dictionary key without a value", top.key_offset)
                value = top.items
            else:
                value = top
        else:
            items += 1
            if items > max_items:
                raise BencodeError(f"more than {max_items} elements", pos)
            if c == 0x69:  # 'i'
                value, pos = _read_int(data, pos + 1, 0x65, "integer")
            elif 0x30 <= c <= 0x39:  # a string's length
                length, pos = _read_int(data, pos, 0x3A, "string length")
                if length > size - pos:
                    raise BencodeError(f"string length {length} runs past the end", start)
                value = data[pos:pos + length]
                pos += length
            elif c == 0x6C or c == 0x64:  # 'l' / 'd'
                if len(stack) >= max_depth:
                    raise BencodeError(f"nesting deeper than {max_depth}", pos)
                top_d = stack[-1] if stack else None
                if isinstance(top_d, _Dict) and top_d.key is None:
                    raise BencodeError("dictionary key is not a byte string", pos)
                stack.append([] if c == 0x6C else _Dict())
                pos += 1
                continue
            else:
                raise BencodeError(f"unexpected byte {bytes([c])!r}", pos)
        # attach the finished value to its parent (or finish)
        if not stack:
            result = value
            break
        parent = stack[-1]
        if isinstance(parent, _Dict):
            if parent.key is None:
                if not isinstance(value, bytes):
                    raise BencodeError("dictionary key is not a byte string", start)
                if value in parent.items:
                    raise BencodeError(f"duplicate dictionary key {value[:32]!r}", start)
                parent.key = value
                parent.key_offset = start
            else:
                parent.items[parent.key] = value
                parent.key = None
        else:
            parent.append(value)
    if pos != size:
        raise BencodeError("trailing data after the value", pos)
    return result


Encodable: TypeAlias = (bytes | bytearray | memoryview | str | int | list["Encodable"]
                         | tuple["Encodable", ...] | Mapping[bytes | str, "Encodable"])


def _key(key: object) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"bencode dictionary keys are byte strings, not {type(key).__name__}")


def _encode(obj: object, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH * 2:
        raise ValueError("structure nested too deeply to encode (a cycle?)")
    if isinstance(obj, str):
        obj = obj.encode("utf-8")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out += (str(len(raw)).encode("ascii"), b":", raw)
    elif isinstance(obj, int):  # bool included: True -> i1e, as most bencoders do
        out += (b"i", str(int(obj)).encode("ascii"), b"e")
    elif isinstance(obj, (list, tuple)):
        out.append(b"l")
        for item in obj:
            _encode(item, out, depth + 1)
        out.append(b"e")
    elif isinstance(obj, Mapping):
        keyed = sorted(((_key(k), v) for k, v in obj.items()), key=lambda kv: kv[0])
        out.append(b"d")
        previous = None
        for k, v in keyed:
            if k == previous:
                raise ValueError(f"duplicate dictionary key {k!r} (str and bytes spellings)")
            previous = k
            out += (str(len(k)).encode("ascii"), b":", k)
            _encode(v, out, depth + 1)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(obj).__name__}")


def as_text(value: Any) -> Any:
    """A decoded value with its byte strings as ``str`` where they are UTF-8 (dictionary keys
    included), the others left as ``bytes``: how a client reads an ng reply."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    if isinstance(value, list):
        return [as_text(v) for v in value]
    if isinstance(value, dict):
        return {as_text(k): as_text(v) for k, v in value.items()}
    return value


def encode(obj: Encodable) -> bytes:
    """Bencode ``obj``: bytes/str (UTF-8), int, list/tuple, dict/Mapping with sorted keys."""
    out: list[bytes] = []
    _encode(obj, out, 0)
    return b"".join(out)
