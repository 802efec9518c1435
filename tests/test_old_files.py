"""Checkpoints written by symdl 0.2 load and predict as 0.2 did (fixtures: tests/fixtures/v0_2,
made by tests/fixtures/make_v0_2.py with the 0.2 code), and a file from a newer format is
refused with a clear version error."""
from pathlib import Path

import numpy as np
import pytest

import symdl as sd

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
IMAGES = {"cnn"}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "batchnorm"])
def test_a_0_2_checkpoint_predicts_as_0_2_did(name, backend):
    expected = np.load(FIXTURES / "predictions.npz")
    X = expected["X"].reshape(-1, 8, 8, 1) if name in IMAGES else expected["X"]
    model = sd.nn.load(FIXTURES / f"{name}.symdl", backend=backend)
    np.testing.assert_allclose(model.predict(X), expected[name], rtol=1e-5, atol=1e-5)


def test_a_newer_format_is_refused_with_its_version(tmp_path):
    meta, arrays = sd.nn.checkpoint.read(FIXTURES / "mlp.symdl")
    meta["version"] = sd.nn.checkpoint.VERSION + 1
    sd.nn.checkpoint.write(tmp_path / "newer.symdl", meta, arrays)
    with pytest.raises(sd.nn.checkpoint.CheckpointError,
                       match=f"checkpoint version {sd.nn.checkpoint.VERSION + 1}; this symdl reads version "
                             f"{sd.nn.checkpoint.VERSION}"):
        sd.nn.load(tmp_path / "newer.symdl")
