"""The edge defences, sans-IO: trusted networks, per-source rate limiting and bans, and the
failed-login accounting that stops password guessing (fastsip.proxy.edge)."""

from __future__ import annotations

import logging

import pytest

from fastsip.proxy.edge import SourceGuard, TrustedNetworks
from fastsip.transport._address import HostMemo


def test_a_host_memo_answers_as_its_function_asks_once_per_host_and_stays_bounded() -> None:
    # What the relay path asks about hosts on every message (is it us, private, trusted):
    # remembered, but a flood of made-up hosts must not grow it without bound.
    asked: list[str] = []

    def private(host: str) -> bool:
        asked.append(host)
        return host.startswith("10.")

    memo = HostMemo(private, bound=8)
    assert memo("10.0.0.1") is True and memo("192.0.2.1") is False
    assert memo("10.0.0.1") is True and memo("192.0.2.1") is False
    assert asked == ["10.0.0.1", "192.0.2.1"]
    for i in range(100):
        memo(f"198.51.100.{i}")
    assert 1 <= len(memo) <= 8
    assert memo("10.0.0.1") is True              # forgotten in the flood: asked again
    assert asked.count("10.0.0.1") == 2
    with pytest.raises(TypeError):
        memo(None)  # type: ignore[arg-type]


def test_trusted_networks_match_cidrs_and_hosts() -> None:
    trusted = TrustedNetworks(["192.0.2.0/24", "2001:db8::1", "10.1.2.3"])
    assert "192.0.2.77" in trusted and "10.1.2.3" in trusted
    assert "192.0.3.1" not in trusted and "10.1.2.4" not in trusted
    assert "2001:db8::1" in trusted and "[2001:db8::1]" in trusted
    assert "2001:db8::2" not in trusted
    assert "::ffff:192.0.2.5" in trusted          # an IPv4 peer on a dual-stack socket
    assert "example.com" not in trusted and "" not in trusted
    assert not TrustedNetworks() and "127.0.0.1" not in TrustedNetworks()
    with pytest.raises(ValueError, match="not an IP network"):
        TrustedNetworks(["gateway.example.net"])


def test_rate_limit_bans_a_flooding_source_and_the_ban_expires() -> None:
    guard = SourceGuard(rate=10, burst=20, ban_time=60)
    now = 100.0
    # A burst of 20 passes; the 21st message at the same instant is over the limit.
    assert all(guard.admit("198.51.100.7", now) for _ in range(20))
    assert not guard.admit("198.51.100.7", now)
    assert guard.banned("198.51.100.7", now)
    # Banned: dropped even after the bucket would have refilled ...
    assert not guard.admit("198.51.100.7", now + 30)
    # ... while another source is untouched.
    assert guard.admit("198.51.100.8", now + 30)
    # The ban ends after ban_time: served again.
    assert guard.admit("198.51.100.7", now + 60.5)
    assert not guard.banned("198.51.100.7", now + 60.5)
    assert guard.banned_total == 1 and guard.dropped == 2


def test_rate_limit_allows_a_steady_source_at_the_rate() -> None:
    guard = SourceGuard(rate=10, burst=5, ban_time=60)
    # 10 per second for a minute, evenly spaced: never over.
    assert all(guard.admit("192.0.2.1", 1000.0 + i * 0.1) for i in range(600))
    assert not guard.bans


def test_trusted_sources_are_never_limited_or_banned() -> None:
    guard = SourceGuard(rate=1, burst=1, trusted=["192.0.2.0/24"])
    assert all(guard.admit("192.0.2.9", 0.0) for _ in range(1000))
    for _ in range(50):
        guard.auth_failed("192.0.2.9", "alice", "wrong response", 0.0)
    assert not guard.banned("192.0.2.9", 0.0)


def test_a_new_trusted_set_takes_over_at_once() -> None:
    # admit() keeps the hosts its trusted set vouched for; a reload that sets another set
    # (serve's SIGHUP) must not leave an old answer behind, nor keep asking the old set.
    guard = SourceGuard(rate=1, burst=1, trusted=["192.0.2.0/24"])
    assert all(guard.admit("192.0.2.9", 0.0) for _ in range(5))
    guard.trusted = TrustedNetworks(["198.51.100.0/24"])
    assert guard.admit("192.0.2.9", 0.0) and not guard.admit("192.0.2.9", 0.0)
    assert all(guard.admit("198.51.100.4", 0.0) for _ in range(5))

    class Counting(TrustedNetworks):
        """Counts its answers: the kept ones are not asked again."""
        __slots__ = ("asked",)

        def __init__(self, networks: list[str]) -> None:
            super().__init__(networks)
            self.asked = 0
            inner = self.host_trusted

            def host_trusted(host: str) -> bool:
                self.asked += 1
                return inner(host)
            self.host_trusted = host_trusted

    counting = Counting(["192.0.2.0/24"])
    guard.trusted = counting             # (192.0.2.9 went over its rate above: banned now)
    assert all(guard.admit("192.0.2.10", 0.0) for _ in range(100))
    assert counting.asked == 1
    # An untrusted host is asked about every time (nothing of a flood's sources is kept)
    # and gets its token bucket.
    assert guard.admit("203.0.113.1", 0.0) and counting.asked == 2
    assert not guard.admit("203.0.113.1", 0.0) and guard.banned("203.0.113.1", 0.0)


def test_rate_zero_turns_limiting_off() -> None:
    guard = SourceGuard(rate=0)
    assert all(guard.admit("198.51.100.7", 0.0) for _ in range(10_000))
    assert len(guard) == 0


def test_guessing_blocks_the_user_from_that_source_then_bans_it(
        caplog: pytest.LogCaptureFixture) -> None:
    guard = SourceGuard(user_failures=5, source_failures=10, ban_time=300)
    attacker, phone = "203.0.113.66", "198.51.100.20"
    caplog.set_level(logging.WARNING, "fastsip.proxy.edge")
    for i in range(4):
        guard.auth_failed(attacker, "alice", "wrong response (bad password?)", 10.0 + i)
        assert not guard.auth_blocked(attacker, "alice", 10.0 + i)
    guard.auth_failed(attacker, "alice", "wrong response (bad password?)", 15.0)
    # Five guesses: alice is blocked from there, not from her own phone.
    assert guard.auth_blocked(attacker, "alice", 15.0)
    assert not guard.auth_blocked(phone, "alice", 15.0)
    assert not guard.banned(attacker, 15.0)
    for i in range(5):
        guard.auth_failed(attacker, "alice", "blocked after repeated failures", 16.0 + i)
    # Ten failed logins: the source is banned, and what it sends is dropped.
    assert guard.banned(attacker, 21.0) and not guard.admit(attacker, 21.0)
    assert guard.admit(phone, 21.0)
    failures = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(failures) == 10
    assert "user=alice source=203.0.113.66" in failures[0].getMessage()
    assert any("banned 203.0.113.66" in r.getMessage() for r in caplog.records)


def test_failures_that_reveal_nothing_are_logged_not_counted() -> None:
    guard = SourceGuard(user_failures=2, source_failures=3)
    for _ in range(20):
        guard.auth_failed("198.51.100.7", "alice", "nonce not issued by us", 0.0, guess=False)
    assert not guard.auth_blocked("198.51.100.7", "alice", 0.0)
    assert not guard.banned("198.51.100.7", 0.0) and guard.failed_logins == 0


def test_failures_age_out_of_the_window() -> None:
    guard = SourceGuard(user_failures=3, source_failures=100, failure_window=60)
    for t in (0.0, 1.0):
        guard.auth_failed("198.51.100.7", "bob", "wrong response", t)
    # A typo now and then is not an attack: the count starts again after the window.
    guard.auth_failed("198.51.100.7", "bob", "wrong response", 120.0)
    assert not guard.auth_blocked("198.51.100.7", "bob", 120.0)


def test_log_fields_from_the_wire_cannot_forge_lines(caplog: pytest.LogCaptureFixture) -> None:
    guard = SourceGuard()
    caplog.set_level(logging.WARNING, "fastsip.proxy.edge")
    guard.auth_failed("198.51.100.7", 'x\x1b[31m" banned=1\nfake', "wrong response", 0.0)
    line = caplog.records[0].getMessage()
    assert "\n" not in line and "\x1b" not in line and 'banned=1"' not in line
    assert 'user="x?[31m? banned=1?fake"' in line


def test_state_stays_bounded_under_many_sources() -> None:
    guard = SourceGuard(rate=5, burst=5, max_sources=1000, ban_time=10)
    # 20,000 distinct (spoofed) sources, each flooding: the tables never exceed the cap,
    # and untracked sources are let through to the other caps rather than costing memory.
    for i in range(20_000):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        for _ in range(7):
            guard.admit(host, 0.0)
        assert len(guard._sources) <= 1000 and len(guard.bans) <= 1000
    # Once time passes, the sweep frees what no longer matters.
    assert guard.sweep(100.0) > 0
    assert len(guard) == 0
