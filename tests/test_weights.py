"""Weights in safetensors files and PyTorch weights in and out (issue 29).

The PyTorch oracle: a torchvision-style CNN (Conv2d-BN-ReLU-MaxPool-Linear) defined in PyTorch,
its weights saved with safetensors and loaded into the matching symdl ``Sequential``: predictions
equal PyTorch's to 1e-5 and gradients to 1e-6 (float32), NCHW vs NHWC flatten order included."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")

import symdl as sd  # noqa: E402
from symdl.nn.torch_weights import load_torch_weights, to_torch_state_dict  # noqa: E402
from symdl.nn.weights import WeightsError, load_weights, save_weights, weight_names  # noqa: E402

nn = sd.nn


def cnn(epsilon=1e-3):
    return nn.Sequential([nn.Conv2D(4, 3, padding="same"), nn.BatchNormalization(epsilon=epsilon),
                          nn.Activation("relu"), nn.MaxPooling2D(2), nn.Flatten(), nn.Dense(5)],
                         input_shape=(6, 6, 2))


def _header(path) -> dict:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size))


def test_names_are_keras_like_and_stable():
    model = cnn()
    model.compile(backend="numpy")
    assert weight_names(model) == {
        "K1": "conv2d_1/kernel", "b1": "conv2d_1/bias", "gamma2": "batch_normalization_1/gamma",
        "beta2": "batch_normalization_1/beta", "moving_mean2": "batch_normalization_1/moving_mean",
        "moving_var2": "batch_normalization_1/moving_variance", "W6": "dense_1/kernel", "b6": "dense_1/bias"}


def test_save_and_load_round_trip(tmp_path):
    model = cnn()
    model.compile(backend="numpy", seed=3)
    model.train_step.statistics["moving_var2"][...] = [0.5, 1.5, 2.0, 3.0]
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    header = _header(path)
    assert header["__metadata__"] == {"format": "symdl-weights", "version": "1"}
    assert header["conv2d_1/kernel"]["shape"] == [3, 3, 2, 4] and header["conv2d_1/kernel"]["dtype"] == "F32"
    assert header["batch_normalization_1/moving_variance"]["shape"] == [4]
    other = cnn()
    other.compile(backend="numpy", seed=4)
    load_weights(other, path)
    X = np.random.default_rng(0).normal(size=(3, 6, 6, 2))
    np.testing.assert_array_equal(other.predict(X), model.predict(X))
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_load_errors_list_every_offending_name(tmp_path):
    from safetensors.numpy import save_file

    model = cnn()
    model.compile(backend="numpy")
    path = tmp_path / "bad.safetensors"
    arrays = {"conv2d_1/kernel": np.zeros((3, 3, 2, 5), np.float32), "dense_1/bias": np.zeros(5, np.float32),
              "dense_9/kernel": np.zeros((2, 2), np.float32), "dense_1/kernel": np.zeros((36, 5), np.int32)}
    save_file(arrays, str(path))
    before = model.get_weights()
    with pytest.raises(WeightsError) as err:
        load_weights(model, path)
    text = str(err.value)
    for piece in ("missing: conv2d_1/bias (4,)", "batch_normalization_1/gamma (4,)", "extra: dense_9/kernel (2, 2)",
                  "conv2d_1/kernel: (3, 3, 2, 5), expected (3, 3, 2, 4)", "dense_1/kernel: dtype int32"):
        assert piece in text, text
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing changed
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(model, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "absent.safetensors")
    with pytest.raises(RuntimeError, match="compile"):
        save_weights(cnn(), tmp_path / "w.safetensors")


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    model = cnn()
    model.compile(backend="numpy")
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    before = path.read_bytes()
    model.train_step.params["W6"][...] = 7.0

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# --------------------------------------------------------------------------- PyTorch


def _torch_cnn(torch):
    """A torchvision-style block: Conv2d-BN-ReLU-MaxPool, then Linear on the NCHW flatten."""
    tnn = torch.nn
    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(2),
                           tnn.Flatten(), tnn.Linear(36, 5))
    with torch.no_grad():  # running statistics away from 0 and 1, as after training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def test_torch_cnn_predictions_and_gradients(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    reference = _torch_cnn(torch)
    path = tmp_path / "torch.safetensors"
    save_file(reference.state_dict(), str(path))
    model = cnn(epsilon=1e-5)  # PyTorch's BatchNorm eps
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32")
    load_torch_weights(model, path)
    X = np.random.default_rng(1).normal(size=(7, 6, 6, 2)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0, 2])
    nchw = torch.from_numpy(X.transpose(0, 3, 1, 2).copy())
    reference.eval()
    with torch.no_grad():
        want = reference(nchw).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
    # gradients of the training loss: batch norm with the batch's statistics, as PyTorch's train mode
    reference.train()
    loss = torch.nn.functional.cross_entropy(reference(nchw), torch.from_numpy(labels))
    loss.backward()
    f = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float32")
    weights = model.get_weights()
    value, grads = f(x=X, y=np.eye(5, dtype=np.float32)[labels], **weights)
    assert abs(value - loss.item()) < 1e-6
    torch_grads = {"0.weight": reference[0].weight.grad, "0.bias": reference[0].bias.grad,
                   "1.weight": reference[1].weight.grad, "1.bias": reference[1].bias.grad,
                   "5.weight": reference[5].weight.grad, "5.bias": reference[5].bias.grad}
    converted = _gradients_as_torch(model, grads)
    for key, g in torch_grads.items():
        np.testing.assert_allclose(converted[key], g.numpy(), atol=1e-6, rtol=0, err_msg=key)


def _gradients_as_torch(model, grads) -> dict:
    """symdl's gradients in PyTorch's layout: the weights' conversion applied to them."""
    saved = model.get_weights()
    try:
        model.set_weights(grads)
        return to_torch_state_dict(model, prefixes=["0", "1", "5"])
    finally:
        model.set_weights(saved)


def test_torch_round_trip_loads_strictly_into_pytorch():
    torch = pytest.importorskip("torch")
    model = cnn(epsilon=1e-5)
    model.compile(backend="numpy", seed=5)
    model.train_step.statistics["moving_mean2"][...] = [0.1, -0.2, 0.3, 0.0]
    reference = _torch_cnn(torch)
    reference.load_state_dict(to_torch_state_dict(model, prefixes=["0", "1", "5"], tensors=True), strict=True)
    reference.eval()
    X = np.random.default_rng(2).normal(size=(4, 6, 6, 2)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(X.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)


def test_mlp_from_a_state_dict_by_name_mapping():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = nn.Sequential([nn.Dense(8, activation="tanh"), nn.Dense(3)], input_dim=4)
    model.compile(backend="numpy")
    load_torch_weights(model, net, mapping={"0": "dense_1", "2": "dense_2"})
    X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)


def test_torch_errors_list_every_unmatched_name():
    model = cnn()
    model.compile(backend="numpy")
    state = {"0.weight": np.zeros((4, 2, 3, 3)), "0.bias": np.zeros(4), "1.weight": np.zeros(4),
             "1.bias": np.zeros(4), "1.running_mean": np.zeros(4), "1.running_var": np.ones(4),
             "1.num_batches_tracked": np.array(3), "5.weight": np.zeros((5, 35)), "5.bias": np.zeros(5)}
    with pytest.raises(WeightsError, match=r"5\.weight has shape \(5, 35\); dense_1/kernel needs \(36, 5\) "
                                           r"\(PyTorch \(5, 36\)\)"):
        load_torch_weights(model, state)
    with pytest.raises(WeightsError, match=r"state dict has 2 modules with weights \(0 \{weight: \(4, 2, 3, 3\), "
                                           r"bias: \(4,\)\}, 5 .*the model 3 layers with weights"):
        load_torch_weights(model, {k: v for k, v in state.items() if not k.startswith("1.")})
    extra = {**state, "5.weight": np.zeros((5, 36)), "1.scale": np.zeros(4)}
    with pytest.raises(WeightsError, match=r"batch_normalization_1 \(BatchNormalization\) has no place for 1\.scale"):
        load_torch_weights(model, extra)
    with pytest.raises(WeightsError, match=r"state dict modules not mapped: 5 .*model layers not mapped: dense_1"):
        load_torch_weights(model, {**state, "5.weight": np.zeros((5, 36))},
                           mapping={"0": "conv2d_1", "1": "batch_normalization_1"})


def test_torch_mlp_with_batchnorm1d_and_layernorm():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(2)
    net = tnn.Sequential(tnn.Linear(4, 6), tnn.BatchNorm1d(6), tnn.ReLU(), tnn.Linear(6, 5), tnn.LayerNorm(5),
                         tnn.Tanh(), tnn.Linear(5, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[4].weight.uniform_(0.5, 1.5)
        net[4].bias.uniform_(-0.5, 0.5)
    model = nn.Sequential([nn.Dense(6), nn.BatchNormalization(epsilon=1e-5, momentum=0.9), nn.Activation("relu"),
                           nn.Dense(5), nn.LayerNormalization(epsilon=1e-5), nn.Activation("tanh"), nn.Dense(3)],
                          input_dim=4)
    model.compile(backend="numpy", dtype="float32")
    load_torch_weights(model, net.state_dict())
    X = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    net.eval()
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
    back = to_torch_state_dict(model, prefixes=["0", "1", "3", "4", "6"], tensors=True)
    assert set(back) == set(net.state_dict())
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)
