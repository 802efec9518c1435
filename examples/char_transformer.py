"""A small GPT, trained on the CPU: token and position embeddings -> N pre-norm blocks -> layer
norm -> the next token's logits, built with the functional API::

    x = x + MultiHeadAttention(LN(x), causal)      # each block: attention, then an MLP,
    x = x + Dense(d)(Dense(4d, gelu)(LN(x)))        # each around a skip connection

By default it learns a task it generates itself (minGPT's sorting: read 6 digits, write them
sorted), so it runs anywhere with no download; ``--text PATH`` trains a character-level model on a
file of yours instead (each character a token, the target the next character). It prints the
loss curve, a greedy sample (a generation loop calling ``predict`` on the context) and the
backward pass of one block's attention as ``sd.explain`` derives it.

    python examples/char_transformer.py                      # sorting, 2 blocks
    python examples/char_transformer.py --text input.txt --layers 4 --width 128 --context 64
    python examples/char_transformer.py --quick              # a few seconds (what the tests run)
"""
import argparse
import sys

import numpy as np

import symdl as sd
from _common import QUICK

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--text", help="a text file: train a character-level model on it")
ap.add_argument("--layers", type=int, default=2, help="transformer blocks")
ap.add_argument("--width", type=int, default=64, help="the embedding width d")
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--context", type=int, default=64, help="sequence length with --text")
ap.add_argument("--epochs", type=int, default=None)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--quick", action="store_true", help="a tiny model, a few epochs (the example tests)")
args = ap.parse_args()
quick = args.quick or QUICK
if quick:
    args.layers, args.width, args.heads, args.context = 1, 16, 2, min(args.context, 16)
rng = np.random.default_rng(0)


# ----------------------------------------------------------------------------- data
DIGITS, LENGTH = 3, 6  # minGPT's sorting task: 6 digits from {0, 1, 2}


def sorting_data(n):
    """Sequences ``a_1..a_6 s_1..s_6`` (``s`` = sorted ``a``): inputs all but the last token, targets
    the sequence shifted by one. The targets of the first five positions are random digits nothing
    can predict (a loss floor of 5/11·ln 3 ≈ 0.50 on them); the last six are exactly learnable."""
    a = rng.integers(0, DIGITS, size=(n, LENGTH))
    seq = np.concatenate([a, np.sort(a, axis=1)], axis=1)
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


if args.text:
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    vocab, T = len(chars), args.context
    if len(text) < 2 * T + 2:
        sys.exit(f"--text {args.text}: {len(text)} characters, too short for a context of {T}; pass --context")
    ids = np.array([chars.index(c) for c in text], dtype=np.int32)
    starts = rng.integers(0, len(ids) - T - 1, size=256 if quick else 4096)  # random windows of T + 1
    windows = ids[starts[:, None] + np.arange(T + 1)]
    X, Y = windows[:, :-1], windows[:, 1:]
    decode = lambda seq: "".join(chars[i] for i in seq)  # noqa: E731
else:
    vocab, T = DIGITS, 2 * LENGTH - 1
    X, Y = sorting_data(512 if quick else 6000)
    decode = lambda seq: " ".join(map(str, seq))  # noqa: E731


# ----------------------------------------------------------------------------- the model
def gpt(layers):
    """The GPT as a functional model: ids ``(n, T)`` -> logits ``(n, T, vocab)``."""
    d = args.width
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    x = sd.nn.TokenAndPositionEmbedding(vocab, T, d)(inp)
    for _ in range(layers):
        h = sd.nn.LayerNormalization()(x)
        x = x + sd.nn.MultiHeadAttention(num_heads=args.heads, key_dim=d // args.heads)(h, h, use_causal_mask=True)
        h = sd.nn.LayerNormalization()(x)
        x = x + sd.nn.Dense(d)(sd.nn.Dense(4 * d, activation="gelu")(h))
    logits = sd.nn.Dense(vocab)(sd.nn.LayerNormalization()(x))
    return sd.nn.Model(inp, logits, name="char_transformer")


model = gpt(args.layers)
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.AdamW(args.lr), backend="cpu", dtype="float32",
              seed=0)
model.summary()
epochs = args.epochs or (3 if quick else 12)
history = model.fit(X, Y, epochs=epochs, batch_size=32 if quick else 64, verbose=0)
print("loss curve (per epoch): " + " ".join(f"{v:.4f}" for v in history["loss"]))


# ----------------------------------------------------------------------------- greedy sampling
def generate(prompts, steps):
    """Append ``steps`` greedy tokens to each prompt (rows of ids). The model reads T tokens, so the
    context (the last T tokens) is padded on the right with zeros: the causal mask keeps every
    position blind to the padding after it, so position ``len - 1`` gives the next token exactly."""
    out = [list(p) for p in prompts]
    for _ in range(steps):
        ctx = np.zeros((len(out), T), dtype=np.int32)
        last = []
        for i, seq in enumerate(out):
            window = seq[-T:]
            ctx[i, : len(window)] = window
            last.append(len(window) - 1)
        logits = model.predict(ctx)  # (n, T, vocab)
        for i, seq in enumerate(out):
            seq.append(int(logits[i, last[i]].argmax()))
    return out


if args.text:
    prompt = ids[: min(T // 2, 16)]
    sample = generate([prompt], 40 if quick else 200)[0]
    print(f"sample (greedy, prompt {decode(prompt)!r}):\n{decode(sample)}")
else:
    test, _ = sorting_data(100)
    written = np.array(generate(test[:, :LENGTH], LENGTH))[:, LENGTH:]
    right = np.mean(np.all(written == np.sort(test[:, :LENGTH], axis=1), axis=1))
    print(f"sample (greedy): {decode(test[0, :LENGTH])} -> {decode(written[0])}")
    print(f"held-out sequences sorted exactly: {right:.0%}")


# ----------------------------------------------------------------------------- attention's δ
# The backward pass of one block, as symdl derives it (a one-block model: the lines of the others
# repeat it; docs/attention.md reads them line by line). For head k (Sk its scaled scores,
# Pk = softmax(causal(Sk)), Ok = Pk·Vk, each within a sequence) the lines that matter read:
#   δOk = cols(δh·Wo.T, ...)         the head's columns of the output projection's δ
#   δPk = δOk·Vk.T                   through the mix Ok = Pk·Vk (a product within each sequence)
#   δSk = Pk⊙(δPk − rowsum(Pk⊙δPk))  the softmax's adjoint: FlashAttention's row-sum form, no Jacobian
#   δ3 = place(Pk.T·δOk, ...)        values: δV = Pᵀ δO
#   δ2 = place((δSk/√d).T·Qk, ...)   keys:   δK = δSᵀ Q/√d   (Q = cols(Z1, ...))
#   δ1 = place((δSk/√d)·Kk, ...)     queries: δQ = δS K/√d   (K = cols(Z2, ...))
# The causal mask adds a constant, so it adds no term: Pk is exactly 0 above the diagonal, and so
# is δSk. Where the printer does not name Pk and δPk, the δSk term appears inline in δ1 and δ2 as
#   softmax(causal(S))⊙(δO·V.T) + sum_cols(-softmax(causal(S))⊙(δO·V.T))⊙softmax(causal(S))
# which is P⊙δP − rowsum(P⊙δP)⊙P = P⊙(δP − rowsum(P⊙δP)): the same textbook form, expanded.
one = gpt(1)
one.compile(loss="softmax_cross_entropy", optimizer=sd.optim.AdamW(args.lr), backend="numpy")
backward = str(sd.explain(one.loss, one.params)).split("Backward pass")[1].split("\n\n")[0].splitlines()[1:]
named = ("δO", "δP", "δS", "δ1 ", "δ2 ", "δ3 ")
lines = [ln for ln in backward if ln.strip().startswith(named) or "sum_cols(-softmax(" in ln]
print("\nattention's backward pass in one block (sd.explain):")
print("\n".join(lines))
