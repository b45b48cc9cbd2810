"""fastsip's media relay control core: rtpengine's ng protocol over a sans-IO call model.

``bencode`` decodes and encodes the ng wire format, ``ng`` answers ng commands (ping, offer,
answer, delete, query, list) and ``calls`` keeps calls, their monologues and media, and rewrites
SDP.  Sockets and packets belong to the media plane (:class:`fastsip.relay.calls.MediaPlane`),
which the asyncio shell implements; nothing here reads a clock or opens a socket.
"""

from __future__ import annotations

from fastsip.relay.bencode import BencodeError, decode, encode

__all__ = ["BencodeError", "decode", "encode"]
