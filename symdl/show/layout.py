"""A layered drawing of a directed acyclic graph, left to right (Sugiyama's method, small and exact).

1. *Layers*: longest-path layering (a node one column right of its furthest predecessor), then
   each node moved right to just before its first user (a parameter next to the layer reading it).
2. *Dummy nodes*: an edge spanning several columns passes through one zero-width dummy per
   column it crosses, so it is routed through the gaps between nodes, never across one.
3. *Order within a column*: barycentre sweeps (right, then left) reduce edge crossings; the
   order with the fewest crossings seen is kept.
4. *Vertical positions*: each node moves towards the mean of its neighbours, keeping its order
   and a minimum gap (an exact least-squares placement: isotonic regression by pool-adjacent-
   violators).
5. *Routes*: an edge leaves its source on the right side, runs horizontally to the column's
   edge, crosses the empty gap between columns to the next dummy or its target, and enters the
   target on the left side; several edges at one side get their own ports, in order.

>>> lay = layout([(40, 20), (40, 20), (40, 20)], [(0, 1), (1, 2), (0, 2)])
>>> [round(x) for x, _, _, _ in lay.boxes], len(lay.routes[2])  # the long edge passes column 1 by a dummy
([8, 104, 200], 4)
"""
from __future__ import annotations

from typing import NamedTuple

#: Spacing, in pixels: between columns (room for the edges), between boxes of a column,
#: the band an edge through a column (a dummy) keeps free, and the margin around the drawing.
COLUMN_GAP, ROW_GAP, DUMMY_BAND, MARGIN = 56.0, 22.0, 10.0, 8.0


class Layout(NamedTuple):
    """``boxes[i] = (x, y, w, h)`` of node ``i`` (top-left corner), ``routes[k]`` the polyline
    ``[(x, y), ...]`` of edge ``k`` from its source's right side to its target's left side,
    ``columns[i]`` the node's layer, and the drawing's ``width`` and ``height``."""

    boxes: list
    routes: list
    columns: list
    width: float
    height: float


def longest_path_layers(count: int, edges) -> list:
    """Each node's column: one more than the largest of its predecessors' (longest path from the
    sources); then, last node first, every node with successors moves right to just before its
    first successor (it never passes one: the longest path put each successor further right)."""
    preds = [[] for _ in range(count)]
    indegree = [0] * count
    succs = [[] for _ in range(count)]
    for u, v in edges:
        preds[v].append(u)
        succs[u].append(v)
        indegree[v] += 1
    ready = [i for i in range(count) if indegree[i] == 0]
    layer, order = [0] * count, []
    while ready:
        u = ready.pop()
        order.append(u)
        for v in succs[u]:
            layer[v] = max(layer[v], layer[u] + 1)
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    if len(order) != count:
        raise ValueError("layout: the graph has a cycle; only acyclic graphs are drawn in layers")
    for u in reversed(order):  # then each node moves right, to just before its first user: a parameter
        if succs[u]:           # and its broadcast sit next to the layer that reads them, not in column 0
            layer[u] = min(layer[v] for v in succs[u]) - 1
    return layer


def crossings(order, edges_between) -> int:
    """Edge crossings between two adjacent columns (``order``: node -> position)."""
    pairs = sorted((order[a], order[b]) for a, b in edges_between)
    count = 0
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            if pairs[i][0] != pairs[j][0] and pairs[i][1] > pairs[j][1]:
                count += 1
    return count


def _isotonic(values, weights) -> list:
    """The non-decreasing sequence nearest to ``values`` in weighted least squares (pool adjacent violators)."""
    blocks = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out = []
    for m, _, c in blocks:
        out += [m] * c
    return out


def layout(sizes, edges, sweeps: int = 12) -> Layout:
    """Lay out nodes of ``sizes`` ``[(w, h), ...]`` joined by ``edges`` ``[(u, v), ...]`` (u before v)."""
    count = len(sizes)
    edges = [(int(u), int(v)) for u, v in edges]
    for u, v in edges:
        if not (0 <= u < count and 0 <= v < count) or u == v:
            raise ValueError(f"layout: edge ({u}, {v}) does not join two different nodes of {count}")
    layer = longest_path_layers(count, edges)
    # dummies: node ids count.. ; each edge a path of ids through consecutive columns
    width = [float(w) for w, _ in sizes]
    height = [float(h) for _, h in sizes]
    paths = []
    for u, v in edges:
        path = [u]
        for col in range(layer[u] + 1, layer[v]):
            layer.append(col)
            width.append(0.0)
            height.append(DUMMY_BAND)
            path.append(len(layer) - 1)
        path.append(v)
        paths.append(path)
    total = len(layer)
    columns = max(layer) + 1 if layer else 0
    links = sorted({(p[i], p[i + 1]) for p in paths for i in range(len(p) - 1)})
    preds = [[] for _ in range(total)]
    succs = [[] for _ in range(total)]
    for a, b in links:
        preds[b].append(a)
        succs[a].append(b)

    # ordering: first by order of appearance, then barycentre sweeps
    ranks = [[i for i in range(total) if layer[i] == c] for c in range(columns)]
    between = [[(a, b) for a, b in links if layer[a] == c] for c in range(columns)]

    def position(ranks_):
        return {node: i for col in ranks_ for i, node in enumerate(col)}

    def total_crossings(ranks_):
        pos = position(ranks_)
        return sum(crossings(pos, between[c]) for c in range(columns - 1))

    best, best_count = [list(c) for c in ranks], total_crossings(ranks)
    for sweep in range(sweeps):
        forward = sweep % 2 == 0
        cols = range(1, columns) if forward else range(columns - 2, -1, -1)
        pos = position(ranks)
        neighbours = preds if forward else succs

        def key(node):
            near = [pos[m] for m in neighbours[node]]
            return (sum(near) / len(near) if near else pos[node], pos[node])

        for c in cols:
            ranks[c].sort(key=key)
            pos.update((node, i) for i, node in enumerate(ranks[c]))
        found = total_crossings(ranks)
        if found < best_count:
            best, best_count = [list(c) for c in ranks], found
        if best_count == 0:
            break
    ranks = best

    # vertical positions: centres, in order, at least half-heights plus a gap apart
    centre = [0.0] * total
    for col in ranks:
        y = 0.0
        for i, node in enumerate(col):
            if i:
                y += (height[col[i - 1]] + height[node]) / 2 + ROW_GAP
            centre[node] = y
    for sweep in range(8):
        cols = list(range(columns)) if sweep % 2 == 0 else list(range(columns - 1, -1, -1))
        for c in cols:
            col = ranks[c]
            offsets, off = [], 0.0
            for i, node in enumerate(col):
                if i:
                    off += (height[col[i - 1]] + height[node]) / 2 + ROW_GAP
                offsets.append(off)
            wanted, weights = [], []
            for node, off in zip(col, offsets):
                near = [centre[m] for m in preds[node] + succs[node]]
                target = sum(near) / len(near) if near else centre[node]
                wanted.append(target - off)
                weights.append(1.0 if width[node] else 0.5)  # real boxes pull harder than dummies
            for node, off, z in zip(col, offsets, _isotonic(wanted, weights)):
                centre[node] = off + z
    top = min((centre[i] - height[i] / 2 for i in range(total)), default=0.0)
    centre = [c - top + MARGIN for c in centre]

    # columns left to right; boxes centred in their column
    col_width = [max((width[i] for i in ranks[c]), default=0.0) for c in range(columns)]
    col_x, x = [], MARGIN
    for c in range(columns):
        col_x.append(x)
        x += col_width[c] + COLUMN_GAP
    boxes = [(col_x[layer[i]] + (col_width[layer[i]] - width[i]) / 2, centre[i] - height[i] / 2, width[i], height[i])
             for i in range(count)]

    # ports: a side's edges spread over the box, ordered by where they come from / go to
    def next_y(path):
        return centre[path[1]]

    def prev_y(path):
        return centre[path[-2]]

    out_port, in_port = {}, {}
    for node in range(count):
        leaving = sorted((k for k, p in enumerate(paths) if p[0] == node), key=lambda k: (next_y(paths[k]), k))
        entering = sorted((k for k, p in enumerate(paths) if p[-1] == node), key=lambda k: (prev_y(paths[k]), k))
        _, y, _, h = boxes[node]
        for ks, ports in ((leaving, out_port), (entering, in_port)):
            for i, k in enumerate(ks):
                ports[k] = y + h * (i + 1) / (len(ks) + 1)

    routes = []
    for k, path in enumerate(paths):
        u, v = path[0], path[-1]
        ux, _, uw, _ = boxes[u]
        vx, _, _, _ = boxes[v]
        points = [(ux + uw, out_port[k])]
        right = col_x[layer[u]] + col_width[layer[u]]
        if right > points[-1][0]:
            points.append((right, out_port[k]))
        for d in path[1:-1]:
            c = layer[d]
            points += [(col_x[c], centre[d]), (col_x[c] + col_width[c], centre[d])]
        left = col_x[layer[v]]
        if vx > left:
            points.append((left, in_port[k]))
        points.append((vx, in_port[k]))
        routes.append(points)

    width_total = (col_x[-1] + col_width[-1] + MARGIN) if columns else 2 * MARGIN
    height_total = max((centre[i] + height[i] / 2 for i in range(total)), default=0.0) + MARGIN
    return Layout(boxes, routes, layer[:count], width_total, height_total)


__all__ = ["Layout", "crossings", "layout", "longest_path_layers"]
