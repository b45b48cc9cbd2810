"""JitterBuffer: reordering, duplicates, late packets, loss, wraparound, jumps, overflow,
adaptive target, and the batch playout agreeing with the per-packet API."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.rtp import FrameKind, JitterBuffer, RtpPacket

PT = 0.02


def packet(i: int, seq0: int = 1000, ts0: int = 5000) -> RtpPacket:
    return RtpPacket(sequence_number=(seq0 + i) & 0xFFFF, timestamp=(ts0 + 160 * i) & 0xFFFFFFFF,
                     payload=i.to_bytes(4, "big"))


def run(jb: JitterBuffer, arrivals: list[tuple[float, RtpPacket]], slots: int, start: float = 0.0):
    """Drive the buffer as a receiver would: puts when packets arrive, a get every ptime."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    frames, i = [], 0
    for k in range(slots):
        t = start + k * PT
        while i < len(arrivals) and arrivals[i][0] <= t:
            jb.put(arrivals[i][1], arrivals[i][0])
            i += 1
        frames.append(jb.get(t))
    return frames


def kinds(frames):
    return "".join("NME"[f.kind] for f in frames)


def test_in_order_stream_plays_every_packet_after_the_prefetch():
    jb = JitterBuffer(8000, PT, delay=0.06)
    frames = run(jb, [(i * PT, packet(i)) for i in range(50)], 60)
    played = [f for f in frames if f.kind == FrameKind.NORMAL]
    assert [f.sequence_number for f in played] == [1000 + i for i in range(50)]
    assert [bytes(f.payload) for f in played] == [i.to_bytes(4, "big") for i in range(50)]
    assert kinds(frames).startswith("EE" + "N" * 50)
    assert jb.lost == jb.late == jb.duplicates == jb.discarded == 0
    assert jb.target_delay == pytest.approx(0.06)
    assert jb.last_delay == pytest.approx(2 * PT)


def test_reordering_within_the_delay_is_invisible():
    order = list(range(40))
    for a in range(0, 38, 4):
        order[a], order[a + 1] = order[a + 1], order[a]
    jb = JitterBuffer(8000, PT, delay=0.06)
    frames = run(jb, [(k * PT, packet(i)) for k, i in enumerate(order)], 50)
    assert [f.sequence_number for f in frames if f.kind == FrameKind.NORMAL] == [1000 + i for i in range(40)]
    assert jb.lost == 0


def test_wraparound_of_sequence_and_timestamp():
    jb = JitterBuffer(8000, PT, delay=0.04)
    pkts = [packet(i, seq0=65530, ts0=0xFFFFFF00) for i in range(20)]
    frames = run(jb, [(i * PT, p) for i, p in enumerate(pkts)], 30)
    played = [f for f in frames if f.kind == FrameKind.NORMAL]
    assert [f.sequence_number for f in played] == [(65530 + i) & 0xFFFF for i in range(20)]
    ext = [f.extended_sequence_number for f in played]
    assert ext == list(range(ext[0], ext[0] + 20))      # monotonic across the wrap
    assert [f.timestamp for f in played] == [(0xFFFFFF00 + 160 * i) & 0xFFFFFFFF for i in range(20)]


def test_duplicates_are_counted_and_never_played_twice():
    jb = JitterBuffer(8000, PT, delay=0.04)
    arrivals = [(i * PT, packet(i)) for i in range(20)]
    arrivals += [(i * PT + 0.001, packet(i)) for i in (3, 4)]        # while still buffered
    arrivals += [(15 * PT, packet(2))]                              # long after it was played
    frames = run(jb, arrivals, 30)
    seqs = [f.sequence_number for f in frames if f.kind == FrameKind.NORMAL]
    assert seqs == [1000 + i for i in range(20)]
    assert jb.duplicates == 3
    assert jb.late == 0


def test_loss_gives_a_missing_frame_and_a_late_packet_is_dropped():
    jb = JitterBuffer(8000, PT, delay=0.04)
    arrivals = [(i * PT, packet(i)) for i in range(20) if i != 7]
    arrivals.append((14 * PT, packet(7)))        # long after its slot
    frames = run(jb, arrivals, 25)
    body = [f for f in frames if f.kind != FrameKind.EMPTY]
    missing = [f for f in body if f.kind == FrameKind.MISSING]
    assert len(missing) == 1
    assert missing[0].sequence_number == 1007
    assert missing[0].timestamp == 5000 + 160 * 7       # stands for the packet it replaces
    assert missing[0].packet is None
    assert jb.lost == 1 and jb.late == 1
    assert [f.sequence_number for f in body] == [1000 + i for i in range(20)]


def test_outage_refills_without_a_storm_of_missing_frames():
    jb = JitterBuffer(8000, PT, delay=0.04)
    arrivals = [(i * PT, packet(i)) for i in range(100) if not 20 <= i < 70]
    frames = run(jb, arrivals, 110)
    assert sum(f.kind == FrameKind.MISSING for f in frames) == 0
    assert jb.lost == 50                  # skipped when playout resumed
    assert jb.empty > 0
    seqs = [f.sequence_number for f in frames if f.kind == FrameKind.NORMAL]
    assert seqs == [1000 + i for i in range(100) if not 20 <= i < 70]


def test_big_jump_resyncs_after_two_packets_and_a_stray_is_ignored():
    jb = JitterBuffer(8000, PT, delay=0.04)
    arrivals = [(i * PT, packet(i)) for i in range(10)]
    arrivals.append((10 * PT, packet(0, seq0=40000, ts0=1)))           # one stray
    arrivals += [(PT * (10 + i) + 0.001, packet(10 + i)) for i in range(10)]
    arrivals += [(PT * (20 + i) + 0.001, packet(i, seq0=20000, ts0=99)) for i in range(20)]
    frames = run(jb, arrivals, 50)
    seqs = [f.sequence_number for f in frames if f.kind == FrameKind.NORMAL]
    assert seqs[:20] == [1000 + i for i in range(20)]
    assert 40000 not in seqs
    assert seqs[20:] == [20000 + i for i in range(len(seqs) - 20)]
    assert len(seqs) > 30
    assert jb.resyncs == 1
    assert sum(f.kind == FrameKind.MISSING for f in frames) == 0


def test_overflow_drops_only_the_oldest():
    jb = JitterBuffer(8000, PT, delay=0.04, max_delay=0.2)
    cap = jb.capacity
    for i in range(3 * cap):
        jb.put(packet(i), i * PT)       # nobody calls get
    assert jb.buffered == cap           # full, not flushed
    assert jb.discarded == 2 * cap
    frames = jb.flush()
    assert [f.sequence_number for f in frames] == [1000 + i for i in range(2 * cap, 3 * cap)]


def test_fixed_mode_shrinks_gradually_after_a_burst():
    jb = JitterBuffer(8000, PT, delay=0.04, shrink_after=5)
    arrivals = [(i * PT, packet(i)) for i in range(10)]
    arrivals += [(10 * PT + 0.0001 * i, packet(10 + i)) for i in range(10)]   # a burst
    arrivals += [(PT * (10 + i), packet(20 + i)) for i in range(60)]
    frames = run(jb, arrivals, 80)
    # the excess is shed one frame at a time, spaced by at least shrink_after slots
    seqs = [f.sequence_number for f in frames if f.kind == FrameKind.NORMAL]
    gaps = [i for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1]
    assert jb.discarded == len(gaps) > 0
    assert all(b - a >= 4 for a, b in itertools.pairwise(gaps))
    assert jb.current_delay <= jb.target_delay + 2 * PT
    assert sum(f.kind == FrameKind.MISSING for f in frames) == 0


def test_adaptive_target_follows_jitter_up_and_down():
    rng = random.Random(7)
    jitter = [0.001] * 200 + [0.1] * 600 + [0.001] * 1500     # calm, noisy, calm again
    arrivals = [(i * PT + rng.random() * j, packet(i)) for i, j in enumerate(jitter)]
    jb = JitterBuffer(8000, PT, adaptive=True, delay=0.02, max_delay=0.4, history=200)
    frames, targets, i = [], [], 0
    for k in range(len(jitter) + 10):
        t = k * PT
        while i < len(arrivals) and arrivals[i][0] <= t:
            jb.put(arrivals[i][1], arrivals[i][0])
            i += 1
        frames.append(jb.get(t))
        targets.append(jb.target_delay)
    assert max(targets[100:200]) <= 0.04
    assert 0.1 <= targets[799] <= 0.16          # the 95th percentile of 0..100 ms, plus a frame
    assert max(targets[100:800]) <= 0.16
    assert targets[-1] <= 0.06                  # and back down once the network calms
    assert jb.current_delay <= jb.target_delay + 2 * PT
    late_after_adapting = jb.late
    assert late_after_adapting < 40             # most of the jitter is absorbed
    calm_tail = frames[1100:]
    assert sum(f.kind == FrameKind.MISSING for f in calm_tail) == 0
    # shrinking happened by discarding, one frame at a time
    assert jb.discarded > 0
    assert jb.played + jb.discarded + jb.late == jb.received


def _events(seed: int, n: int = 3000):
    rng = np.random.default_rng(seed)
    seq = (np.arange(n) + 65000) & 0xFFFF
    ts = (np.arange(n) * 160 + 0xFFFF0000) & 0xFFFFFFFF
    arr = np.arange(n) * PT + rng.exponential(0.015, n)
    keep = rng.random(n) > 0.03                             # 3 % loss
    dup = rng.random(n) < 0.02                              # 2 % duplicated
    idx = np.concatenate([np.nonzero(keep)[0], np.nonzero(keep & dup)[0]])
    a = arr[idx] + np.where(np.arange(len(idx)) >= keep.sum(), 0.005, 0)
    order = np.argsort(a, kind="stable")
    return seq[idx][order], ts[idx][order], a[order]


@pytest.mark.parametrize("adaptive", [False, True])
def test_batch_playout_matches_the_per_packet_api(adaptive):
    seq, ts, arr = _events(3)
    batch = JitterBuffer(8000, PT, adaptive=adaptive)
    kind, ext, index, times = batch.playout(seq, ts, arr)
    one = JitterBuffer(8000, PT, adaptive=adaptive)
    pkts = [RtpPacket(sequence_number=int(s), timestamp=int(t)) for s, t in zip(seq, ts)]
    got_kind, got_ext, i = [], [], 0
    for t in times:
        while i < len(arr) and arr[i] <= t:
            one.put(pkts[i], float(arr[i]))
            i += 1
        if i >= len(arr):
            break
        f = one.get(float(t))
        got_kind.append(int(f.kind))
        got_ext.append(f.extended_sequence_number if f.kind != FrameKind.EMPTY else -1)
    rest = one.flush()
    got_kind += [int(f.kind) for f in rest]
    got_ext += [f.extended_sequence_number for f in rest]
    assert got_kind == kind.tolist()
    assert got_ext == ext.tolist()
    played = index[kind == 0]
    assert (seq[played] == (ext[kind == 0] & 0xFFFF)).all()
    assert len(set(ext[kind != 2].tolist())) == int((kind != 2).sum())    # no slot twice
    assert batch.duplicates > 0 and batch.lost > 0
    a, b = batch.stats(), one.stats()
    a.pop("last_delay"), b.pop("last_delay")   # flush() has no clock
    assert a == b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 80), st.floats(0, 0.2), st.booleans()), max_size=120),
       st.integers(0, 65535), st.booleans())
def test_random_streams_keep_the_invariants(ops, seq0, adaptive):
    jb = JitterBuffer(8000, PT, adaptive=adaptive, max_delay=0.2)
    arrivals = [(i * PT + delay, packet(i % 70 if wild else i, seq0=seq0))
                for i, (_, delay, wild) in enumerate(ops)]
    frames = run(jb, arrivals, len(ops) + 20) + jb.flush()
    ext = [f.extended_sequence_number for f in frames if f.kind != FrameKind.EMPTY]
    assert ext == sorted(ext) and len(set(ext)) == len(ext)   # in order, each slot once
    assert jb.played == sum(f.kind == FrameKind.NORMAL for f in frames)
    assert jb.played + jb.duplicates + jb.late + jb.discarded + jb.buffered <= jb.received
    assert jb.buffered == 0
