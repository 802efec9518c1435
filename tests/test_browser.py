"""What a person sees: symdl's HTML derivations and SVG graphs rendered by headless Chromium.

Marked ``browser`` (needs Debian's ``chromium``; skipped without it). Screenshots go to the
folder ``SYMDL_SCREENSHOTS`` names, by default ``build/screenshots`` in the repository; the
test fails on a blank render: a uniform screenshot, MathML left as unrendered text (a fraction
not stacked, a formula of zero size) or an SVG node of zero size.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import symdl as sd
from symdl.show import plot_model, rich

pytestmark = pytest.mark.browser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Measures what the page rendered and writes it into the DOM (``--dump-dom`` prints the DOM
#: after scripts run). Added to the test page only: symdl's HTML itself has no script.
MEASURE = """<script>
window.addEventListener("load", () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
  const out = {
    math: [...document.querySelectorAll("math")].map(box),
    fractions: [...document.querySelectorAll("mfrac")].map(f => f.children.length == 2 ?
        [box(f.children[0]), box(f.children[1])] : null),
    rects: [...document.querySelectorAll("svg g.node rect")].map(box),
    svg: [...document.querySelectorAll("svg")].map(box),
    mathDisplay: [...document.querySelectorAll("math")].slice(0, 1).map(m => getComputedStyle(m).display),
  };
  const pre = document.createElement("pre"); pre.id = "measured";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")


def _folder():
    folder = os.environ.get("SYMDL_SCREENSHOTS") or os.path.join(ROOT, "build", "screenshots")
    os.makedirs(folder, exist_ok=True)
    return folder


def _page(body: str, measure: bool) -> str:
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>symdl</title></head>"
            "<body style=\"margin:12px;background:white\">" + body + (MEASURE if measure else "") + "</body></html>")


def _run(args, timeout=90):
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--no-first-run", "--disable-dev-shm-usage"]
    result = subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def render(name: str, body: str, size=(1000, 1400)):
    """Screenshot ``body`` as a page; returns (screenshot path, what the page measured)."""
    folder = _folder()
    html_path = os.path.join(folder, f"{name}.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(_page(body, measure=False))
    png = os.path.join(folder, f"{name}.png")
    if os.path.exists(png):
        os.remove(png)
    _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", "file://" + html_path])
    probe = os.path.join(folder, f"{name}.measure.html")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(_page(body, measure=True))
    dom = _run([f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=3000", "--dump-dom", "file://" + probe])
    start = dom.index('<pre id="measured">') + len('<pre id="measured">')
    measured = json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    return png, measured


def assert_not_blank(png):
    Image = pytest.importorskip("PIL.Image", reason="reads the screenshot")
    assert os.path.exists(png), f"no screenshot {png}"
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 5, f"{png} is blank (uniform)"
    dark = (pixels < 128).mean()
    assert 0.002 < dark < 0.5, f"{png}: {dark:.2%} dark pixels"


def _cnn():
    model = sd.nn.Sequential([sd.nn.Conv2D(2, 3, activation="relu"), sd.nn.Flatten(), sd.nn.Dense(3)],
                             input_shape=(5, 5, 1))
    model.compile(optimizer=sd.optim.SGD(0.1), backend="numpy")
    return model


def test_cnn_derivation_renders():
    html = rich.formulas_bundle(_cnn())["text/html"]
    png, m = render("derivation_cnn", html)
    assert_not_blank(png)
    assert m["mathDisplay"] == ["block math"]  # laid out by MathML Core, not an unknown inline element
    assert len(m["math"]) >= 8
    for x, y, w, h in m["math"]:
        assert w > 10 and h > 8, "a formula rendered with no size"
    stacked = [f for f in m["fractions"] if f]
    assert stacked, "no fraction in the derivation"
    for (nx, ny, nw, nh), (dx, dy, dw, dh) in stacked:  # numerator drawn above the denominator
        assert ny + nh <= dy + 1 and nh > 0 and dh > 0


def test_residual_graph_renders():
    x = sd.nn.Input(shape=(8,))
    h = sd.nn.Dense(8, activation="relu")(x)
    h = sd.nn.Dense(8)(h)
    s = sd.nn.Add()([h, x])
    model = sd.nn.Model(x, sd.nn.Dense(2)(sd.nn.Concatenate()([s, sd.nn.Dense(4)(x)])), name="residual")
    svg = plot_model(model).svg
    png, m = render("graph_residual", svg, size=(1300, 360))
    assert_not_blank(png)
    assert len(m["rects"]) == 7 and all(w > 20 and h > 20 for _, _, w, h in m["rects"])
    (sx, sy, sw, sh), = m["svg"]
    assert sw > 300 and sh > 60
