"""Train a scorer on an oracle dataset and report its held-out fit.

    python -m kvzap_lab.train --policy mlp --data DATA_DIR --out OUT_DIR [--set width=32 --set epochs=5] [--json]

Prints per-layer and mean held-out R² (squared Pearson, as the KVzap paper reports), Spearman and MSE; writes
``OUT/scorer/`` (load with ``get_policy(name, checkpoint=OUT/scorer)``), ``OUT/pred_vs_true.png`` and
``OUT/metrics.json``. With ``--json`` the summary is the last line of stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvzap_lab import cli, io, plots, tracking
from kvzap_lab.policy import resolve_policy
from kvzap_lab.surrogate import TrainableScorer, check_training_data, is_trainable, projection_flops_per_token, r2_spearman_mse


def _load_dataset(path, model=None):
    from kvzap_lab.data import load_dataset  # written by the oracle issue; imported only when training from disk

    return load_dataset(path, model=model)


def evaluate(scorer: TrainableScorer, X_test, y_test, positions=None, previous=None) -> dict:
    """Held-out metrics of a fitted scorer (``positions``, ``previous``: the rows', for scorers that read them):
    per-layer lists and means of ``r2``, ``spearman``, ``mse``."""
    X_test, y_test = check_training_data(X_test, y_test)
    per_layer = r2_spearman_mse(y_test, scorer.predict(X_test, positions=positions, previous=previous))
    return {k: float(np.mean(v)) for k, v in per_layer.items()} | {"per_layer": per_layer}


def make_scorer(policy: str, params: dict | None = None) -> TrainableScorer:
    """The unfitted trainable scorer ``policy`` with ``params``, its parameters validated (ValueError otherwise)."""
    factory = resolve_policy(policy)
    if not is_trainable(factory):
        raise ValueError(f"policy {policy!r} is not trainable; trainable policies: linear, mlp, shared, rich, local, gbdt (kvzap_linear, kvzap_mlp, kvzap_shared, kvzap_rich, kvzap_local)")
    try:
        scorer = factory(**(params or {}))
    except TypeError as err:
        raise ValueError(f"{err}; parameters of {policy!r}: {', '.join(inspect.signature(factory).parameters)}") from None
    scorer._check_params()
    return scorer


def fit_and_evaluate(policy: str, dataset, params: dict | None = None, model=None) -> tuple[TrainableScorer, dict]:
    """Fit a trainable scorer and measure its held-out fit (what ``python -m kvzap_lab.train`` does).

    Args:
        policy: a trainable policy name (``linear``, ``mlp``, ``gbdt`` or a registered one).
        dataset: an oracle dataset (:func:`kvzap_lab.data.load_dataset`): ``X_train [n, layers, hidden]``,
            ``y_train [n, layers, kv_heads]``, the same for test, and its ``manifest``.
        params: the scorer's constructor arguments (validated before fitting).
        model: the model the dataset was collected on (checked; gives the FLOPs ratio; KVzap-rich fits through it).
    Returns:
        ``(scorer, summary)``: the fitted scorer and ``{policy, params, train_seconds, n_train, n_test, r2,
        spearman, mse, per_layer, flops_per_token[, flops_ratio]}``.
    Raises:
        ValueError: an untrainable policy, bad parameters, or a dataset of another model.
    """
    scorer = make_scorer(policy, params)
    start = time.perf_counter()
    scorer.fit(dataset.X_train, dataset.y_train, manifest=dataset.manifest, model=model, positions=dataset.positions_train,
               previous=dataset.previous_train)
    summary = {"policy": scorer.policy_name, "params": scorer.get_params(), "train_seconds": time.perf_counter() - start}
    summary |= {"n_train": len(dataset.X_train), "n_test": len(dataset.X_test)}
    summary |= evaluate(scorer, dataset.X_test, dataset.y_test, dataset.positions_test, dataset.previous_test)
    summary["flops_per_token"] = scorer.flops_per_token()
    if model is not None:
        scorer.check_model(model)
        summary["flops_ratio"] = summary["flops_per_token"] / projection_flops_per_token(model.config)
    return scorer, summary


def quick_mlp_fit(model, tokenizer, contexts: list[list[int]], *, epochs: int, seed: int) -> tuple[TrainableScorer, np.ndarray]:
    """A KVzap-MLP fitted in memory on every token of ``contexts`` (no dataset on disk): the oracle's hidden
    states -> its log KVzip+ scores, for examples and benchmarks that need a trained scorer in seconds.

    Args:
        model, tokenizer: the model to score (:func:`kvzap_lab.model.load_model`); the scorer is tied to it.
        contexts: token ids of each context.
        epochs, seed: the MLP's training epochs and seed.
    Returns:
        ``(scorer, X)``: the fitted scorer and its training inputs ``X [n_tokens, layers, hidden]`` (to
        calibrate a threshold on, :func:`kvzap_lab.policy.calibrate`).
    """
    from kvzap_lab.model import fingerprint
    from kvzap_lab.oracle import score_contexts

    results = score_contexts(model, tokenizer, contexts, return_hidden=True)
    X = torch.cat([r.hidden for r in results]).numpy()  # [n, layers, hidden]
    y = torch.cat([r.scores.permute(2, 0, 1) for r in results]).numpy()  # [n, layers, kv_heads]
    scorer = make_scorer("mlp", {"epochs": epochs, "seed": seed})
    return scorer.fit(X, y, manifest={"model_fingerprint": fingerprint(model)}), X


def plot_predictions(y_true, y_pred, path) -> None:
    """Predicted-vs-true log-score density per layer (``y [n, layers, kv_heads]``), written atomically as PNG."""
    n_layers = y_true.shape[1]
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plots.figure(rows, cols, figsize=(3.2 * cols, 3.0 * rows))
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.axis("off")
            continue
        t, p = y_true[:, layer].ravel(), y_pred[:, layer].ravel()
        ax.hexbin(t, p, gridsize=40, bins="log", mincnt=1)
        lo, hi = min(t.min(), p.min()), max(t.max(), p.max())
        ax.plot([lo, hi], [lo, hi], "r--", lw=0.8)
        r2 = np.corrcoef(t, p)[0, 1] ** 2
        ax.set(title=f"layer {layer}  R²={r2:.3f}", xlabel="true log KVzip+", ylabel="predicted")
    plots.save(fig, path)


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value (e.g. --set width=32); got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _report(summary: dict) -> str:
    per = summary["per_layer"]
    lines = [f"{'layer':>5} {'R2':>7} {'Spearman':>9} {'MSE':>9}"]
    lines += [f"{i:>5} {r:7.4f} {s:9.4f} {m:9.4f}" for i, (r, s, m) in enumerate(zip(per["r2"], per["spearman"], per["mse"]))]
    lines.append(f"{'mean':>5} {summary['r2']:7.4f} {summary['spearman']:9.4f} {summary['mse']:9.4f}")
    lines.append(f"trained {summary['policy']} on {summary['n_train']} rows in {summary['train_seconds']:.1f} s; "
                 f"{summary['flops_per_token']} FLOPs/token" + (f" ({100 * summary['flops_ratio']:.2f} % of the model's "
                 "linear projections)" if "flops_ratio" in summary else ""))
    return "\n".join(lines)


def _log_to_mlflow(args, summary: dict, out: Path) -> str:
    """Log the training run (params, held-out metrics, per-layer R², the plot, the dataset as input)."""
    per_layer = {tracking.metric_name("r2_layer", i): r for i, r in enumerate(summary["per_layer"]["r2"])}
    keys = ("r2", "spearman", "mse", "train_seconds", "n_train", "n_test", "flops_per_token", "flops_ratio")
    return tracking.log_run(
        args.tracking_uri, args.experiment, "python -m kvzap_lab.train", run_name=f"train-{summary['policy']}",
        params={"policy": args.policy, "data": args.data, "model": args.model} | summary["params"],
        metrics={k: summary.get(k) for k in keys} | per_layer,
        artifacts=[out / "pred_vs_true.png", out / "metrics.json"], inputs=[tracking.dataset_input(args.data)],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.train", description=__doc__.split("\n")[0])
    parser.add_argument("--policy", required=True, help="trainable policy: linear, mlp, shared, rich (needs --model), gbdt (or a registered name)")
    parser.add_argument("--data", required=True, help="oracle dataset directory (kvzap_lab.data)")
    parser.add_argument("--out", required=True, help="output directory (scorer/, pred_vs_true.png, metrics.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="scorer hyperparameter, repeatable")
    parser.add_argument("--model", help="model name or path to check the dataset against and compute the FLOPs ratio")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    parser.add_argument("--tracking-uri", default=None,
                        help="log the run to MLflow (sqlite:///path/mlflow.db or http://host:port): params, R², the plot")
    parser.add_argument("--experiment", default="kvzap-lab-train", help="MLflow experiment (with --tracking-uri)")
    args = parser.parse_args(argv)

    if args.tracking_uri:
        tracking.check_tracking_uri(args.tracking_uri)  # within seconds, before any work
    params = _parse_params(args.set)
    if "verbose" in inspect.signature(resolve_policy(args.policy)).parameters:
        params.setdefault("verbose", True)  # tqdm progress on the command line
    make_scorer(args.policy, params)  # bad parameters fail here, before any data is read
    io.check_writable(Path(args.out))
    model = None
    if args.model:
        from kvzap_lab.model import load_model

        model, _ = load_model(args.model)
    dataset = _load_dataset(args.data, model=model)
    scorer, summary = fit_and_evaluate(args.policy, dataset, params, model=model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer.save(out / "scorer")
    X_test, y_test = check_training_data(dataset.X_test, dataset.y_test)
    plot_predictions(y_test, scorer.predict(X_test, positions=dataset.positions_test, previous=dataset.previous_test),
                     out / "pred_vs_true.png")
    summary |= {"scorer_dir": str(out / "scorer"), "plot": str(out / "pred_vs_true.png"), "data": str(args.data)}
    io.atomic_write_json(out / "metrics.json", summary)
    if args.tracking_uri:
        summary["mlflow_run_id"] = _log_to_mlflow(args, summary, out)
    print(_report(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m kvzap_lab.train"))
