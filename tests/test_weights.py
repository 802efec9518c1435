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


def _gradients_as_torch(model, grads, prefixes=("0", "1", "5")) -> dict:
    """symdl's gradients in PyTorch's layout: the weights' conversion applied to them."""
    saved = model.get_weights()
    try:
        model.set_weights(grads)
        return to_torch_state_dict(model, prefixes=prefixes)
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


# --------------------------------------------------------------------------- token models and attention

V, T, D, H = 11, 5, 8, 2  # vocabulary, sequence length, width, heads


def gpt_block(use_bias=True):
    """A pre-norm GPT block in symdl: token + position embeddings, LN -> causal MHA -> residual,
    LN -> Dense -> GELU -> Dense -> residual, LN -> Dense(vocabulary)."""
    inp = nn.Input(shape=(T,), dtype="int32")
    x = nn.TokenAndPositionEmbedding(V, T, D)(inp)
    h = nn.LayerNormalization(epsilon=1e-5)(x)
    x = x + nn.MultiHeadAttention(num_heads=H, key_dim=D // H, use_bias=use_bias)(h, h, use_causal_mask=True)
    h = nn.LayerNormalization(epsilon=1e-5)(x)
    x = x + nn.Dense(D)(nn.Dense(2 * D, activation="gelu")(h))
    return nn.Model(inp, nn.Dense(V)(nn.LayerNormalization(epsilon=1e-5)(x)))


def _torch_gpt(torch, bias=True):
    """The same block in PyTorch: ``nn.Embedding`` for tokens and learned positions (keras-hub's child
    names ``token_embedding``/``position_embedding``), ``nn.MultiheadAttention(batch_first=True)`` with a
    causal ``attn_mask``."""
    tnn = torch.nn

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tnn.Module()
            self.embed.token_embedding = tnn.Embedding(V, D)
            self.embed.position_embedding = tnn.Embedding(T, D)
            self.ln1 = tnn.LayerNorm(D)
            self.attn = tnn.MultiheadAttention(D, H, batch_first=True, bias=bias)
            self.ln2 = tnn.LayerNorm(D)
            self.fc1, self.fc2 = tnn.Linear(D, 2 * D), tnn.Linear(2 * D, D)
            self.ln_f = tnn.LayerNorm(D)
            self.head = tnn.Linear(D, V)

        def forward(self, ids):
            t = ids.shape[1]
            x = self.embed.token_embedding(ids) + self.embed.position_embedding(torch.arange(t))
            h = self.ln1(x)
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # True: not attended
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            x = x + self.fc2(tnn.functional.gelu(self.fc1(self.ln2(x))))
            return self.head(self.ln_f(x))

    torch.manual_seed(4)
    block = Block()
    with torch.no_grad():  # biases and norms away from their initial 0 and 1
        for name, p in block.named_parameters():
            if "bias" in name or name.startswith("ln"):
                p.uniform_(-0.5, 0.5) if "bias" in name else p.uniform_(0.5, 1.5)
    return block


GPT_PREFIXES = ["embed", "ln1", "attn", "ln2", "fc1", "fc2", "ln_f", "head"]


def model_layer_names(model):
    return [name for name in model.layer_names if not name.startswith("add")]


def _ids(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, V, size=(n, T)).astype(np.int32)
    X[0, :3] = 4  # a repeated id: its embedding gradient is a sum
    return X, np.roll(X, -1, axis=1)


def test_torch_gpt_block_predictions_and_gradients(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    reference = _torch_gpt(torch)
    path = tmp_path / "gpt.safetensors"
    save_file(reference.state_dict(), str(path))
    model = gpt_block()
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32")
    # a safetensors file sorts its keys by name: named modules are matched by name
    load_torch_weights(model, path, mapping=dict(zip(GPT_PREFIXES, model_layer_names(model))))
    X, Y = _ids(6)
    ids = torch.from_numpy(X.astype(np.int64))
    logits = reference(ids)
    np.testing.assert_allclose(model.predict(X), logits.detach().numpy(), atol=1e-5, rtol=0)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(Y.astype(np.int64)).reshape(-1))
    loss.backward()
    f = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float32")
    value, grads = f(x=X, y=np.eye(V, dtype=np.float32)[Y], **model.get_weights())
    assert abs(value - loss.item()) < 1e-6
    converted = _gradients_as_torch(model, grads, GPT_PREFIXES)
    wanted = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    assert set(converted) == set(wanted)
    for key, g in wanted.items():
        np.testing.assert_allclose(converted[key], g, atol=1e-6, rtol=0, err_msg=key)


def test_torch_gpt_block_on_the_cpu_backend_one_and_two_threads(monkeypatch):
    """The compiled CPU code (LLVM IR / Numba) on PyTorch's weights: the same logits and gradients."""
    torch = pytest.importorskip("torch")
    from helpers import run_threaded

    reference = _torch_gpt(torch)
    model = gpt_block()
    model.compile(loss="softmax_cross_entropy", backend="cpu", dtype="float32")
    load_torch_weights(model, reference)
    X, Y = _ids(6, seed=3)
    ids = torch.from_numpy(X.astype(np.int64))
    logits = reference(ids)
    np.testing.assert_allclose(model.predict(X), logits.detach().numpy(), atol=1e-5, rtol=0)
    labels = torch.from_numpy(Y.astype(np.int64)).reshape(-1)
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels).backward()
    wanted = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    for count in (1, 2):
        f = sd.value_and_grad(model.loss, model.params, backend="cpu", dtype="float32")
        if os.environ.get("NUMBA_DISABLE_JIT") != "1":
            run_threaded(f.runner, count, monkeypatch)
        _, grads = f(x=X, y=np.eye(V, dtype=np.float32)[Y], **model.get_weights())
        converted = _gradients_as_torch(model, grads, GPT_PREFIXES)
        for key, g in wanted.items():
            np.testing.assert_allclose(converted[key], g, atol=1e-6, rtol=0, err_msg=f"{key} on {count} thread(s)")


def test_torch_gpt_round_trip_loads_strictly_into_pytorch():
    torch = pytest.importorskip("torch")
    for bias in (True, False):
        model = gpt_block(use_bias=bias)
        model.compile(backend="numpy", seed=7, dtype="float32")
        reference = _torch_gpt(torch, bias=bias)
        state = to_torch_state_dict(model, prefixes=GPT_PREFIXES, tensors=True)
        assert list(state) == list(reference.state_dict())  # the same keys, in PyTorch's order
        reference.load_state_dict(state, strict=True)
        X, _ = _ids(3, seed=1)
        with torch.no_grad():
            want = reference(torch.from_numpy(X.astype(np.int64))).numpy()
        np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
        again = gpt_block(use_bias=bias)
        again.compile(backend="numpy", seed=8, dtype="float32")
        load_torch_weights(again, reference)
        np.testing.assert_array_equal(again.predict(X), model.predict(X))


def test_torch_embedding_and_separate_projections():
    """A plain ``nn.Embedding`` (no transpose), and ``nn.MultiheadAttention`` with a context of another
    width (``kdim``/``vdim``: separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``)."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(5)
    emb, ctx, attn = tnn.Embedding(V, D), tnn.Embedding(V, 6), tnn.MultiheadAttention(D, H, batch_first=True,
                                                                                       kdim=6, vdim=6)
    q_in, c_in = nn.Input(shape=(T,), dtype="int32"), nn.Input(shape=(4,), dtype="int32")
    q, c = nn.Embedding(V, D)(q_in), nn.Embedding(V, 6)(c_in)
    model = nn.Model([q_in, c_in], nn.MultiHeadAttention(num_heads=H, key_dim=D // H)(q, c))
    model.compile(backend="numpy", dtype="float32")
    state = {**{f"emb.{k}": v for k, v in emb.state_dict().items()},
             **{f"ctx.{k}": v for k, v in ctx.state_dict().items()},
             **{f"attn.{k}": v for k, v in attn.state_dict().items()}}
    assert "attn.q_proj_weight" in state and "attn.in_proj_weight" not in state
    load_torch_weights(model, state)
    np.testing.assert_array_equal(model.get_weights()["embeddings1"], emb.weight.detach().numpy())
    rng = np.random.default_rng(2)
    Xq, Xc = rng.integers(0, V, size=(3, T)), rng.integers(0, V, size=(3, 4))
    with torch.no_grad():
        qt, ct = emb(torch.from_numpy(Xq)), ctx(torch.from_numpy(Xc))
        want = attn(qt, ct, ct, need_weights=False)[0].numpy()
    np.testing.assert_allclose(model.predict([Xq.astype(np.int32), Xc.astype(np.int32)]), want, atol=1e-5, rtol=0)
    back = to_torch_state_dict(model, prefixes=["emb", "ctx", "attn"])
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_attention_from_a_safetensors_file_sorted_by_name(tmp_path):
    """A file's keys come sorted (``attn.k_proj_weight``, ``attn.out_proj.bias``, ..., ``attn.q_proj_weight``):
    ``out_proj`` still joins its attention module; a lone ``token_embedding`` child stays a module."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tnn = torch.nn
    torch.manual_seed(8)
    net = tnn.Module()
    net.token_embedding, net.ctx = tnn.Embedding(V, D), tnn.Embedding(V, 6)
    net.attn = tnn.MultiheadAttention(D, H, batch_first=True, kdim=6, vdim=6)
    save_file(net.state_dict(), str(tmp_path / "attn.safetensors"))
    q_in, c_in = nn.Input(shape=(T,), dtype="int32"), nn.Input(shape=(4,), dtype="int32")
    q, c = nn.Embedding(V, D)(q_in), nn.Embedding(V, 6)(c_in)
    model = nn.Model([q_in, c_in], nn.MultiHeadAttention(num_heads=H, key_dim=D // H)(q, c))
    model.compile(backend="numpy", dtype="float32")
    mapping = {"token_embedding": "embedding_1", "ctx": "embedding_2", "attn": "multi_head_attention_1"}
    load_torch_weights(model, tmp_path / "attn.safetensors", mapping=mapping)
    original = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    back = to_torch_state_dict(model, prefixes=["token_embedding", "ctx", "attn"], tensors=True)
    net.load_state_dict(back, strict=True)
    assert list(back) == list(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)


def test_torch_attention_errors_list_every_offending_name():
    torch = pytest.importorskip("torch")
    model = gpt_block()
    model.compile(backend="numpy")
    good = {k: v.numpy() for k, v in _torch_gpt(torch).state_dict().items()}
    bad = dict(good)
    bad["attn.in_proj_weight"] = np.zeros((3 * D, D + 1))
    del bad["attn.out_proj.bias"]
    bad["attn.bias_k"] = np.zeros((1, 1, D))
    bad["embed.position_embedding.weight"] = np.zeros((T + 1, D))
    before = model.get_weights()
    with pytest.raises(WeightsError) as err:
        load_torch_weights(model, bad)
    text = str(err.value)
    for piece in ("attn.in_proj_weight has shape (24, 9); multi_head_attention_1/query_kernel, "
                  "multi_head_attention_1/key_kernel, multi_head_attention_1/value_kernel need (8, 8), (8, 8), "
                  "(8, 8) (PyTorch (24, 8))",
                  "missing attn.out_proj.bias (for multi_head_attention_1/output_bias (8,))",
                  "multi_head_attention_1 (MultiHeadAttention) has no place for attn.bias_k (1, 1, 8)",
                  "embed.position_embedding.weight has shape (6, 8); "
                  "token_and_position_embedding_1/position_embeddings needs (5, 8) (PyTorch (5, 8))"):
        assert piece in text, text
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing changed
    no_attention = {k: v for k, v in good.items() if not k.startswith("attn.")}
    with pytest.raises(WeightsError, match=r"state dict has 7 modules with weights .*the model 8 layers with "
                                           r"weights \(token_and_position_embedding_1, layer_normalization_1, "
                                           r"multi_head_attention_1,"):
        load_torch_weights(model, no_attention)


def test_numbered_modules_from_a_safetensors_file_keep_their_order(tmp_path):
    """safetensors sorts keys as text (``10.weight`` before ``2.weight``); numbered modules are put back."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tnn = torch.nn
    torch.manual_seed(6)
    widths = [3, 4, 5, 6, 4, 3, 2]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [tnn.Linear(a, b), tnn.Tanh()]
    net = tnn.Sequential(*layers[:-1])  # Linear at 0, 2, ..., 10
    save_file(net.state_dict(), str(tmp_path / "mlp.safetensors"))
    model = nn.Sequential([nn.Dense(w, activation="tanh") for w in widths[1:-1]] + [nn.Dense(widths[-1])],
                          input_dim=3)
    model.compile(backend="numpy", dtype="float32")
    load_torch_weights(model, tmp_path / "mlp.safetensors")
    X = np.random.default_rng(4).normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)


def test_gpt2_style_separate_token_and_position_embeddings():
    """GPT-2's ``wte`` and ``wpe`` (two sibling ``nn.Embedding``) fill one ``TokenAndPositionEmbedding``:
    tokens first, then positions, by order or by a mapping that names both for the layer."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    torch.manual_seed(7)
    wte, wpe, ln_f, head = tnn.Embedding(V, D), tnn.Embedding(T, D), tnn.LayerNorm(D), tnn.Linear(D, V)
    state = {f"{p}.{k}": v for p, m in (("wte", wte), ("wpe", wpe), ("ln_f", ln_f), ("lm_head", head))
             for k, v in m.state_dict().items()}
    inp = nn.Input(shape=(T,), dtype="int32")
    model = nn.Model(inp, nn.Dense(V)(nn.LayerNormalization(epsilon=1e-5)(nn.TokenAndPositionEmbedding(V, T, D)(inp))))
    model.compile(backend="numpy", dtype="float32")
    X, _ = _ids(3, seed=2)
    ids = torch.from_numpy(X.astype(np.int64))
    with torch.no_grad():
        want = head(ln_f(wte(ids) + wpe(torch.arange(T)))).numpy()
    mapping = {"wte": "token_and_position_embedding_1", "wpe": "token_and_position_embedding_1",
               "ln_f": "layer_normalization_1", "lm_head": "dense_1"}
    for how in (None, mapping):
        model.set_weights({k: np.zeros_like(v) for k, v in model.get_weights().items()})
        load_torch_weights(model, state, mapping=how)
        np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
    bad = {**state, "wpe.weight": torch.zeros(T + 2, D)}
    for how in (None, mapping):
        with pytest.raises(WeightsError, match=r"wpe\.weight has shape \(7, 8\); token_and_position_embedding_1/"
                                               r"position_embeddings needs \(5, 8\)"):
            load_torch_weights(model, bad, mapping=how)
    with pytest.raises(WeightsError, match=r"mapping names 2 modules for layer_normalization_1 \(ln_f, lm_head\)"):
        load_torch_weights(model, state, mapping={**mapping, "lm_head": "layer_normalization_1"})


# --------------------------------------------------------------------------- recurrent layers

RT, RF, RU, RC = 6, 3, 4, 3  # steps, features, units, classes
RECURRENT = {"RNN": "SimpleRNN", "LSTM": "LSTM", "GRU": "GRU"}  # PyTorch -> symdl


def _torch_recurrent(torch, kind, bidirectional=False, seed=0):
    """A sequence classifier: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (batch_first) -> last step -> ``nn.Linear``.
    Bidirectional: the last step is each direction's final state ``h_n`` (the backward one read the first
    input last), as Keras's ``Bidirectional(return_sequences=False)``."""
    tnn = torch.nn
    torch.manual_seed(seed)

    class Classifier(tnn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(tnn, kind)(RF, RU, batch_first=True, bidirectional=bidirectional)
            self.fc = tnn.Linear(RU * (2 if bidirectional else 1), RC)

        def forward(self, x):
            out, h = self.rnn(x)
            h = h[0] if kind == "LSTM" else h  # LSTM: (h_n, c_n)
            return self.fc(torch.cat([h[0], h[1]], dim=1) if bidirectional else out[:, -1])

    return Classifier()


def recurrent_classifier(kind, bidirectional=False):
    layer = getattr(nn, RECURRENT[kind])(RU)
    return nn.Sequential([nn.Bidirectional(layer) if bidirectional else layer, nn.Dense(RC)], input_shape=(RT, RF))


def _sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, RT, RF)).astype(np.float32), rng.integers(0, RC, size=n)


RECURRENT_CASES = [("RNN", False), ("LSTM", False), ("GRU", False), ("LSTM", True), ("GRU", True)]


@pytest.mark.parametrize("kind,bidirectional", RECURRENT_CASES)
def test_torch_recurrent_predictions_and_gradients(tmp_path, kind, bidirectional):
    """PyTorch's weights from a safetensors file: logits to 1e-5, every gradient to 1e-6 (float32); the
    GRU's gate blocks reordered (r, z, n -> z, r, h), the LSTM's and RNN's two biases added."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    reference = _torch_recurrent(torch, kind, bidirectional)
    path = tmp_path / "rnn.safetensors"
    save_file(reference.state_dict(), str(path))
    model = recurrent_classifier(kind, bidirectional)
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32")
    # the file's keys are sorted by name (fc before rnn): the modules are matched by name
    load_torch_weights(model, path, mapping=dict(zip(["rnn", "fc"], model.layer_names)))
    _compare_with_torch(torch, model, reference, kind)


def _compare_with_torch(torch, model, reference, kind, threads=(None,), monkeypatch=None):
    """Logits to 1e-5, the cross-entropy and every gradient to 1e-6 (in PyTorch's layout)."""
    from helpers import run_threaded

    X, labels = _sequences(7, seed=1)
    logits = reference(torch.from_numpy(X))
    np.testing.assert_allclose(model.predict(X), logits.detach().numpy(), atol=1e-5, rtol=0)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    wanted = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    for count in threads:
        f = sd.value_and_grad(model.loss, model.params, backend=model.backend, dtype="float32")
        if count is not None and os.environ.get("NUMBA_DISABLE_JIT") != "1":
            run_threaded(f.runner, count, monkeypatch)
        value, grads = f(x=X, y=np.eye(RC, dtype=np.float32)[labels], **model.get_weights())
        assert abs(value - loss.item()) < 1e-6
        converted = _gradients_as_torch(model, grads, ("rnn", "fc"))
        assert list(converted) == list(wanted)
        for key, g in wanted.items():
            # one symdl bias for PyTorch's two (LSTM, RNN): both have its gradient
            got = converted[key.replace("bias_hh", "bias_ih") if kind != "GRU" else key]
            np.testing.assert_allclose(got, g, atol=1e-6, rtol=0, err_msg=f"{kind} {key} on {count} thread(s)")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_bidirectional_recurrent_on_the_cpu_backend_one_and_two_threads(kind, monkeypatch):
    """The compiled CPU code on PyTorch's weights: the same logits and gradients, one and two threads."""
    torch = pytest.importorskip("torch")
    reference = _torch_recurrent(torch, kind, bidirectional=True, seed=2)
    model = recurrent_classifier(kind, bidirectional=True)
    model.compile(loss="softmax_cross_entropy", backend="cpu", dtype="float32")
    load_torch_weights(model, reference)
    _compare_with_torch(torch, model, reference, kind, threads=(1, 2), monkeypatch=monkeypatch)


@pytest.mark.parametrize("kind,bidirectional", RECURRENT_CASES)
def test_torch_recurrent_round_trip_loads_strictly_into_pytorch(kind, bidirectional):
    torch = pytest.importorskip("torch")
    model = recurrent_classifier(kind, bidirectional)
    model.compile(backend="numpy", seed=5, dtype="float32")
    weights = model.get_weights()
    rng = np.random.default_rng(3)  # biases away from zero (a GRU's recurrent bias row included)
    model.set_weights({k: v + rng.normal(size=v.shape).astype(np.float32) * 0.3 if k.startswith("bias") else v
                       for k, v in weights.items()})
    reference = _torch_recurrent(torch, kind, bidirectional, seed=1)
    state = to_torch_state_dict(model, prefixes=["rnn", "fc"], tensors=True)
    assert list(state) == list(reference.state_dict())  # the same keys, in PyTorch's order
    reference.load_state_dict(state, strict=True)
    X, _ = _sequences(4, seed=2)
    with torch.no_grad():
        want = reference(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
    if kind != "GRU":  # one bias: PyTorch gets it as bias_ih, and zeros as bias_hh
        assert not state["rnn.bias_hh_l0"].any()
    again = recurrent_classifier(kind, bidirectional)
    again.compile(backend="numpy", seed=8, dtype="float32")
    load_torch_weights(again, reference)
    after = again.get_weights()
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_torch_recurrent_errors_list_every_offending_name():
    torch = pytest.importorskip("torch")
    model = recurrent_classifier("LSTM")
    model.compile(backend="numpy")
    good = {k: v.numpy() for k, v in _torch_recurrent(torch, "LSTM").state_dict().items()}
    bad = dict(good)
    bad["rnn.weight_ih_l0"] = np.zeros((4 * RU, RF + 1))
    del bad["rnn.bias_hh_l0"]
    bad["rnn.weight_hr_l0"] = np.zeros((RU, RU))  # proj_size: no counterpart
    before = model.get_weights()
    with pytest.raises(WeightsError) as err:
        load_torch_weights(model, bad)
    text = str(err.value)
    for piece in ("rnn.weight_ih_l0 has shape (16, 4); lstm_1/kernel needs (3, 16) (PyTorch (16, 3))",
                  "missing rnn.bias_hh_l0 (for lstm_1/bias (16,))",
                  "lstm_1 (LSTM) has no place for rnn.weight_hr_l0 (4, 4)"):
        assert piece in text, text
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing changed
    # num_layers=2 is two symdl layers: one is too few
    stacked = torch.nn.LSTM(RF, RU, num_layers=2, batch_first=True).state_dict()
    with pytest.raises(WeightsError, match=r"the state dict has 3 modules with weights \(rnn\[l0\] "
                                           r"\{weight_ih_l0: \(16, 3\), .*rnn\[l1\] \{weight_ih_l1: \(16, 4\), "
                                           r"weight_hh_l1: \(16, 4\), bias_ih_l1: \(16,\), bias_hh_l1: \(16,\)\}, "
                                           r"fc .*the model 2 layers"):
        load_torch_weights(model, {**{f"rnn.{k}": v for k, v in stacked.items()},
                                   "fc.weight": good["fc.weight"], "fc.bias": good["fc.bias"]})
    # a bidirectional model given one direction's weights: the backward layer's are missing
    both = recurrent_classifier("GRU", bidirectional=True)
    both.compile(backend="numpy")
    one = {k: v.numpy() for k, v in _torch_recurrent(torch, "GRU").state_dict().items()}
    one["fc.weight"] = np.zeros((RC, 2 * RU), np.float32)
    with pytest.raises(WeightsError) as err:
        load_torch_weights(both, one)
    text = str(err.value)
    assert ("missing rnn.weight_ih_l0_reverse (for bidirectional_1/backward_gru/kernel (3, 12)), "
            "rnn.weight_hh_l0_reverse (for bidirectional_1/backward_gru/recurrent_kernel (4, 12)), "
            "rnn.bias_ih_l0_reverse (for bidirectional_1/backward_gru/bias (2, 12)), "
            "rnn.bias_hh_l0_reverse (for bidirectional_1/backward_gru/bias (2, 12))") in text, text


def test_torch_recurrent_without_bias_and_relu():
    """``bias=False`` is ``use_bias=False``; ``nn.RNN(nonlinearity="relu")`` is ``SimpleRNN(activation="relu")``."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(4)
    X, _ = _sequences(3, seed=5)
    cases = [(torch.nn.GRU(RF, RU, bias=False, batch_first=True), nn.GRU(RU, use_bias=False, return_sequences=True)),
             (torch.nn.RNN(RF, RU, nonlinearity="relu", batch_first=True),
              nn.SimpleRNN(RU, activation="relu", return_sequences=True))]
    for net, layer in cases:
        model = nn.Sequential([layer, nn.Dense(RC)], input_shape=(RT, RF))
        model.compile(backend="numpy", dtype="float32")
        head = torch.nn.Linear(RU, RC)
        load_torch_weights(model, {**{f"rnn.{k}": v for k, v in net.state_dict().items()},
                                   **{f"fc.{k}": v for k, v in head.state_dict().items()}})
        with torch.no_grad():
            want = head(net(torch.from_numpy(X))[0]).numpy()  # every step: return_sequences=True
        np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
        assert sorted(to_torch_state_dict(model, prefixes=["rnn", "fc"])) == sorted(
            [f"rnn.{k}" for k in net.state_dict()] + ["fc.weight", "fc.bias"])
    no_bias = nn.Sequential([nn.LSTM(RU, use_bias=False), nn.Dense(RC)], input_shape=(RT, RF))
    no_bias.compile(backend="numpy")
    with pytest.raises(WeightsError, match=r"lstm_1 \(LSTM\) has no place for rnn\.bias_ih_l0 \(16,\), "
                                           r"rnn\.bias_hh_l0 \(16,\)"):
        load_torch_weights(no_bias, {**{f"rnn.{k}": v for k, v in torch.nn.LSTM(RF, RU).state_dict().items()},
                                     "fc.weight": np.zeros((RC, RU)), "fc.bias": np.zeros(RC)})


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_stacked_recurrent_module_is_one_layer_each(tmp_path, bidirectional):
    """``nn.LSTM(num_layers=2)``: ``..._l0`` and ``..._l1`` fill two symdl layers (``rnn[l0]``, ``rnn[l1]``
    in a mapping), and two recurrent layers saved under one prefix are one stacked module again."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(9)

    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(RF, RU, num_layers=2, batch_first=True, bidirectional=bidirectional)
            self.fc = torch.nn.Linear(RU * (2 if bidirectional else 1), RC)

        def forward(self, x):
            out, (h, _) = self.rnn(x)
            return self.fc(torch.cat([h[-2], h[-1]], dim=1) if bidirectional else out[:, -1])

    net = Stacked()
    wrap = nn.Bidirectional if bidirectional else (lambda layer: layer)
    model = nn.Sequential([wrap(nn.LSTM(RU, return_sequences=True)), wrap(nn.LSTM(RU)), nn.Dense(RC)],
                          input_shape=(RT, RF))
    model.compile(backend="numpy", dtype="float32")
    X, _ = _sequences(5, seed=6)
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    save_file(net.state_dict(), str(tmp_path / "stacked.safetensors"))
    mapping = dict(zip(["rnn[l0]", "rnn[l1]", "fc"], model.layer_names))
    for source, how in ((net.state_dict(), None), (tmp_path / "stacked.safetensors", mapping)):
        model.set_weights({k: np.zeros_like(v) for k, v in model.get_weights().items()})
        load_torch_weights(model, source, mapping=how)
        np.testing.assert_allclose(model.predict(X), want, atol=1e-5, rtol=0)
    state = to_torch_state_dict(model, prefixes=["rnn", "rnn", "fc"], tensors=True)
    assert list(state) == list(net.state_dict())
    net.load_state_dict(state, strict=True)
