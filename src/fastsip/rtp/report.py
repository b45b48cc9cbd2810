"""Call-quality reports: a text table, JSON/CSV files and a PNG plot of :class:`QualityRecord`s.

Formatting only: the functions return text or write the one file they are given; nothing is
printed.  matplotlib is optional (``pip install 'fastsip[plot]'``) and imported only by
:func:`plot_report`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastsip.errors import FastSIPError
from fastsip.rtp.quality import QualityRecord

__all__ = ["PlotUnavailableError", "ReportFormatError", "plot_report", "summary_table",
           "write_report"]

#: The CSV columns, in order: every field of a record except the series.
CSV_FIELDS: tuple[str, ...] = tuple(
    name for name in QualityRecord.__dataclass_fields__ if name != "series")


class ReportFormatError(FastSIPError, ValueError):
    """The report path's extension names no format we write (``.json`` or ``.csv``)."""


class PlotUnavailableError(FastSIPError, ImportError):
    """matplotlib, which :func:`plot_report` needs, is not installed."""


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(records: Sequence[QualityRecord]) -> str:
    """A fixed-width table, one row per call and direction, then totals and averages.

    Totals sum packets and losses (loss % is recomputed from the sums); jitter, R and MOS are
    averaged over the rows (unrated ones, shown as "-", left out), and the worst MOS is shown so
    one bad call is not averaged away."""
    header = (f"{'call-id':<24} {'dir':<3} {'packets':>8} {'lost':>6} {'loss%':>6} "
              f"{'jit.mean':>8} {'jit.max':>8} {'rtt':>6} {'R':>5} {'MOS':>4}")
    lines = [header, "-" * len(header)]
    for rec in records:
        call = rec.call_id if len(rec.call_id) <= 24 else rec.call_id[:23] + "~"
        lines.append(
            f"{call:<24} {rec.direction:<3} {rec.packets:>8} {rec.lost:>6} {rec.loss_pct:>6.2f} "
            f"{rec.jitter_ms_mean:>8.2f} {rec.jitter_ms_max:>8.2f} {_fmt(rec.rtt_ms, '.0f'):>6} "
            f"{_fmt(rec.r_factor, '.1f'):>5} {_fmt(rec.mos, '.2f'):>4}")
    lines.append("-" * len(header))
    calls = len({rec.call_id for rec in records})
    for direction in ("rx", "tx"):
        rows = [rec for rec in records if rec.direction == direction]
        if not rows:
            continue
        n = len(rows)
        packets = sum(rec.packets for rec in rows)
        lost = sum(rec.lost for rec in rows)
        expected = sum(rec.expected or rec.packets + rec.lost for rec in rows)
        loss_pct = 100.0 * lost / expected if expected else 0.0
        label = f"total/avg {direction} ({calls} calls)" if calls != 1 else f"total/avg {direction}"
        rated = [(rec.r_factor, rec.mos) for rec in rows
                 if rec.r_factor is not None and rec.mos is not None]
        r_avg = sum(r for r, _ in rated) / len(rated) if rated else None
        mos_avg = sum(m for _, m in rated) / len(rated) if rated else None
        lines.append(
            f"{label:<28} {packets:>8} {lost:>6} {loss_pct:>6.2f} "
            f"{sum(r.jitter_ms_mean for r in rows) / n:>8.2f} "
            f"{max(r.jitter_ms_max for r in rows):>8.2f} {'':>6} "
            f"{_fmt(r_avg, '.1f'):>5} {_fmt(mos_avg, '.2f'):>4}")
        worst = min((m for _, m in rated), default=None)
        lines.append(f"{'worst MOS ' + direction:<28}{_fmt(worst, '.2f'):>59}")
    return "\n".join(lines) + "\n"


def write_report(records: Sequence[QualityRecord], path: str | os.PathLike[str]) -> Path:
    """Write the records to ``path`` as JSON (a list of objects, the per-second series under
    ``"series"``) or CSV (one flat row per record, no series), chosen by the extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps([rec.as_dict() for rec in records], indent=2) + "\n"
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: "" if v is None else v for k, v in rec.as_dict(series=False).items()})
        text = buffer.getvalue()
    else:
        raise ReportFormatError(
            f"cannot write a quality report as {suffix or 'a file without extension'!r}: "
            "use a .json or .csv path")
    path.write_text(text, encoding="utf-8")
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailableError(
            "plotting a quality report needs matplotlib: pip install 'fastsip[plot]'") from exc
    matplotlib.use("Agg")       # files only: never a window, works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_report(records: Sequence[QualityRecord], path: str | os.PathLike[str]) -> Path:
    """Draw jitter (ms) and packets lost per second against time, one line per call and
    direction, and save it as a PNG at ``path``."""
    plt = _pyplot()
    path = Path(path)
    fig, (ax_jitter, ax_loss) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    try:
        for rec in records:
            seconds = [s.second for s in rec.series]
            label = f"{rec.call_id} {rec.direction}"
            ax_jitter.plot(seconds, [s.jitter_ms for s in rec.series], label=label)
            # Each second's loss is drawn across that second (a closing edge after the last).
            lost = [s.lost for s in rec.series]
            if seconds:
                ax_loss.step([*seconds, seconds[-1] + 1], [*lost, lost[-1]], where="post",
                             label=label)
        ax_jitter.set_ylabel("jitter (ms)")
        ax_jitter.set_ylim(bottom=0)
        ax_loss.set_ylim(bottom=0)
        ax_loss.set_ylabel("packets lost / s")
        ax_loss.set_xlabel("time since the first packet (s)")
        ax_jitter.set_title("call quality")
        if records:
            ax_jitter.legend(loc="upper right", fontsize="small")
        ax_jitter.grid(True, alpha=0.3)
        ax_loss.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
