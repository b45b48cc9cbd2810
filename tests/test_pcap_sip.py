"""Every SIP message in the real captures parses, and the fields a transaction and a dialog are
keyed on agree with tshark's independent decode (tests/data/pcap/tshark-sip-fields/).

UDP datagrams are parsed as they are; TCP streams are put back in order by the test's pcap
reader and cut into messages with fastsip.message_length, so the stream framing is checked
against tshark's reassembly too (a message is reported at the frame that completed it).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import fastsip

sys.path.insert(0, str(Path(__file__).parent))
from pcapfile import read_packets, tcp_streams

DATA = Path(__file__).parent / "data" / "pcap"
TSVS = sorted((DATA / "tshark-sip-fields").glob("*.sip-fields.tsv"))


def capture_for(tsv: Path) -> Path:
    return DATA / tsv.name.removesuffix(".sip-fields.tsv")


def messages_by_frame(capture: Path) -> dict[int, list[fastsip.Message]]:
    """frame number -> SIP messages completed in that frame."""
    packets = list(read_packets(capture))
    out: dict[int, list[fastsip.Message]] = defaultdict(list)
    for pkt in packets:
        if pkt.proto == "udp" and pkt.payload[:1].isalpha():
            try:
                out[pkt.frame_number].append(fastsip.parse(pkt.payload))
            except fastsip.ParseError as e:
                out[pkt.frame_number].append(e)  # type: ignore[arg-type]
    for stream in tcp_streams(packets):
        buf = bytes(stream.data)
        pos = 0
        while pos < len(buf):
            try:
                n = fastsip.message_length(buf[pos:])
            except fastsip.ParseError:
                break  # not a SIP stream (or not from its start)
            if n == 0:
                break
            if n < 0:
                pos += -n
                continue
            end = pos + n
            try:
                msg: fastsip.Message | Exception = fastsip.parse(buf[pos:end])
            except fastsip.ParseError as e:
                msg = e  # counts only where tshark says the frame is SIP
            out[stream.frame_at(end - 1)].append(msg)  # type: ignore[arg-type]
            pos = end
    return out


def fields(msgs: list[fastsip.Message]) -> dict[str, str]:
    """Our decode, in tshark's columns (several messages in one frame joined with '|')."""
    cols: dict[str, list[str]] = defaultdict(list)
    for m in msgs:
        if isinstance(m, fastsip.Request):
            cols["sip.Method"].append(m.method)
        else:
            cols["sip.Status-Code"].append(str(m.status_code))
        cols["sip.Call-ID"].append(m.call_id or "")
        if m.cseq is not None:
            cols["sip.CSeq.seq"].append(str(m.cseq.seq))
            cols["sip.CSeq.method"].append(m.cseq.method)
        cols["sip.Via.branch"] += [v.branch for v in m.via if v.branch is not None]
        if m.from_ is not None and m.from_.tag is not None:
            cols["sip.from.tag"].append(m.from_.tag)
        if m.to is not None and m.to.tag is not None:
            cols["sip.to.tag"].append(m.to.tag)
        cl = m.headers.get("Content-Length")
        if cl is not None:
            cols["sip.Content-Length"].append(str(int(cl)))
        if m.max_forwards is not None:
            cols["sip.Max-Forwards"].append(str(m.max_forwards))
    return {k: "|".join(v) for k, v in cols.items()}


COMPARED = ["sip.Method", "sip.Status-Code", "sip.Call-ID", "sip.CSeq.seq", "sip.CSeq.method",
            "sip.Via.branch", "sip.from.tag", "sip.to.tag", "sip.Content-Length",
            "sip.Max-Forwards"]


def test_there_are_captures() -> None:
    assert len(TSVS) >= 20


@pytest.mark.parametrize("tsv", TSVS, ids=lambda p: p.name.removesuffix(".sip-fields.tsv"))
def test_capture_agrees_with_tshark(tsv: Path) -> None:
    rows = list(csv.DictReader(tsv.open(newline=""), delimiter="\t"))
    assert rows
    ours = messages_by_frame(capture_for(tsv))
    checked = 0
    for row in rows:
        frame = int(row["frame.number"])
        msgs = ours.get(frame)
        assert msgs, f"frame {frame}: tshark sees SIP, we found no message"
        errors = [m for m in msgs if isinstance(m, Exception)]
        assert not errors, f"frame {frame}: {errors[0]}"
        got = fields(msgs)
        for col in COMPARED:
            want = row[col]
            if col == "sip.Method" and row["sip.Status-Code"]:
                continue
            assert got.get(col, "") == want, f"frame {frame} {col}"
        checked += 1
    assert checked == len(rows)
