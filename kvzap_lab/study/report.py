"""What a study shows: the summary of its complete trials (Pareto front, best point within 1 point of
full-cache accuracy, comparison with the paper default, all among the trials within the FLOPs limit), the printed
table, the plots, the parent run's artifacts and metrics, and the one-line JSON of ``--json``."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from kvzap_lab import plots
from kvzap_lab.stats import compression_ratio
from kvzap_lab.study.config import ACCURACY_TOLERANCE, TARGET_COMPRESSION
from kvzap_lab.study.metrics import best_at_target, hypervolume, is_feasible, pareto_front

TABLE_COLUMNS = ("trial", "baseline", "accuracy", "accuracy_drop", "compression", "compression_ratio", "r2", "reward",
                 "flops_ratio")
SUMMARY_METRICS = ("full_accuracy", "best_compression_at_target", "baseline_best_compression_at_target", "hypervolume",
                   "baseline_hypervolume", "improvement_compression", "improvement_hypervolume_ratio")


def summarize(study, full_mean: float, max_flops_ratio: float) -> dict:
    """Rows of every complete trial (each marked ``feasible`` or not by ``max_flops_ratio``, see
    :func:`~kvzap_lab.study.metrics.feasible`), the infeasible trials' numbers, and the Pareto front and the target /
    paper-baseline comparisons among the feasible rows."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        result = t.user_attrs.get("result")
        if result is not None:
            rows.append({"trial": t.number, "baseline": t.user_attrs.get("baseline") == "paper", "params": t.params} | result)
    for r in rows:
        r["feasible"] = is_feasible(r, max_flops_ratio)
    ok = [r for r in rows if r["feasible"]]
    points = [(r["accuracy"], r["compression"]) for r in ok]
    base = [r for r in ok if r["baseline"]]
    best_row, base_row = best_at_target(ok, full_mean), best_at_target(base, full_mean)
    summary = {
        "rows": rows,
        "front": [ok[i] for i in pareto_front(points)],
        "max_flops_ratio": max_flops_ratio,
        "infeasible_trials": [r["trial"] for r in rows if not r["feasible"]],
        "full_accuracy": full_mean,
        "best_at_target": best_row,
        "best_compression_at_target": None if best_row is None else best_row["compression"],
        "baseline_best_compression_at_target": None if base_row is None else base_row["compression"],
        "hypervolume": hypervolume(points),
        "baseline_hypervolume": hypervolume([(r["accuracy"], r["compression"]) for r in base]) if base else None,
    }
    best = summary["best_compression_at_target"]
    summary["target_met"] = best is not None and best >= TARGET_COMPRESSION
    if best is not None and summary["baseline_best_compression_at_target"] is not None:
        summary["improvement_compression"] = best - summary["baseline_best_compression_at_target"]
    if base and summary["baseline_hypervolume"]:
        summary["improvement_hypervolume_ratio"] = summary["hypervolume"] / summary["baseline_hypervolume"]
    return summary


def table_rows(summary: dict) -> list[dict]:
    """The Pareto front as flat rows (metrics then parameters), for the printed and stored tables."""
    return [_columns(r) for r in summary["front"]]


def _columns(row: dict) -> dict:
    """A row's table columns (``flops_ratio`` None for a trial recorded before the study measured it), then its
    parameters."""
    return {k: row.get(k) for k in TABLE_COLUMNS} | row["params"]


def format_table(summary: dict) -> str:
    """The printed Pareto table plus the target, baseline and verification lines."""
    rows = table_rows(summary)
    n_infeasible, n_complete = len(summary["infeasible_trials"]), len(summary["rows"])
    lines = [f"Pareto front ({len(rows)} of {n_complete - n_infeasible} feasible trials, {n_complete} complete; "
             f"full-cache accuracy {summary['full_accuracy']:.3f})"]
    head = f"{'trial':>5} {'paper':>5} {'acc':>6} {'drop':>6} {'compr':>6} {'x':>5} {'R2':>6} {'flops%':>6} {'tau':>6} {'win':>4}"
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['trial']:>5} {'yes' if r['baseline'] else '':>5} {r['accuracy']:>6.3f} {r['accuracy_drop']:>6.3f} "
            f"{r['compression']:>6.3f} {r['compression_ratio']:>5.2f} {r['r2']:>6.3f} {_percent(r['flops_ratio']):>6} "
            f"{r.get('tau', float('nan')):>6.2f} {r.get('window', ''):>4}"
        )
    over = ", ".join(str(t) for t in summary["infeasible_trials"])
    lines.append(f"FLOPs limit: scorer <= {100 * summary['max_flops_ratio']:g} % of the model's projection FLOPs per token "
                 f"(--max-flops-ratio {summary['max_flops_ratio']:g}); {n_infeasible} of {n_complete} complete trials "
                 "over it, left out of the front, the best point and the verification" + (f": trials {over}" if over else ""))
    best, base = summary["best_compression_at_target"], summary["baseline_best_compression_at_target"]
    fmt = lambda c: "none" if c is None else f"{c:.3f} ({compression_ratio(c):.2f}x)"  # noqa: E731
    lines.append(f"best compression within {100 * ACCURACY_TOLERANCE:g} point of full-cache accuracy: {fmt(best)}; "
                 f"target >= {compression_ratio(TARGET_COMPRESSION):g}x: {'met' if summary['target_met'] else 'not met'}")
    lines.append(f"paper default (default scorer parameters, e.g. MLP width hidden/8; paper tau grid) at the same accuracy: {fmt(base)}")
    if "improvement_compression" in summary:
        lines.append(f"improvement over the paper default: {100 * summary['improvement_compression']:+.1f} points of compression")
    if "improvement_hypervolume_ratio" in summary:
        lines.append(f"hypervolume (accuracy x compression): {summary['hypervolume']:.4f} vs paper default "
                     f"{summary['baseline_hypervolume']:.4f} ({summary['improvement_hypervolume_ratio']:.2f}x)")
    v = summary.get("verified")
    if v is not None:
        lines.append(f"verified on {v['samples_per_task']} fresh samples per task (seed {v['seed']}): trial {v['trial']} "
                     f"accuracy {v['accuracy']:.3f} vs full cache {v['full_accuracy']:.3f} (drop {v['accuracy_drop']:+.3f}), "
                     f"compression {v['compression']:.3f} ({v['compression_ratio']:.2f}x); target "
                     f"{'met' if v['target_met'] else 'not met'}")
    return "\n".join(lines)


def json_summary(summary: dict) -> dict:
    """The summary without the per-trial rows (``--json``'s line): front as flat rows, the best point, the
    comparisons, the verification and where the study lives."""
    out = {k: v for k, v in summary.items() if k not in ("rows", "front", "best_at_target")}
    best = summary["best_at_target"]
    out["n_complete"] = len(summary["rows"])
    out["front"] = table_rows(summary)
    out["best_at_target"] = None if best is None else _columns(best)
    return out


def trial_plot(per_task: dict, full: dict, accuracy: float, compression: float, path: Path) -> None:
    """Accuracy against compression for one trial: a point per task, the full cache at 0, the mean as a star."""
    fig, ax = plots.figure(figsize=(6, 4))
    for i, (task, result) in enumerate(per_task.items()):
        color = f"C{i % 10}"
        ax.scatter([result["compression"]], [result["accuracy"]], color=color, label=task)
        ax.scatter([0.0], [full[task]], facecolors="none", edgecolors=color)
    ax.scatter([compression], [accuracy], marker="*", s=200, color="black", label="mean")
    plots.accuracy_compression_axes(ax, marker_at=TARGET_COMPRESSION, legend_size=7)
    plots.save(fig, path, dpi=90)


def plot_front(summary: dict, path: Path) -> None:
    """Every complete trial (those over the FLOPs limit apart), the Pareto front, the feasible paper-default
    trials, the full cache and the 4x line."""
    fig, ax = plots.figure()
    rows = [r for r in summary["rows"] if r["feasible"]]
    over = [r for r in summary["rows"] if not r["feasible"]]
    ax.scatter([r["compression"] for r in rows], [r["accuracy"] for r in rows], color="lightgrey", label="trials")
    ax.scatter([r["compression"] for r in over], [r["accuracy"] for r in over], marker="^", color="C1", alpha=0.5,
               label=f"over the FLOPs limit ({100 * summary['max_flops_ratio']:g} %)")
    base = [r for r in rows if r["baseline"]]
    ax.scatter([r["compression"] for r in base], [r["accuracy"] for r in base], marker="x", color="C0", label="paper default")
    front = summary["front"]
    ax.plot([r["compression"] for r in front], [r["accuracy"] for r in front], "o-", color="C3", label="Pareto front")
    ax.axhline(summary["full_accuracy"], color="black", linestyle="--", label="full cache")
    plots.accuracy_compression_axes(ax, marker_at=TARGET_COMPRESSION)
    plots.save(fig, path)


def log_summary(tracker, parent: str, summary: dict) -> None:
    """Parent-run artifacts (Pareto plot, best-trials CSV and markdown) and summary metrics."""
    rows = table_rows(summary)
    with tempfile.TemporaryDirectory() as tmp:
        plot_front(summary, Path(tmp) / "pareto_front.png")
        columns = list(dict.fromkeys(k for r in rows for k in r)) or list(TABLE_COLUMNS)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        (Path(tmp) / "best_trials.csv").write_text(buffer.getvalue())
        markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        markdown += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
        (Path(tmp) / "best_trials.md").write_text("\n".join(markdown) + "\n\n```\n" + format_table(summary) + "\n```\n")
        for name in ("pareto_front.png", "best_trials.csv", "best_trials.md"):
            tracker.client.log_artifact(parent, str(Path(tmp) / name))
    tracker.metrics(parent, {k: summary.get(k) for k in SUMMARY_METRICS} | {"n_complete": len(summary["rows"]), "n_infeasible": len(summary["infeasible_trials"]),
                                                                          "target_met": float(summary["target_met"])})
    verified = summary.get("verified") or {}
    tracker.metrics(parent, {f"verified_{k}": float(v) for k, v in verified.items() if k not in ("samples_per_task", "seed")})


def _percent(ratio: float | None) -> str:
    return "" if ratio is None else f"{100 * ratio:.2f}"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
