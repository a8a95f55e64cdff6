"""Label placement for scatter figures: labels off each other and off the points, with leader
lines where they must move."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------
# Labels that do not overlap


def place_labels(axes: Any, points: list[tuple[float, float, str, dict[str, Any]]]) -> list[Any]:
    """Label each point beside it, trying positions around it (further out, with a leader
    line, when the near ones are taken) so that no label covers another label or a point.
    Returns each label's box in display coordinates, in the order of `points`."""
    from matplotlib.text import Text

    figure = axes.figure
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    taken = []
    for x, y, _, _ in points:
        cx, cy = axes.transData.transform((x, y))
        taken.append(_box(cx - 4, cy - 4, cx + 4, cy + 4))
    directions = [
        (1, 0.6),
        (1, -0.6),
        (-1, 0.6),
        (-1, -0.6),
        (0, 1),
        (0, -1),
        (0.5, 1),
        (-0.5, 1),
        (0.5, -1),
        (-0.5, -1),
        (1, 0),
        (-1, 0),
    ]
    for x, y, text, style in points:
        placed = None
        for radius in (7, 16, 28, 42, 58, 76, 96, 118, 142, 168, 196):  # points
            for dx, dy in directions:
                offset = (dx * radius, dy * radius)
                label = axes.annotate(
                    text,
                    (x, y),
                    xytext=offset,
                    textcoords="offset points",
                    ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                    va="bottom" if dy > 0 else ("top" if dy < 0 else "center"),
                    fontsize=7,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6}
                    if radius > 7
                    else None,
                    **style,
                )
                label.update_positions(renderer)
                box = Text.get_window_extent(label, renderer)  # the text, not its leader line
                inside = (
                    box.x0 >= frame.x0
                    and box.x1 <= frame.x1
                    and box.y0 >= frame.y0
                    and box.y1 <= frame.y1
                )
                if inside and not any(_overlaps(box, other) for other in taken):
                    placed = box
                    break
                label.remove()
            if placed is not None:
                break
        if placed is None:  # crowded beyond every candidate: the nearest position, regardless
            label = axes.annotate(
                text, (x, y), xytext=(7, 4), textcoords="offset points", fontsize=7, **style
            )
            label.update_positions(renderer)
            placed = Text.get_window_extent(label, renderer)
        taken.append(placed)
    return taken[len(points) :]


def _box(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _overlaps(a: Any, b: Any) -> bool:
    pad = 1.5  # pixels of air between labels
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad
