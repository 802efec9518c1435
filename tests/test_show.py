"""symdl.show: models and expressions drawn as SVG (checked geometrically), rich displays."""
from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings, strategies as st

import symdl as sd
from symdl.show import Drawing, draw, plot_model
from symdl.show.layout import crossings, layout, longest_path_layers
from symdl.show.svg import CHAR_WIDTH, render

NS = "{http://www.w3.org/2000/svg}"


# ---------------------------------------------------------------- reading an SVG back

def parse(svg: str):
    """``(boxes {id: (x, y, w, h, name)}, edges [(from id, to id, [(x, y), ...])], texts {id: [lines]})``."""
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    boxes, texts, edges = {}, {}, []
    for g in root.iter(NS + "g"):
        if g.get("class", "").split()[:1] == ["node"]:
            rect = g.find(NS + "rect")
            size = tuple(float(rect.get(k)) for k in ("x", "y", "width", "height"))
            boxes[g.get("id")] = size + (g.get("data-name"),)
            texts[g.get("id")] = [t.text for t in g.findall(NS + "text")]
    for line in root.iter(NS + "polyline"):
        if line.get("class") == "edge":
            pts = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            edges.append((line.get("data-from"), line.get("data-to"), pts))
    return boxes, edges, texts


def _segment_enters(p, q, box, inset=0.5) -> bool:
    """Whether segment p-q passes through the inside of ``box`` shrunk by ``inset`` (Liang-Barsky)."""
    x0, y0, w, h = box[:4]
    xmin, xmax, ymin, ymax = x0 + inset, x0 + w - inset, y0 + inset, y0 + h - inset
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, p[0] - xmin), (dx, xmax - p[0]), (-dy, p[1] - ymin), (dy, ymax - p[1])):
        if pk == 0:
            if qk < 0:
                return False
        else:
            t = qk / pk
            if pk < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
    return t0 < t1


def check_geometry(svg: str, edge_count=None):
    """What a reader needs: sized boxes that do not overlap and hold their text, edges from a
    box's right side to another's left side, no edge through any box."""
    boxes, edges, texts = parse(svg)
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    for key, (x, y, w, h, _) in boxes.items():
        assert w > 0 and h > 0, f"zero-size node {key}"
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height, f"node {key} outside the drawing"
        assert max(len(t) for t in texts[key]) * CHAR_WIDTH <= w, f"text wider than node {key}"
    items = list(boxes.items())
    for i, (a, (ax, ay, aw, ah, _)) in enumerate(items):
        for b, (bx, by, bw, bh, _) in items[i + 1 :]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, f"nodes {a} and {b} overlap"
    if edge_count is not None:
        assert len(edges) == edge_count
    for src, dst, pts in edges:
        sx, sy, sw, sh, _ = boxes[src]
        dx, dy, dw, dh, _ = boxes[dst]
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        assert abs(x0 - (sx + sw)) < 0.06 and sy <= y0 <= sy + sh, f"edge {src}->{dst} does not start on {src}"
        assert abs(x1 - dx) < 0.06 and dy <= y1 <= dy + dh, f"edge {src}->{dst} does not end on {dst}"
        assert all(b[0] >= a[0] - 1e-9 for a, b in zip(pts, pts[1:])), "edges run left to right"
        for p, q in zip(pts, pts[1:]):
            for key, box in boxes.items():
                assert not _segment_enters(p, q, box), f"edge {src}->{dst} segment {p}-{q} crosses node {key}"
    return boxes, edges, texts


# ---------------------------------------------------------------- models

def residual_model():
    x = sd.nn.Input(shape=(6,))
    h = sd.nn.Dense(6, activation="relu", name="first")(x)
    h = sd.nn.Dense(6, activation="relu")(h)
    h = sd.nn.Dense(6)(h)
    s = sd.nn.Add()([h, x])  # a skip over three layers: routed around them
    return sd.nn.Model(x, sd.nn.Dense(3)(s), name="residual")


def concat_model():
    x = sd.nn.Input(shape=(4,))
    a = sd.nn.Dense(8, activation="tanh")(x)
    a = sd.nn.Dense(5, activation="tanh")(a)
    b = sd.nn.Dense(3, activation="relu")(x)
    c = sd.nn.Concatenate()([a, b])
    return sd.nn.Model(x, sd.nn.Dense(2)(c))


def test_residual_model(tmp_path):
    model = residual_model()
    d = plot_model(model, path=tmp_path / "res.svg")
    assert (tmp_path / "res.svg").read_text() == d.svg
    boxes, edges, texts = check_geometry(d.svg, edge_count=6)
    names = {v[4] for v in boxes.values()}
    assert names == {"input_layer", "first", "dense_2", "dense_3", "add_1", "dense_4"}
    by_name = {v[4]: texts[k] for k, v in boxes.items()}
    assert by_name["first"] == ["first (Dense)", "out (None, 6)", "params 42"]
    assert by_name["add_1"] == ["add_1 (Add)", "out (None, 6)", "params 0"]
    assert by_name["input_layer"] == ["input_layer (InputLayer)", "out (None, 6)"]
    skip = [pts for s, t, pts in edges if boxes[s][4] == "input_layer" and boxes[t][4] == "add_1"]
    assert len(skip) == 1 and len(skip[0]) >= 4  # bent through the columns it passes
    # left to right: every edge goes to a later column
    assert all(boxes[s][0] < boxes[t][0] for s, t, _ in edges)


def test_two_branch_concatenate():
    d = plot_model(concat_model(), show_layer_activations=True)
    boxes, edges, texts = check_geometry(d.svg, edge_count=6)
    by_name = {v[4]: k for k, v in boxes.items()}
    into_concat = [s for s, t, _ in edges if t == by_name["concatenate_1"]]
    assert sorted(boxes[s][4] for s in into_concat) == ["dense_2", "dense_3"]
    ends = sorted(pts[-1][1] for s, t, pts in edges if t == by_name["concatenate_1"])
    assert ends[0] < ends[1]  # two ports, not one point
    assert "tanh" in texts[by_name["dense_1"]]


def test_sequential_cnn_is_a_chain():
    model = sd.nn.Sequential([sd.nn.Conv2D(4, 3, activation="relu"), sd.nn.MaxPooling2D(2), sd.nn.Flatten(),
                              sd.nn.Dense(10)], input_shape=(8, 8, 1))
    boxes, edges, texts = check_geometry(plot_model(model).svg, edge_count=4)
    counts = {v[4]: texts[k][-1] for k, v in boxes.items()}
    assert counts["conv2d_1"] == "params 40" and counts["dense_1"] == "params 370"
    ys = {round(v[1] + v[3] / 2, 6) for v in boxes.values()}
    assert len(ys) == 1  # a chain is one straight row


def test_shared_layer_drawn_per_call():
    x = sd.nn.Input(shape=(3,))
    shared = sd.nn.Dense(3, activation="tanh")
    model = sd.nn.Model(x, sd.nn.Dense(1)(shared(shared(x))))
    boxes, _, texts = check_geometry(plot_model(model).svg, edge_count=3)
    lines = sorted(texts[k][-1] for k, v in boxes.items() if v[4] == "dense_1")
    assert lines == ["params 12", "params 12 (shared)"]


def test_drawing_display_and_save(tmp_path):
    d = plot_model(residual_model())
    bundle = d._repr_mimebundle_()
    assert bundle["image/svg+xml"] == d._repr_svg_() == str(d)
    assert "residual" in bundle["text/plain"] and d._repr_mimebundle_(include={"text/plain"}).keys() == {"text/plain"}
    with pytest.raises(ValueError, match="Drawing.save writes SVG: give a path ending in .svg"):
        d.save(tmp_path / "x.png")
    with pytest.raises(TypeError, match="plot_model draws an sd.nn.Model or Sequential, got int"):
        plot_model(3)


# ---------------------------------------------------------------- expressions

def _mlp_loss():
    x, y = sd.input("x", 2), sd.input("y", 1)
    W, b, V = sd.param("W", (2, 3)), sd.param("b", 3), sd.param("V", (3, 1))
    return sd.losses.mse(sd.tanh(x @ W + b) @ V, y), [W, b, V]


def test_draw_loss_and_gradients(tmp_path):
    loss, params = _mlp_loss()
    d = draw(loss, path=tmp_path / "loss.svg")
    boxes, edges, texts = check_geometry(d.svg)
    names = {v[4] for v in boxes.values()}
    assert {"x", "W", "b", "V", "y"} <= names
    leaf = {v[4]: texts[k] for k, v in boxes.items() if v[4] in ("W", "x")}
    assert leaf["W"] == ["W", "param", "(2 × 3)"] and leaf["x"] == ["x", "input", "(n × 2)"]
    g = sd.grad(loss, params)
    dg = draw(g)
    boxes, edges, _ = check_geometry(dg.svg)
    from symdl.graph.nodes import children, walk

    order = walk(list(g.values())).order
    assert len(boxes) == len(order)  # one box per distinct subexpression: shared ones once
    assert len(edges) == sum(len(set(children(nd))) for nd in order)
    # a node's name is never its whole subexpression's text (printed without sharing, exponential in depth)
    assert all(len(v[4]) <= 40 for v in boxes.values())
    with pytest.raises(TypeError, match="draw takes symdl matrix expressions"):
        draw(3)


def test_layout_units():
    assert longest_path_layers(4, [(0, 1), (1, 2), (0, 2), (3, 2)]) == [0, 1, 2, 1]  # 3 sits before its user
    with pytest.raises(ValueError, match="cycle"):
        layout([(10, 10)] * 2, [(0, 1), (1, 0)])
    with pytest.raises(ValueError, match="does not join two different nodes"):
        layout([(10, 10)], [(0, 0)])
    # two crossing edges in the given order come out uncrossed
    lay = layout([(10, 10)] * 4, [(0, 3), (1, 2)])
    pos = {i: lay.boxes[i][1] for i in range(4)}
    assert (pos[0] < pos[1]) == (pos[3] < pos[2])
    assert crossings({0: 0, 1: 1, 2: 0, 3: 1}, [(0, 3), (1, 2)]) == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_random_dags_draw_cleanly(count, seed):
    rng = random.Random(seed)
    edges = sorted({(u, v) for v in range(1, count) for u in rng.sample(range(v), rng.randint(0, min(3, v)))})
    labels = [[f"node {i}", "x" * rng.randint(1, 20)] for i in range(count)]
    check_geometry(render(labels, edges).svg, edge_count=len(edges))


def test_drawing_object():
    d = Drawing("<svg/>", 0, 0, "t")
    assert repr(d) == "<Drawing 't': 0 nodes, 0 edges>"


# ---------------------------------------------------------------- rich displays

from html.parser import HTMLParser  # noqa: E402

import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from symdl.show import rich  # noqa: E402
from symdl.show.mathml import math  # noqa: E402

VOID = {"br", "hr", "img", "input", "meta", "link", "col", "area", "base", "wbr", "source"}


class _Page(HTMLParser):
    """Every element's attributes, MathML blocks' text, and whether tags nest properly."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.elements, self.errors = [], [], []
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def check_offline_html(text):
    page = _Page(text)
    assert not page.errors, page.errors[:3]
    lowered = text.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    for _, attrs in page.elements:
        for key in ("src", "href"):
            assert not str(attrs.get(key, "")).startswith(("http:", "https:", "//")), attrs
    return page


def _namespace():
    import symdl.formulas.activations as activations
    import symdl.graph.nodes as nodes
    import symdl.ops.conv as conv

    return {**vars(sp), **vars(nodes), **vars(activations), **vars(conv)}


def _mlp():
    x, y = sd.input("x", 2), sd.input("y", 2)
    W, b, V = sd.param("W", (2, 3)), sd.param("b", 3), sd.param("V", (3, 2))
    loss = sd.losses.softmax_cross_entropy(sd.tanh(x @ W + b) @ V, y)
    return loss, [W, b, V], [x, y]


def _arrays(leaves, rng, n=4):
    out = {}
    for leaf in leaves:
        shape = leaf.value_shape if hasattr(leaf, "value_shape") else (n, int(leaf.shape[1]))
        out[str(leaf.name)] = rng.normal(size=shape)
    return out


def _residual():
    x, y = sd.input("x", 2), sd.input("y", 2)
    W, b, V, U = sd.param("W", (2, 2)), sd.param("b", 2), sd.param("V", (2, 2)), sd.param("U", (2, 2))
    h = sd.tanh(x @ W + b)
    return sd.losses.mse(sd.tanh(h @ V) + sd.tanh(h @ U), y), [W, b, V, U], [x, y]  # h read twice: a fan-out


@pytest.mark.parametrize("build", [_mlp, _residual])
def test_derivation_shown_is_the_gradient_compiled(build):
    """Each displayed line's SymPy source, its names (δ1, Z1, ...) replaced by their own lines,
    evaluates to what the compiled gradient computes, at random points."""
    from symdl.run.pipeline import compile_outputs

    loss, params, inputs = build()
    html = rich.explanation_html(sd.explain(loss, params))
    page = check_offline_html(html)
    ns = _namespace()
    rows = [a for tag, a in page.elements if tag == "tr" and "data-line" in a]
    lines = {a["data-line"]: eval(a["data-sympy"], ns) for a in rows if a["data-line"] not in ("L",)}
    full = {a["data-param"]: eval(a["data-sympy"], ns) for tag, a in page.elements if tag == "section"}
    assert set(full) == {str(p.name) for p in params}  # a section per parameter, no other
    for block in html.split("<math")[1:]:
        ET.fromstring("<math" + block.split("</math>")[0] + "</math>")
    assert {"Z1", "A1", "δ1", "∂L/∂W", "∂L/∂b", "∂L/∂V"} <= set(lines)
    named = {sp.MatrixSymbol(k, *v.shape): v for k, v in lines.items()
             if isinstance(v, sp.MatrixExpr) and not k.startswith(("∂", "uses of"))}
    real = {sp.MatrixSymbol(str(leaf.name), *leaf.shape): leaf for leaf in params + inputs}
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    rng = np.random.default_rng(0)
    for trial in range(3):
        arrays = _arrays(params + inputs, rng)
        _, expected = f(**arrays)
        flat = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
        for p in params:
            expr = lines[f"∂L/∂{p.name}"]
            assert isinstance(expr, sp.MatrixExpr)
            for _ in range(10):  # unfold the names: δ1 -> its line, which names δ2 and A1, ...
                expr = expr.xreplace(named)
            expr = expr.xreplace(real)
            assert not any(isinstance(s, sp.MatrixSymbol) and type(s) is sp.MatrixSymbol
                           for s in expr.atoms(sp.MatrixSymbol))
            shown = compile_outputs({"g": expr}, "numpy", "float64").run(flat, {}, 4)["g"]
            assert np.allclose(np.asarray(shown).reshape(expected[str(p.name)].shape), expected[str(p.name)],
                               rtol=1e-10, atol=1e-12), p
            whole = full[str(p.name)].xreplace(real)  # the whole gradient, as derived: nothing named
            value = compile_outputs({"g": whole}, "numpy", "float64").run(flat, {}, 4)["g"]
            assert np.allclose(np.asarray(value).reshape(expected[str(p.name)].shape), expected[str(p.name)],
                               rtol=1e-10, atol=1e-12), p


def test_derivation_per_parameter_parts():
    loss, params, _ = _mlp()
    source = sd.compile(loss, params, optimizer=sd.optim.SGD(0.1), backend="numpy").source
    bundle = rich.explanation_bundle(sd.explain(loss, params), source=source)
    assert bundle["text/plain"] == str(sd.explain(loss, params))
    assert bundle["text/latex"].startswith("$$\\begin{aligned}")
    html = bundle["text/html"]
    check_offline_html(html)
    sections = html.split('<section class="param"')[1:]
    assert [s.split('data-param="')[1].split('"')[0] for s in sections] == ["V", "W", "b"]
    by = {s.split('data-param="')[1].split('"')[0]: s for s in sections}
    for name, shapes in (("W", "(2 × n)(n × 3) → 2 × 3"), ("V", "(3 × n)(n × 2) → 3 × 2"),
                         ("b", "(n × 3) → 1 × 3 (the vector b: (3,))")):
        assert f'<span class="shapes">{shapes}</span>' in by[name], name
        for part in ("forward", "δ recurrence", "gradient"):
            assert f"<th>{part}</th>" in by[name], (name, part)
        assert "<details><summary>kernel" in by[name]
    assert "numpy.dot(b_x.T" in by["W"]  # the kernel of ∂L/∂W = x.T*δ1
    assert "⊙" in by["W"]  # δ1 = (δ2 V.T) ⊙ (1 - A1²)
    for block in html.split("<math")[1:]:  # every formula is MathML SymPy could print: no raw nodes
        xml = "<math" + block.split("</math>")[0] + "</math>"
        ET.fromstring(xml)
        assert "map" not in xml and "Lambda" not in xml and "mtext" not in xml, xml[:200]


def test_kernel_source_of_the_cpu_backend():
    loss, params, _ = _mlp()
    source = sd.compile(loss, params, optimizer=sd.optim.SGD(0.1), backend="cpu").source
    text = rich.kernel_source(source, "∂L/∂b")
    assert text.splitlines()[0].startswith("# ") and "∂L/∂b = sum_rows(δ1)" in text.splitlines()[0]
    assert "# ---- k" in text and "\ndef " in text and "symdl_cpu_" in text
    assert rich.kernel_source(source, "∂L/∂nothing") is None and rich.kernel_source(None, "∂L/∂b") is None


def test_hvp_explanation_display():
    x, y = sd.input("x", 2), sd.input("y", 1)
    W, V = sd.param("W", (2, 1)), sd.param("V", (2, 1))
    e = sd.explain_hvp(sd.losses.mse(sd.tanh(x @ W), y), [W], [V])
    html = rich.explanation_bundle(e)["text/html"]
    check_offline_html(html)
    assert "Hessian-vector product" in html and 'data-line="(Hv)_W"' in html


def test_mathml_notation():
    x, W, b = sd.input("x", 2), sd.param("W", (2, 3)), sd.param("b", 3)
    s = math(sd.tanh(x @ W + b))
    ET.fromstring(s)
    assert "<mi>tanh</mi><mrow><mo>(</mo><mrow><mrow><mi>x</mi>" in s  # tanh(xW + b): one pair of parentheses
    assert "<mo>⊙</mo>" in math(sd.hadamard(x @ W + b, sd.tanh(x @ W)))
    from symdl.graph.nodes import SumRows

    assert "<mn mathvariant=\"bold\">1</mn>" in math(SumRows(x))
    z = sd.input("z", 3)
    ce = math(sd.losses.softmax_cross_entropy(z, sd.input("t", 3)))
    ET.fromstring(ce)
    assert "logsumexp" in ce


def test_proof_and_gradcheck_displays():
    x, W = sd.input("x", 1), sd.param("W", (1, 1))
    good = rich.proof_bundle(sd.prove(sd.total(sd.tanh(x @ W)), [W]))
    assert "✓ proved" in good["text/html"] and good["text/plain"].startswith("proved")
    bad_fn = sd.activation("cube_bad_show", lambda t: t**3, derivative=lambda t: 2 * t**2)
    bad = rich.proof_bundle(sd.prove(sd.total(bad_fn(x @ W)), [W]))
    assert "✗ NOT proved" in bad["text/html"] and "<h4>Differences</h4>" in bad["text/html"]
    for b in (good, bad):
        check_offline_html(b["text/html"])
        assert b["text/latex"].count("$") >= 4
    from symdl.run.proofs import GradCheck

    r = rich.gradcheck_bundle(GradCheck({"W": 1e-9, "b": 1e-3}, 1e-5))
    check_offline_html(r["text/html"])
    assert "gradient check FAILED" in r["text/html"] and "exceeds tol" in r["text/html"]
    assert "\\text{W}" in r["text/latex"] and r["text/plain"].startswith("gradient check FAILED")


def test_model_and_history_displays(tmp_path):
    model = residual_model()
    model.compile(optimizer=sd.optim.Adam(0.01), backend="numpy")
    b = rich.summary_bundle(model)
    page = check_offline_html(b["text/html"])
    assert b["text/plain"] == model.summary(print_fn=None)
    header, rows, totals = rich.summary_rows(model)
    assert [r[0] for r in rows] == ["first", "dense_2", "dense_3", "add_1", "dense_4"]
    assert rows[3][-1] == "dense_3, input_layer" and totals["total params"] == 3 * 42 + 21
    assert "<svg" in b["text/html"] and any(tag == "details" for tag, _ in page.elements)
    assert f"total params: {totals['total params']:,}" in b["text/plain"]
    X = np.random.default_rng(0).normal(size=(32, 6))
    model.fit(X, np.arange(32) % 3, epochs=2, verbose=0, validation_split=0.25)
    h = rich.history_bundle(model.history)
    page = check_offline_html(h["text/html"])
    assert "History: 2 epochs" in h["text/html"] and h["text/plain"] == repr(model.history)
    imgs = [a for tag, a in page.elements if tag == "img"]
    try:
        import matplotlib  # noqa: F401

        assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/png;base64,")
    except ImportError:
        assert not imgs
    from symdl.nn.fitting import History

    long = rich.history_bundle(History({"loss": list(np.linspace(1, 0.1, 100))}), max_rows=10)
    assert long["text/html"].count("<tr>") == 1 + 11 and "…" in long["text/html"]  # header, 10 epochs, the gap
    f = rich.formulas_bundle(model)
    assert "∂L/∂W1" in f["text/html"] and "<details><summary>kernel" in f["text/html"]


def test_install_registers_every_display():
    from symdl.nn.fitting import History
    from symdl.registry import RuleTable
    from symdl.run.proofs import GradCheck

    table = RuleTable("rich display")
    rich.install(table)
    x, W = sd.input("x", 2), sd.param("W", (2, 1))
    loss = sd.total(sd.tanh(x @ W))
    objects = [sd.explain(loss, [W]), sd.explain_hvp(loss, [W], [sd.param("V", (2, 1))]), sd.prove(loss, [W]),
               GradCheck({"W": 1e-9}, 1e-5), residual_model(), History({"loss": [1.0, 0.5]})]
    for obj in objects:
        bundle = table.lookup(obj)(obj, None, None)
        assert set(bundle) == {"text/plain", "text/latex", "text/html"}, type(obj)
        check_offline_html(bundle["text/html"])
        assert table.lookup(obj)(obj, {"text/plain"}, None).keys() == {"text/plain"}


def test_cnn_derivation_is_all_mathml():
    """Convolution's nodes read as functions of MathML operands (patches(x), flatten(maxpool(A1)))."""
    model = sd.nn.Sequential([sd.nn.Conv2D(2, 3, activation="relu"), sd.nn.MaxPooling2D(2), sd.nn.Flatten(),
                              sd.nn.Dense(3)], input_shape=(6, 6, 1))
    model.compile(optimizer=sd.optim.SGD(0.1), backend="numpy")
    html = rich.formulas_bundle(model)["text/html"]
    check_offline_html(html)
    assert "<mtext>" not in html
    assert "<mi>patches</mi>" in html and "<mi>route_max</mi>" in html
    assert '<span class="shapes">(9 × 16*n)(16*n × 2) → 9 × 2</span>' in html  # ∂L/∂K1 = patches(x).T δ1


def test_ipython_shows_the_bundle():
    """What a notebook does with an object whose ``_repr_mimebundle_`` returns one of these bundles
    (the classes' methods look them up as ``install`` registers them)."""
    pytest.importorskip("IPython", reason="formats as a notebook does")
    from IPython.core.formatters import DisplayFormatter

    class Shown:
        def __init__(self, obj):
            self.obj = obj

        def _repr_mimebundle_(self, include=None, exclude=None):
            return rich.explanation_bundle(self.obj, include, exclude)

    x, W = sd.input("x", 2), sd.param("W", (2, 1))
    e = sd.explain(sd.total(sd.tanh(x @ W)), [W])
    data, _ = DisplayFormatter().format(Shown(e))
    assert data["text/html"].startswith("<style>") and "<math" in data["text/html"]
    assert data["text/latex"] == "$$" + e.latex + "$$" and data["text/plain"] == str(e)


def test_several_inputs_outputs_and_a_nested_model():
    a, b = sd.nn.Input(shape=(3,), name="a"), sd.nn.Input(shape=(2,), name="b")
    h = sd.nn.Concatenate()([sd.nn.Dense(4)(a), b])
    try:
        model = sd.nn.Model([a, b], [sd.nn.Dense(2)(h), sd.nn.Dense(1)(h)])
    except (TypeError, ValueError) as exc:
        pytest.skip(f"this symdl's Model takes one input and one output: {exc}")
    boxes, edges, _ = check_geometry(plot_model(model).svg, edge_count=5)
    kinds = ET.fromstring(plot_model(model).svg)
    classes = [g.get("class") for g in kinds.iter(NS + "g") if g.get("class", "").startswith("node ")]
    assert classes.count("node input") == 2 and classes.count("node output") == 2
    check_offline_html(rich.summary_bundle(model)["text/html"])
    inner = sd.nn.Sequential([sd.nn.Dense(4, activation="relu"), sd.nn.Dense(4)], input_dim=4)
    x = sd.nn.Input(shape=(4,))
    try:
        outer = sd.nn.Model(x, sd.nn.Dense(2)(inner(x)))  # a model used as a layer: one box, as Keras draws it
    except (TypeError, ValueError, AttributeError) as exc:
        pytest.skip(f"this symdl cannot call a model as a layer: {exc}")
    boxes, _, texts = check_geometry(plot_model(outer).svg, edge_count=2)
    assert [t[1:] for t in texts.values() if t[0].endswith("(Sequential)")] == [["out (None, 4)", "params 40"]]
