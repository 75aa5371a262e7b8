"""bench/chart.py: the SVG chart bench/speed.py draws (no plotting library)."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from chart import bar_chart_svg, log_ticks  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def bars(svg: str) -> dict[str, float]:
    """Each bar's tooltip and height."""
    root = ET.fromstring(svg)
    return {rect.find(f"{SVG}title").text: float(rect.get("height"))
            for rect in root.iter(f"{SVG}rect") if rect.get("class") == "bar"}


def test_ticks_reach_the_largest_value():
    assert log_ticks(1.0) == [1]
    assert log_ticks(3.5) == [1, 2, 5]
    assert log_ticks(724) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def test_a_bar_per_value_its_height_on_a_log_scale():
    values = {("breakpoint", "QEMU 11"): 1.75, ("breakpoint", "QEMU 7.2"): 5.23,
              ("park", "QEMU 11"): 2.85, ("sample 10 Hz", "QEMU 7.2"): 0.96}
    got = bars(bar_chart_svg("slowdown", ["breakpoint", "park", "sample 10 Hz"], ["QEMU 11", "QEMU 7.2"], values))
    assert set(got) == {"breakpoint, QEMU 11: 1.75x", "breakpoint, QEMU 7.2: 5.23x", "park, QEMU 11: 2.85x",
                        "sample 10 Hz, QEMU 7.2: 0.96x"}
    assert got["sample 10 Hz, QEMU 7.2: 0.96x"] == 0  # below 1x: at the axis
    # log scale: 5.23 is as far above 2.85 as log(5.23/2.85) of the plot's log(10) decades
    per_decade = got["breakpoint, QEMU 7.2: 5.23x"] / 0.7185
    assert got["park, QEMU 11: 2.85x"] == pytest.approx(per_decade * 0.4548, abs=0.2)


def test_an_empty_chart_is_refused():
    with pytest.raises(ValueError):
        bar_chart_svg("nothing", ["a"], ["b"], {})
