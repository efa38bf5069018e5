"""Plot titles fit the figure (the old experiment plot's title was cut off at both ends)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from jipfed import reporting

LONG = "exp-with-a-long-name: val_dice_mean per round (sites' held-out cases after local training)"


def test_long_titles_are_wrapped_to_fit() -> None:
    lines = reporting.wrap_title(LONG).split("\n")
    assert len(lines) == 2 and all(len(line) <= reporting.TITLE_WIDTH for line in lines)
    assert " ".join(lines) == LONG


def title_box(title: str, **style: str) -> tuple[float, float, float]:
    """(left, right, figure width) in pixels of ``title`` on plot_rounds' 7 x 4.5 in figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.set_title(title, **style)
    fig.tight_layout()
    box = ax.title.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    return box.x0, box.x1, fig.bbox.width


def test_the_wrapped_title_fits_where_the_long_one_did_not(tmp_path: Path) -> None:
    left, right, width = title_box(LONG)
    assert left < 0 or right > width  # as the old plot set it: cut off at both ends
    left, right, width = title_box(reporting.wrap_title(LONG), fontsize="medium")  # as plot_rounds sets it
    assert left >= 0 and right <= width
    rows = [{"round": r, "global": {"m": 0.1 * r}, "sites": {"a": {"m": 0.2 * r}}} for r in range(3)]
    path = reporting.plot_rounds(tmp_path / "plot.png", rows, metric="m", title=LONG)
    assert Image.open(path).size == (width, 450)
