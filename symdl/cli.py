"""The ``symdl`` command: print derived formulas, or train a model on a bundled dataset.

    symdl formulas --layers 2,16,1 --activation tanh --loss bce_with_logits [--latex]
    symdl train --dataset digits --layers 64,64,10 --epochs 20 [--backend cpu] [--save PATH]
    symdl cache info | clear | prune [--older-than DAYS] [--max-mb MB]
"""
from __future__ import annotations

import argparse
import os
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


def _count(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} takes an integer >= {low}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {value}")
        return value

    return parse


def _nonnegative(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} takes a number >= 0, got {text!r}")
        if not (value >= 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number >= 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(
        prog="symdl",
        description="Neural networks with symbolically derived, compiled gradients.",
        epilog="Examples:\n  symdl formulas --layers 2,16,1 --activation tanh --loss bce_with_logits\n"
        "  symdl train --dataset digits --layers 64,64,10 --epochs 20 --save digits.symdl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"symdl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formulas", help="print ∂L/∂ of every parameter and the textbook backward pass")
    f.add_argument("--layers", type=_layers, required=True, help="sizes, input first: 2,16,1")
    f.add_argument("--activation", default="tanh", help="hidden activation (default tanh)")
    f.add_argument("--loss", default="bce_with_logits", help="mse, mae, huber, bce_with_logits, softmax_cross_entropy")
    f.add_argument("--l2", type=_nonnegative("--l2"), default=0.0, help="L2 penalty on the weight matrices (>= 0)")
    f.add_argument("--latex", action="store_true", help="print LaTeX instead of text")

    t = sub.add_parser("train", help="train an MLP on a bundled dataset and report held-out accuracy")
    t.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                   help="a dataset that ships with symdl's dependencies (default digits)")
    t.add_argument("--layers", type=_layers, help="sizes, input first (default: input,64,classes)")
    t.add_argument("--activation", default="relu", help="hidden activation (default relu)")
    t.add_argument("--epochs", type=_count(0, "--epochs"), default=20, help="epochs to train, >= 0 (default 20)")
    t.add_argument("--batch-size", type=_count(1, "--batch-size"), default=64, help="mini-batch size (default 64)")
    t.add_argument("--lr", type=_nonnegative("--lr"), default=1e-2, help="learning rate, >= 0 (default 0.01)")
    t.add_argument("--optimizer", default="Adam",
                   help="SGD, Momentum, Nesterov, Adam, AdamW, RMSProp or Adagrad, any case (default Adam)")
    t.add_argument("--backend", default="cpu", choices=["numpy", "cpu", "cuda"],
                   help="where the compiled step runs (default cpu)")
    t.add_argument("--seed", type=int, default=0, help="seed for the weights, the split and the batches (default 0)")
    t.add_argument("--save", help="write the trained model here")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("cache", help="show, prune or empty the compile cache ($SYMDL_CACHE_DIR)")
    c.add_argument("action", choices=["info", "clear", "prune"],
                   help="info: where it is and its size; clear: remove everything; prune: apply the limits")
    c.add_argument("--older-than", type=_nonnegative("--older-than"), default=None,
                   help="prune: remove entries unused for this many days (default 30)")
    c.add_argument("--max-mb", type=_nonnegative("--max-mb"), default=None,
                   help="prune: then remove the least recently used entries above this size (default 1024)")
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
    try:
        optimizer_class = sd.optim.lookup(args.optimizer)
    except ValueError:
        print(f"symdl train: unknown optimizer {args.optimizer!r}; choose {', '.join(sd.optim.OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    model.compile(loss="softmax_cross_entropy" if kind == "classes" else "mse",
                  optimizer=optimizer_class(args.lr), backend=args.backend, seed=args.seed)
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


def cmd_cache(args) -> int:
    from .backends import cache

    if args.action == "clear":
        print(f"removed {cache.clear()} cached module(s) from {cache.cache_dir()}")
    elif args.action == "prune":
        size = None if args.max_mb is None else int(args.max_mb * (1 << 20))
        print(f"removed {cache.prune(max_age_days=args.older_than, max_size=size)} cached module(s)")
    if args.action in ("info", "prune"):
        found = cache.info()
        print(f"compile cache: {found['path']}\n{found['entries']} module(s), {found['bytes'] / (1 << 20):.1f} MB")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        # ``symdl formulas | head``: the reader left. Send the rest of our output nowhere, quietly
        # (the recipe in Python's documentation for SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, RuntimeError) as exc:
        print(f"symdl {args.command}: {exc}", file=sys.stderr)
        return 2


COMMANDS = {"formulas": cmd_formulas, "train": cmd_train, "cache": cmd_cache}


if __name__ == "__main__":
    sys.exit(main())
