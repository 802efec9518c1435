"""The notebooks in ``examples/notebooks`` run headless in a real Jupyter kernel, and show what
they should: MathML derivations, SVG drawings, PNG curves, a CSV log of one row per epoch.

How the kernel is started (the robust way): the test does not rely on whatever ``python3``
kernelspec the machine has (its ``argv`` is a bare ``python``, which may be another
interpreter than the one running pytest, without symdl). It writes a kernelspec of its own
into a temporary folder with ``ipykernel.kernelspec.install(prefix=...)``, whose ``argv`` is
``sys.executable -m ipykernel_launcher`` (this very Python), and whose ``env`` puts this
checkout first on ``PYTHONPATH`` and points ``TMPDIR`` into the test's ``tmp_path``; a
``KernelSpecManager`` limited to that folder finds it. Nothing is installed for the user.

The notebooks' ``TemporaryDirectory`` therefore lands in ``tmp_path``: the test runs the cells
one by one (nbclient), reads the CSV log with the ``csv`` module just before the notebook's
``cleanup`` cell, and checks afterwards that the cleanup removed it. Cells the test inspects
carry a tag (``explain``, ``plot_model``, ``history_plot``, ...) in their metadata.

The notebooks are kept without outputs; that is checked too (fast, no kernel).
"""
from __future__ import annotations

import base64
import csv
import glob
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="reads the notebooks: pip install nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "examples", "notebooks")
NOTEBOOKS = ["reading_backprop.ipynb", "training_with_plots.ipynb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(name):
    return nbformat.read(os.path.join(FOLDER, name), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: a cell was saved with outputs (clear them before committing):\n{cell.source[:200]}")


# ------------------------------------------------------------------ executing them


def _kernel_manager(tmp_path):
    pytest.importorskip("ipykernel", reason="runs the notebooks in a real Jupyter kernel: pip install ipykernel")
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    python_path = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    prefix = tmp_path / "kernel"
    install(kernel_name="symdl-tests", display_name="symdl tests", prefix=str(prefix),
            env={"PYTHONPATH": python_path, "TMPDIR": str(scratch)})
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    spec = specs.get_kernel_spec("symdl-tests")
    assert spec.argv[0] == sys.executable, spec.argv  # the kernel runs the tests' Python
    return KernelManager(kernel_name="symdl-tests", kernel_spec_manager=specs), scratch


def run_notebook(name, tmp_path, before_cleanup=None):
    """Execute ``name`` cell by cell in a fresh kernel (a cell error fails the test with the
    traceback); ``before_cleanup()`` is called just before the cell tagged ``cleanup``.
    Returns the executed notebook and the folder the kernel's temporary files go to."""
    pytest.importorskip("nbclient", reason="runs the notebooks headless: pip install nbclient")
    pytest.importorskip("matplotlib", reason="the notebooks plot: pip install 'symdl[plot]'")
    from nbclient import NotebookClient

    km, scratch = _kernel_manager(tmp_path)
    nb = _read(name)
    work = tmp_path / "cwd"
    work.mkdir()
    client = NotebookClient(nb, km=km, timeout=240, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if before_cleanup is not None and "cleanup" in cell.metadata.get("tags", []):
                before_cleanup()
            client.execute_cell(cell, index)
    assert os.listdir(work) == [], f"{name} wrote into its working folder: {os.listdir(work)}"
    return nb, scratch


def tagged(nb, tag):
    cells = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def shown(cell, mime):
    """Every ``mime`` payload the cell displayed (display_data and execute_result)."""
    return [out["data"][mime] for out in cell.outputs
            if out.output_type in ("display_data", "execute_result") and mime in out.get("data", {})]


def one(cell, mime):
    found = shown(cell, mime)
    assert len(found) == 1, f"cell {cell.source[:60]!r}: expected one {mime}, got {len(found)} in {cell.outputs}"
    return found[0]


def assert_png(payload):
    data = base64.b64decode(payload)
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, "not a drawn PNG"


def assert_svg(payload):
    assert "<svg" in payload and "<rect" in payload and "</svg>" in payload


def assert_mathml(cell):
    html = one(cell, "text/html")
    assert html.count("<math") >= 5, "the derivation is not rendered as MathML"
    assert "∂L/∂" in one(cell, "text/plain")
    assert r"\frac{\partial L}" in one(cell, "text/latex")
    return html


@pytest.mark.slow
def test_reading_backprop(tmp_path):
    nb, _ = run_notebook("reading_backprop.ipynb", tmp_path)
    html = assert_mathml(tagged(nb, "explain"))
    assert "(2 × n)(n × 4) → 2 × 4" in html  # the shapes of ∂L/∂W1's factors
    cnn = assert_mathml(tagged(nb, "explain_cnn"))
    assert "route_max" in cnn and "(9 × 16*n)(16*n × 4) → 9 × 4" in cnn
    assert_svg(one(tagged(nb, "draw"), "image/svg+xml"))
    assert_svg(one(tagged(nb, "plot_model"), "image/svg+xml"))
    for tag in ("prove", "prove_cnn"):
        assert one(tagged(nb, tag), "text/plain").startswith("proved"), tag
    for tag in ("check_grad", "check_grad_cnn"):  # the HTML: IPython's text/plain of a dict is its repr
        assert '<span class="ok">gradient check passed</span>' in one(tagged(nb, tag), "text/html"), tag
    formulas = one(tagged(nb, "formulas"), "text/html")
    assert "<math" in formulas and formulas.count("<details") == 4  # a kernel per parameter


@pytest.mark.slow
def test_training_with_plots(tmp_path):
    logs = {}

    def read_log():  # while the notebook's temporary folder still exists
        found = glob.glob(os.path.join(tmp_path, "tmp", "symdl-notebook-*", "training.csv"))
        assert len(found) == 1, found
        logs["path"] = found[0]
        with open(found[0], newline="") as f:
            logs["rows"] = list(csv.DictReader(f))

    nb, scratch = run_notebook("training_with_plots.ipynb", tmp_path, before_cleanup=read_log)

    epochs = int(re.search(r"epochs=(\d+)", tagged(nb, "fit").source).group(1))
    rows = logs["rows"]
    assert [int(r["epoch"]) for r in rows] == list(range(epochs)), "one row per epoch, 0-based"
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    assert all(float(r["val_loss"]) > 0 for r in rows)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    left = glob.glob(os.path.join(scratch, "symdl-notebook-*"))
    assert not os.path.exists(logs["path"]) and left == [], f"the cleanup cell left {left}"
    printed = "".join(out.get("text", "") for out in tagged(nb, "csv").outputs).splitlines()
    assert len(printed) == epochs + 1 and printed[-1].startswith(f"{epochs - 1} "), printed  # header + epochs

    for tag in ("fit", "cnn_fit"):  # PlotLosses replaced its drawing each epoch: one figure left
        assert_png(one(tagged(nb, tag), "image/png"))
    assert_png(one(tagged(nb, "history_plot"), "image/png"))
    assert "<table" in one(tagged(nb, "history"), "text/html")
    model = one(tagged(nb, "model"), "text/html")
    assert "<table" in model and "<svg" in model
    assert_svg(one(tagged(nb, "cnn_plot_model"), "image/svg+xml"))
