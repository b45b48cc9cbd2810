"""The call table of ``serve --workers`` (fastsip.transport._placement): where a new call is
placed, how every other worker finds it, what a full bucket gives up, how loads are read --
in one process through two views of one mapping, and across real processes sharing it."""

from __future__ import annotations

import mmap
import multiprocessing
import sys
import time

import pytest

from fastsip.transport._placement import (
    BUCKET,
    LOAD_SMOOTHING,
    LOAD_WINDOW,
    CallPlacement,
    format_table,
    table_bytes,
)


def table(count: int = 2, slots: int = 1024) -> mmap.mmap:
    """An anonymous shared mapping (shared with children forked later), formatted."""
    shared = mmap.mmap(-1, table_bytes(count, slots))
    format_table(shared, count, slots)
    return shared


def busy(seconds: float) -> None:
    """Burn CPU for ``seconds`` of wall time (a worker at full load)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_table_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ValueError):
        table_bytes(0)
    with pytest.raises(ValueError):
        table_bytes(2, BUCKET + 1)              # not whole buckets
    with pytest.raises(ValueError):
        format_table(bytearray(10), 2, 64)
    unformatted = mmap.mmap(-1, table_bytes(2, 64))
    with pytest.raises(ValueError, match="format_table"):
        CallPlacement(unformatted, 0, 2, 0.5, 64)
    shared = table(3, 64)
    with pytest.raises(ValueError, match="format_table"):
        CallPlacement(shared, 0, 2, 0.5, 64)    # formatted for three workers, read as two
    with pytest.raises(ValueError):
        CallPlacement(shared, 2, 2, 0.5, 64)    # no worker 2 of 2


def test_a_new_call_stays_where_it_arrived_and_every_worker_finds_it() -> None:
    shared = table()
    zero, one = CallPlacement(shared, 0, 2, 0.5, 1024), CallPlacement(shared, 1, 2, 0.5, 1024)
    assert zero.owner("a@host", True) == 0 and zero.fresh and zero.kept == 1
    # Its CANCEL, ACK, responses and retransmissions, wherever the kernel hands them:
    assert one.owner("a@host", False) == 0 and not one.fresh
    assert one.owner("a@host", True) == 0 and not one.fresh     # (a retransmitted INVITE)
    assert zero.owner("a@host", False) == 0
    # A message of a call no one placed: the caller falls back to the Call-ID's hash.
    assert one.owner("unknown@host", False) == -1 and not one.fresh
    # A worker that could not hand a new call over claims it.
    assert one.owner("b@host", True) == 1
    zero.claim("b@host")
    assert one.owner("b@host", False) == 0
    # Call-IDs with bytes that are not UTF-8 (kept as lone surrogates) hash as well.
    assert zero.owner("\udcff\udcfe@host", True) == 0
    assert one.owner("\udcff\udcfe@host", False) == 0


def test_a_busy_worker_passes_new_calls_to_the_busiest_one_still_under_the_threshold() -> None:
    shared = table(3)
    workers = [CallPlacement(shared, i, 3, 0.5, 1024) for i in range(3)]
    receiver = workers[0]
    busy(LOAD_SMOOTHING * 2)                # (the load is an average: long enough to show)
    receiver.measure()
    assert receiver.load > 0.5
    # Worker 2 is loaded 0.3 (under the threshold), worker 1 idle: packing prefers worker 2.
    loads = memoryview(shared).cast("d")
    loads[8 + 2 * 2], loads[8 + 2 * 2 + 1] = 0.3, time.monotonic()
    assert receiver.owner("c@host", True) == 2 and receiver.passed == 1 and receiver.fresh
    assert workers[1].owner("c@host", False) == 2
    # Both others over the threshold: the least busy of all (not the receiver, busier).
    loads[8 + 2 * 1], loads[8 + 2 * 1 + 1] = 0.6, time.monotonic()
    loads[8 + 2 * 2], loads[8 + 2 * 2 + 1] = 0.7, time.monotonic()
    assert receiver.owner("d@host", True) == 1
    loads.release()


def test_one_busy_window_does_not_make_a_quiet_worker_pass_calls_on() -> None:
    """The load is a moving average: a lone window at a full core (a noisy moment) moves a
    quiet worker's reading by about a fifth, so it keeps its new calls; a sustained load
    still shows within about a second."""
    shared = table()
    zero = CallPlacement(shared, 0, 2, 0.5, 1024)
    for _ in range(5):                     # quiet: a message every window, nothing busy
        time.sleep(LOAD_WINDOW * 1.05)
        zero.measure()
    assert zero.load < 0.1
    busy(LOAD_WINDOW * 1.05)               # one window at a full core
    zero.measure()
    assert 0.02 < zero.load < 0.5, zero.load      # (counted, by about a fifth)
    assert zero.owner("e@host", True) == 0 and zero.passed == 0
    for _ in range(12):                    # busy for 1.2 s: it shows
        busy(LOAD_WINDOW * 1.05)
        zero.measure()
    assert zero.load > 0.5, zero.load
    assert zero.owner("f@host", True) == 1 and zero.passed == 1


def test_a_load_not_refreshed_fades_and_then_reads_idle() -> None:
    shared = table()
    zero, one = CallPlacement(shared, 0, 2, 0.5, 1024), CallPlacement(shared, 1, 2, 0.5, 1024)
    busy(LOAD_SMOOTHING * 2)
    one.measure()
    published = zero.loads()[1]
    assert published > 0.5
    time.sleep(4 * LOAD_WINDOW)            # nothing handled meanwhile: one went idle
    assert zero.loads()[1] < published * 0.75
    time.sleep(1.0)
    assert zero.loads()[1] == 0.0


def test_a_full_bucket_gives_up_its_stalest_call() -> None:
    shared = table(2, BUCKET)                   # one bucket: every call meets every other
    zero, one = CallPlacement(shared, 0, 2, 0.5, BUCKET), CallPlacement(shared, 1, 2, 0.5,
                                                                        BUCKET)
    for n in range(BUCKET):
        assert zero.owner(f"old-{n}", True) == 0
    time.sleep(1.1)                             # (stamps are whole seconds)
    for n in range(1, BUCKET):
        assert one.owner(f"old-{n}", False) == 0    # seen again: fresh stamps
    assert one.owner("new", True) == 1          # takes old-0's slot, the stalest
    assert zero.owner("old-0", False) == -1
    assert all(zero.owner(f"old-{n}", False) == 0 for n in range(1, BUCKET))
    assert zero.owner("new", False) == 1


def _place(shared: mmap.mmap, index: int, prefix: str, calls: int, slots: int) -> None:
    placement = CallPlacement(shared, index, 2, 0.5, slots)
    for n in range(calls):
        placement.owner(f"{prefix}-{n}", True)


@pytest.mark.skipif(sys.platform != "linux", reason="workers (and this table) are Linux's")
def test_two_processes_placing_at_once_never_take_each_others_calls() -> None:
    """Each process places its own calls in a table too small for all of them, at the same
    time: whatever survives is found with the right owner (a slot is written with a
    compare-and-swap, so two calls never end up under one another's owner)."""
    slots, calls = 256, 5000
    shared = table(2, slots)
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_place, args=(shared, i, f"w{i}", calls, slots))
                for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    reader = CallPlacement(shared, 0, 2, 0.5, slots)
    found = {i: [reader.owner(f"w{i}-{n}", False) for n in range(calls)] for i in range(2)}
    for i in range(2):
        assert set(found[i]) <= {i, -1}, i
    # The table is full at the end, of both processes' latest calls.
    survivors = sum(owner >= 0 for i in range(2) for owner in found[i])
    assert survivors == slots
