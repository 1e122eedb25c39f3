"""Linear vs MLP vs boosted-tree vs shared-across-layers vs rich-input vs local-context scorers on the same train/test split: held-out
R², Spearman, training seconds, and scorer FLOPs per token as a fraction of the model's linear-projection FLOPs per token.

    python benchmarks/surrogate_fit.py --data DATA_DIR [--model testbed] [--json]
    python benchmarks/surrogate_fit.py --data DATA_DIR --model smollm2-135m --layers 0 6 12 18 24 29 --scorers linear gbdt
    python benchmarks/surrogate_fit.py --synthetic 50000          # no oracle dataset needed

Every scorer is trained in this one run, on the same rows, so the time ratios are comparable.
"""

from __future__ import annotations

import argparse
import json

from kvzap_lab.model import MODEL_HELP, load_model
from kvzap_lab.surrogate import projection_flops_per_token, synthetic_split
from kvzap_lab.data import load_dataset
from kvzap_lab.train import fit_and_evaluate

# rich needs --model (it fits through its attention); local needs a dataset collected with --neighbours K (K >= its context)
SCORERS = {"linear": {}, "mlp": {}, "gbdt": {}, "shared": {}, "rich": {}, "local": {}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="oracle dataset directory")
    source.add_argument("--synthetic", type=int, metavar="N", help="use N synthetic rows (hidden 128, 4 layers, 2 KV heads)")
    parser.add_argument("--model", help=f"model whose linear projections set the FLOPs baseline: {MODEL_HELP}")
    parser.add_argument("--set", action="append", default=[], metavar="SCORER.KEY=VALUE", help="e.g. mlp.epochs=5")
    parser.add_argument("--scorers", nargs="+", choices=list(SCORERS), help="scorers to fit (default: all; rich "
                        "only with --model and every layer, local only on data with --neighbours)")
    parser.add_argument("--layers", nargs="+", type=int, help="fit and score these layers only (the dataset's other "
                        "layers are not loaded): a cheaper comparison on a real model's data")
    parser.add_argument("--json", action="store_true", help="print all rows as JSON on the last line")
    args = parser.parse_args(argv)

    model = load_model(args.model)[0] if args.model else None
    if args.synthetic:
        dataset = synthetic_split(args.synthetic, n_layers=4, hidden=128)
    else:
        dataset = load_dataset(args.data, model=model, layers=args.layers)
    usable = {"rich": bool(args.model and args.data and not args.layers), "local": dataset.previous_train is not None}
    scorers = args.scorers or [name for name in SCORERS if usable.get(name, True)]
    params = {name: dict(SCORERS[name]) for name in scorers}
    for item in args.set:
        target, _, value = item.partition("=")
        name, _, key = target.partition(".")
        params[name][key] = json.loads(value)
    baseline = projection_flops_per_token(model.config) if model is not None and not args.layers else None

    rows = []
    for name, p in params.items():
        # synthetic rows and a subset of layers fit no model (the FLOPs ratio needs every layer)
        _, summary = fit_and_evaluate(name, dataset, p, model=model if args.data and not args.layers else None)
        summary["flops_ratio"] = summary["flops_per_token"] / baseline if baseline else None
        rows.append(summary)
    fastest = min(r["train_seconds"] for r in rows)
    n, n_layers, hidden = dataset.X_train.shape
    print(f"{n} train / {len(dataset.X_test)} test rows, {n_layers} layers, hidden {hidden}, "
          f"{dataset.y_train.shape[2]} KV heads")
    print(f"{'scorer':>12} {'R2':>7} {'Spearman':>9} {'MSE':>8} {'train s':>8} {'x fastest':>9} {'FLOPs/tok':>10} {'% proj':>7}")
    for r in rows:
        ratio = f"{100 * r['flops_ratio']:7.3f}" if r["flops_ratio"] is not None else f"{'-':>7}"
        print(f"{r['policy']:>12} {r['r2']:7.4f} {r['spearman']:9.4f} {r['mse']:8.4f} {r['train_seconds']:8.1f} "
              f"{r['train_seconds'] / fastest:9.1f} {r['flops_per_token']:10d} {ratio}")
    print("R² per layer: " + "; ".join(f"{r['policy']} " + " ".join(f"{v:.3f}" for v in r["per_layer"]["r2"]) for r in rows))
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
