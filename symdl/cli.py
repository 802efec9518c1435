"""The ``symdl`` command: print derived formulas, or train a model on a bundled dataset.

    symdl formulas --layers 2,16,1 --activation tanh --loss bce_with_logits [--latex]
    symdl train --dataset digits --layers 64,64,10 --epochs 20 [--backend cpu] [--save PATH]
"""
from __future__ import annotations

import argparse
import sys

DATASETS = {"digits": "classes", "xor": "classes", "moons": "classes", "spirals": "classes", "sine": "regression"}


def _layers(text: str) -> list:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like 2,16,1, got {text!r}")
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--layers needs an input size and at least one layer size, all positive")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="symdl",
        description="Neural networks with symbolically derived, compiled gradients.",
        epilog="Examples:\n  symdl formulas --layers 2,16,1 --activation tanh --loss bce_with_logits\n"
        "  symdl train --dataset digits --layers 64,64,10 --epochs 20 --save digits.symdl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formulas", help="print ∂L/∂ of every parameter and the textbook backward pass")
    f.add_argument("--layers", type=_layers, required=True, help="sizes, input first: 2,16,1")
    f.add_argument("--activation", default="tanh", help="hidden activation (default tanh)")
    f.add_argument("--loss", default="bce_with_logits", help="mse, mae, huber, bce_with_logits, softmax_cross_entropy")
    f.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the weight matrices")
    f.add_argument("--latex", action="store_true", help="print LaTeX instead of text")

    t = sub.add_parser("train", help="train an MLP on a bundled dataset and report held-out accuracy")
    t.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    t.add_argument("--layers", type=_layers, help="sizes, input first (default: input,64,classes)")
    t.add_argument("--activation", default="relu")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--optimizer", default="Adam", help="SGD, Momentum, Nesterov, Adam, AdamW, RMSProp, Adagrad")
    t.add_argument("--backend", default="cpu", choices=["numpy", "cpu", "cuda"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", help="write the trained model here")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cmd_formulas(args) -> int:
    import symdl as sd

    sizes = args.layers
    x = sd.input("x", sizes[0])
    y = sd.input("y", sizes[-1])
    act = sd.functions.get(args.activation)
    h, params = x, []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        W, c = sd.param(f"W{i}", (a, b)), sd.param(f"b{i}", b)
        params += [W, c]
        h = h @ W + c
        if i < len(sizes) - 1 and act is not None:
            h = act(h)
    loss = sd.losses.get(args.loss)(h, y)
    if args.l2:
        loss = loss + args.l2 * sd.l2(*params[::2])
    grads = sd.grad(loss, params)
    for p in params:
        rhs = sd.latex(grads[p]) if args.latex else str(grads[p])
        left = r"\frac{\partial L}{\partial %s}" % sd.latex(p) if args.latex else f"∂L/∂{p.name}"
        print(f"{left} = {rhs}")
    print()
    e = sd.explain(loss, params)
    print(e.latex if args.latex else e)
    return 0


def cmd_train(args) -> int:
    import numpy as np

    import symdl as sd

    X, y = getattr(sd.datasets, args.dataset)()
    kind = DATASETS[args.dataset]
    Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=args.seed)
    Xtr, Xte = sd.datasets.standardize(Xtr, Xte)
    outputs = int(np.max(y)) + 1 if kind == "classes" else 1
    sizes = args.layers or [X.shape[1], 64, outputs]
    if sizes[0] != X.shape[1] or sizes[-1] != outputs:
        print(f"symdl train: {args.dataset} needs --layers {X.shape[1]},...,{outputs} "
              f"(input {X.shape[1]} features, {outputs} outputs); got {','.join(map(str, sizes))}", file=sys.stderr)
        return 2
    layers = [sd.nn.Dense(s, activation=args.activation) for s in sizes[1:-1]] + [sd.nn.Dense(sizes[-1])]
    model = sd.nn.Sequential(layers, input_dim=sizes[0])
    if args.optimizer not in sd.optim.OPTIMIZERS:
        print(f"symdl train: unknown optimizer {args.optimizer!r}; choose {', '.join(sd.optim.OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    model.compile(loss="softmax_cross_entropy" if kind == "classes" else "mse",
                  optimizer=sd.optim.OPTIMIZERS[args.optimizer](args.lr), backend=args.backend, seed=args.seed)
    model.summary()
    model.fit(Xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, validation_data=(Xte, yte),
              verbose=0 if args.quiet else 1, seed=args.seed)
    result = model.evaluate(Xte, yte)
    if kind == "classes":
        print(f"held-out accuracy: {result['accuracy']:.4f} ({len(Xte)} samples)")
    else:
        print(f"held-out mse: {result['loss']:.5f} ({len(Xte)} samples)")
    if args.save:
        model.save(args.save)
        print(f"saved to {args.save}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"formulas": cmd_formulas, "train": cmd_train}[args.command](args)
    except (ValueError, RuntimeError) as exc:
        print(f"symdl {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
