"""Matplotlib figures the labs draw: slot occupancy, latency vs throughput, memory, roofline, speedups.

Every function returns the Figure and takes an optional `ax` to draw into. Figures are built with the
object API (matplotlib.figure.Figure, not pyplot), so nothing pops up or piles up in pyplot's global
state; a notebook shows a returned Figure as the cell's value. The backend is left alone on purpose.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

Interval = tuple  # (slot, start, end, request_id); wasted intervals are (slot, start, end)
_SEGMENT_COLORS = {"used": "#4C72B0", "reserved": "#DD8452", "wasted": "#DD8452", "free": "#CFCFCF"}


def _axes(ax: Axes | None, figsize: tuple[float, float] = (7, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _need(items: Any, what: str) -> None:
    if not items:
        raise ValueError(f"{what} is empty: nothing to plot")


def _check_intervals(intervals: Sequence, num_slots: int, n_fields: int, what: str) -> None:
    for iv in intervals:
        if len(iv) != n_fields:
            raise ValueError(f"{what} entries must have {n_fields} fields, got {iv!r}")
        slot, start, end = iv[:3]
        if not 0 <= slot < num_slots:
            raise ValueError(f"{what} entry {iv!r}: slot {slot} is outside 0..{num_slots - 1} (num_slots={num_slots})")
        if end < start:
            raise ValueError(f"{what} entry {iv!r}: end {end} is before start {start}")


def _draw_gantt(ax: Axes, intervals: Sequence, num_slots: int, wasted: Sequence | None, label: str,
                xlabel: str) -> None:
    _need(intervals, f"intervals for {label!r}" if label else "intervals")
    _check_intervals(intervals, num_slots, 4, "interval")
    slots, starts, ends, rids = (np.array(c, dtype=float) for c in zip(*intervals))
    colors = [f"C{int(r) % 10}" for r in rids]
    ax.barh(slots, ends - starts, left=starts, height=0.8, color=colors, edgecolor="white", linewidth=0.5)
    lo, hi = starts.min(), ends.max()
    span = max(hi - lo, 1e-12)
    if len(intervals) <= 64:  # request ids on bars wide enough to hold them
        for s, a, b, r in zip(slots, starts, ends, rids):
            if (b - a) / span > 0.03:
                ax.text((a + b) / 2, s, str(int(r)), ha="center", va="center", fontsize=7, color="white")
    note = ""
    if wasted:
        _check_intervals(wasted, num_slots, 3, "wasted interval")
        ws, wa, wb = (np.array(c, dtype=float) for c in zip(*wasted))
        ax.barh(ws, wb - wa, left=wa, height=0.8, color="none", edgecolor="0.45", hatch="///", linewidth=0.5,
                label="wasted (padding / finished)")
        note = f", {float(np.sum(wb - wa)) / (num_slots * span):.0%} wasted (hatched)"
    busy = float(np.sum(ends - starts)) / (num_slots * span)
    ax.set_title(f"{label + ': ' if label else ''}{busy:.0%} of slot-time busy{note}", fontsize=10)
    ax.set_yticks(range(num_slots))
    ax.set_ylim(num_slots - 0.5, -0.5)  # slot 0 on top
    ax.set_ylabel("slot")
    ax.set_xlabel(xlabel)


def occupancy_gantt(intervals: Sequence | dict[str, Sequence], num_slots: int, title: str = "",
                    ax: Axes | None = None, wasted: Sequence | dict[str, Sequence] | None = None,
                    xlabel: str = "decode step") -> Figure:
    """One bar per request in its batch slot; gaps are idle slots, hatched bars are wasted slot-steps.

    intervals: [(slot, start, end, request_id), ...], or {label: intervals} to stack panels (e.g. static vs
    continuous) on a shared x axis. wasted: [(slot, start, end), ...], or {label: ...} matching intervals.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if isinstance(intervals, dict):
        _need(intervals, "intervals dict")
        if ax is not None:
            raise ValueError("a dict of interval sets draws several panels; pass ax=None")
        if wasted is not None and not isinstance(wasted, dict):
            raise ValueError("with a dict of intervals, wasted must be a dict with the same labels")
        fig = Figure(figsize=(9, 0.25 * num_slots * len(intervals) + 1.5 * len(intervals)), layout="constrained")
        axes = fig.subplots(len(intervals), 1, sharex=True, squeeze=False)[:, 0]
        for a, (label, ivs) in zip(axes, intervals.items()):
            _draw_gantt(a, ivs, num_slots, (wasted or {}).get(label), label, xlabel)
    else:
        fig, ax = _axes(ax, (9, 0.25 * num_slots + 1.5))
        _draw_gantt(ax, intervals, num_slots, wasted, "", xlabel)
    if title:
        fig.suptitle(title)
    return fig


def latency_throughput(curves: dict[str, Sequence[tuple[float, float]]], xlabel: str = "throughput (tok/s)",
                       ylabel: str = "latency (ms)", title: str = "", ax: Axes | None = None,
                       logy: bool = False) -> Figure:
    """One line per system through its (throughput, latency) points, in the order given (rising load)."""
    _need(curves, "curves")
    fig, ax = _axes(ax)
    for name, pts in curves.items():
        _need(pts, f"curve {name!r}")
        x, y = zip(*pts)
        ax.plot(x, y, marker="o", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def memory_bars(categories: dict[str, dict[str, float]], ylabel: str = "KV cache memory (MiB)", title: str = "",
                ax: Axes | None = None) -> Figure:
    """Stacked bars, one per category: {"contiguous": {"used": 40, "reserved": 200, "free": 16}, ...}."""
    _need(categories, "categories")
    segments: list[str] = []
    for name, parts in categories.items():
        _need(parts, f"category {name!r}")
        for seg, v in parts.items():
            if v < 0:
                raise ValueError(f"category {name!r}: {seg}={v} is negative; memory amounts must be >= 0")
            if seg not in segments:
                segments.append(seg)
    fig, ax = _axes(ax)
    names = list(categories)
    bottom = np.zeros(len(names))
    for i, seg in enumerate(segments):
        h = np.array([categories[n].get(seg, 0.0) for n in names], dtype=float)
        ax.bar(names, h, bottom=bottom, label=seg, color=_SEGMENT_COLORS.get(seg, f"C{i + 2}"), edgecolor="white")
        bottom += h
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    return fig


def roofline(peak_flops: float, peak_bw: float, points: dict[str, tuple[float, float]], title: str = "",
             ax: Axes | None = None) -> Figure:
    """Log-log roofline: attainable FLOP/s = min(peak_flops, intensity * peak_bw), with measured points.

    peak_flops in FLOP/s, peak_bw in bytes/s, points {name: (FLOP per byte, achieved FLOP/s)}.
    """
    if not (peak_flops > 0 and peak_bw > 0):
        raise ValueError(f"peak_flops and peak_bw must be > 0, got {peak_flops} and {peak_bw}")
    _need(points, "points")
    for name, (ai, fl) in points.items():
        if not (ai > 0 and fl > 0):
            raise ValueError(f"point {name!r}: intensity and FLOP/s must be > 0 for a log-log plot, got {ai}, {fl}")
    fig, ax = _axes(ax)
    ridge = peak_flops / peak_bw  # intensity where memory-bound turns compute-bound
    ais = [p[0] for p in points.values()] + [ridge]
    xs = np.logspace(np.log10(min(ais) / 4), np.log10(max(ais) * 4), 200)
    ax.plot(xs, np.minimum(peak_flops, xs * peak_bw), color="k", label="roof")
    ax.axvline(ridge, color="0.5", linestyle=":", label=f"ridge {ridge:.3g} FLOP/B")
    for i, (name, (ai, fl)) in enumerate(points.items()):
        ax.scatter([ai], [fl], color=f"C{i}", zorder=3)
        ax.annotate(name, (ai, fl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="performance (FLOP/s)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def speedup_curve(x: Sequence[float], speedups: dict[str, Sequence[float]], xlabel: str,
                  ylabel: str = "speedup (x)", title: str = "", ax: Axes | None = None) -> Figure:
    """Speedup of each variant against x (batch size, draft length, ...), with the y = 1 break-even line."""
    _need(x, "x")
    _need(speedups, "speedups")
    for name, ys in speedups.items():
        if len(ys) != len(x):
            raise ValueError(f"speedups[{name!r}] has {len(ys)} values but x has {len(x)}; give one per x")
    fig, ax = _axes(ax)
    for name, ys in speedups.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def savefig(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
