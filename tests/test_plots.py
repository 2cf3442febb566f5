import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.figure import Figure

from servelab import plots

IVS = [(0, 0, 5, 0), (1, 0, 3, 1), (1, 4, 9, 2)]  # a gap in slot 1 between steps 3 and 4


def test_gantt_single_panel_with_wasted_overlay():
    fig = plots.occupancy_gantt(IVS, num_slots=2, title="static", wasted=[(0, 5, 9)])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 + 1
    assert ax.get_title() == "72% of slot-time busy, 22% wasted (hatched)"  # 13 and 4 of 2 slots x 9 steps


def test_gantt_dict_stacks_panels_on_shared_x():
    fig = plots.occupancy_gantt({"static": IVS, "continuous": IVS[:2]}, num_slots=2,
                                wasted={"static": [(0, 5, 9)]})
    top, bottom = fig.axes
    assert len(top.patches) == 4 and len(bottom.patches) == 2
    assert top.get_shared_x_axes().joined(top, bottom)
    assert top.get_title().startswith("static:")


def test_gantt_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.occupancy_gantt(IVS, 2, ax=ax) is fig


def test_latency_throughput_and_speedup_curve():
    fig = plots.latency_throughput({"static": [(10, 50), (20, 90)], "continuous": [(10, 30), (25, 60), (40, 95)]})
    assert len(fig.axes[0].lines) == 2
    fig = plots.speedup_curve([1, 2, 4], {"draft": [1.1, 1.3, 1.2], "lookup": [1.4, 1.5, 0.9]}, "gamma")
    assert len(fig.axes[0].lines) == 3  # two curves + the y = 1 line


def test_memory_bars_are_stacked():
    fig = plots.memory_bars({"contiguous": {"used": 40, "reserved": 200, "free": 16},
                             "paged": {"used": 40, "free": 216}})
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 3
    assert max(p.get_y() + p.get_height() for p in ax.patches) == pytest.approx(256)


def test_roofline():
    fig = plots.roofline(1e12, 1e11, {"decode": (1.0, 5e10), "prefill": (100.0, 8e11)})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.collections) == 2 and len(ax.lines) == 2  # roof + ridge marker


def test_savefig(tmp_path):
    path = plots.savefig(plots.speedup_curve([1, 2], {"a": [1, 2]}, "x"), tmp_path / "sub" / "f.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("make, match", [
    (lambda: plots.occupancy_gantt([], 2), "empty"),
    (lambda: plots.occupancy_gantt({}, 2), "empty"),
    (lambda: plots.occupancy_gantt([(2, 0, 1, 0)], 2), "outside 0..1"),
    (lambda: plots.occupancy_gantt([(0, 3, 1, 0)], 2), "before start"),
    (lambda: plots.occupancy_gantt([(0, 1, 2)], 2), "4 fields"),
    (lambda: plots.occupancy_gantt(IVS, 2, wasted=[(5, 0, 1)]), "outside"),
    (lambda: plots.occupancy_gantt(IVS, 0), "num_slots"),
    (lambda: plots.latency_throughput({}), "empty"),
    (lambda: plots.memory_bars({}), "empty"),
    (lambda: plots.memory_bars({"a": {"used": -1}}), "negative"),
    (lambda: plots.roofline(0, 1, {"a": (1, 1)}), "> 0"),
    (lambda: plots.roofline(1, 1, {}), "empty"),
    (lambda: plots.roofline(1, 1, {"a": (0, 1)}), "log-log"),
    (lambda: plots.speedup_curve([1, 2], {"a": [1]}, "x"), "one per x"),
    (lambda: plots.speedup_curve([1], {}, "x"), "empty"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
