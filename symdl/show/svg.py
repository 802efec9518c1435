"""SVG written by symdl itself: labelled boxes joined by arrows, laid out by ``layout``.

``Drawing`` is what ``plot_model`` and ``draw`` return: a notebook shows it
(``_repr_svg_``, ``_repr_mimebundle_``), ``save(path)`` writes it, ``str()`` is the SVG text.
Every box is ``<g class="node">`` with one ``<rect>``; every edge a ``<polyline class="edge">``
whose ``data-from`` / ``data-to`` name the nodes' ids, so tests (and people) can check it.

>>> d = render([["a"], ["b", "second line"]], [(0, 1)], title="demo")
>>> d.svg.startswith("<svg") and d.svg.count('<g class="node '), d.node_count, d.edge_count
(2, 2, 1)
"""
from __future__ import annotations

import hashlib
import os
from xml.sax.saxutils import escape, quoteattr

from .layout import layout

#: Text metrics for the monospace font the drawing uses (DejaVu Sans Mono, Menlo, Consolas at 12 px).
FONT_SIZE, CHAR_WIDTH, LINE_HEIGHT, PADDING = 12.0, 7.4, 15.0, 8.0

#: Fill and stroke per node kind.
STYLES = {
    "input": ("#e8f1fb", "#3b73b9"),
    "layer": ("#f4f4f4", "#555555"),
    "merge": ("#fdf1e3", "#c77a1c"),
    "param": ("#eaf6ea", "#3d8b3d"),
    "op": ("#f4f4f4", "#555555"),
    "output": ("#fbeaea", "#b33a3a"),
}


class Drawing:
    """An SVG picture: ``svg`` (the text), ``save(path)``, and its display in a notebook."""

    def __init__(self, svg: str, node_count: int, edge_count: int, title: str = ""):
        self.svg, self.node_count, self.edge_count, self.title = svg, node_count, edge_count, title

    def __str__(self):
        return self.svg

    def __repr__(self):
        return f"<Drawing {self.title!r}: {self.node_count} nodes, {self.edge_count} edges>"

    def _repr_svg_(self):
        return self.svg

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"image/svg+xml": self.svg, "text/plain": repr(self)}
        if include is not None:
            bundle = {k: v for k, v in bundle.items() if k in include}
        if exclude is not None:
            bundle = {k: v for k, v in bundle.items() if k not in exclude}
        return bundle

    def save(self, path) -> str:
        """Write the SVG to ``path`` (its extension must be ``.svg``); returns the path."""
        path = os.fspath(path)
        if not path.lower().endswith(".svg"):
            raise ValueError(f"Drawing.save writes SVG: give a path ending in .svg, got {path!r} "
                             "(convert it with a browser or cairosvg for other formats)")
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.svg)
        return path


def box_size(lines) -> tuple:
    """The (w, h) of a box holding ``lines`` of text."""
    longest = max((len(s) for s in lines), default=1)
    return max(longest, 3) * CHAR_WIDTH + 2 * PADDING, len(lines) * LINE_HEIGHT + 2 * PADDING - 4


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def render(labels, edges, kinds=None, names=None, title: str = "") -> Drawing:
    """Draw boxes labelled ``labels[i]`` (a list of lines; the first is bold) and ``edges``
    ``[(u, v), ...]``, left to right. ``kinds[i]`` picks a style from ``STYLES``; ``names[i]``
    is written into the node's ``data-name``."""
    count = len(labels)
    kinds = list(kinds or ["op"] * count)
    names = list(names or [lines[0] for lines in labels])
    sizes = [box_size(lines) for lines in labels]
    lay = layout(sizes, edges)
    uid = "symdl-" + hashlib.sha1(repr((labels, list(edges))).encode()).hexdigest()[:10]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(lay.width)}" height="{_num(lay.height)}" '
           f'viewBox="0 0 {_num(lay.width)} {_num(lay.height)}" font-family="DejaVu Sans Mono, Menlo, Consolas, '
           f'monospace" font-size="{_num(FONT_SIZE)}" role="img">']
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append(f'<defs><marker id="{uid}-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
               'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/>'
               "</marker></defs>")
    out.append(f'<rect width="{_num(lay.width)}" height="{_num(lay.height)}" fill="white"/>')
    out.append('<g class="edges" fill="none" stroke="#666" stroke-width="1.3">')
    for (u, v), points in zip(edges, lay.routes):
        pts = " ".join(f"{_num(x)},{_num(y)}" for x, y in points)
        out.append(f'<polyline class="edge" data-from="{uid}-n{u}" data-to="{uid}-n{v}" points="{pts}" '
                   f'marker-end="url(#{uid}-arrow)"/>')
    out.append("</g>")
    out.append('<g class="nodes">')
    for i, (lines, (x, y, w, h)) in enumerate(zip(labels, lay.boxes)):
        fill, stroke = STYLES.get(kinds[i], STYLES["op"])
        out.append(f'<g class="node {escape(kinds[i])}" id="{uid}-n{i}" data-name={quoteattr(str(names[i]))}>')
        out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" height="{_num(h)}" rx="4" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="1.2"/>')
        for k, line in enumerate(lines):
            weight = ' font-weight="bold"' if k == 0 else ""
            ty = y + PADDING + FONT_SIZE - 2 + k * LINE_HEIGHT
            out.append(f'<text x="{_num(x + w / 2)}" y="{_num(ty)}" text-anchor="middle"{weight}>{escape(line)}</text>')
        out.append("</g>")
    out.append("</g></svg>")
    return Drawing("\n".join(out), count, len(edges), title)


__all__ = ["Drawing", "box_size", "render"]
