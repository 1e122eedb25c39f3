"""Fine-tune a supervised KVzap scorer on the model's own loss, through soft eviction (DMS / TRIM-KV style).

    python -m kvzap_lab.finetune --policy mlp --checkpoint results/train/mlp/scorer --out results/finetune/mlp

The backbone is frozen; only the scorer's weights move. Each step feeds a batch of teacher-forced sequences (task
samples through their answer, and plain-text windows through a continuation) to the model twice: once with the full
cache, once with soft eviction (:mod:`kvzap_lab.soft_eviction`: the engine's window, sinks, chunked prefill and
eviction points; each judged pair's attention weight multiplied by its gate). The loss is

    KL(P_full || P_evicted), averaged over the answer tokens of each task sample and the continuation tokens of each
    text window, then over sequences  +  penalty * (compression - target)^2  +  anchor * drift from the supervised

Choices, and why:

- **straight-through gates** (``--gate straight_through``, the default): the forward evicts exactly as the engine
  will (``s >= tau`` kept), the backward takes the gradient of ``sigmoid((s - tau) / T)`` (with multiplicative gates,
  an evicted pair still gets the gradient of letting it back in). Plain sigmoid gates (``--gate soft``, the
  relaxation of issue 17.2) train a different model than the one evaluated: in a test-bed run (target 0.82,
  T 1 -> 0.05) the training KL stayed low while the held-out accuracy of the hard engine fell from 0.94 to 0.44 by
  step 20, the scorer having parked needed pairs at gates of ~0.3;
- **compression penalty on the straight-through compression**: its value is the engine's compression on the batch,
  its gradient the sigmoid gates'; two-sided, so it holds the compression at the target instead of rewarding more;
- **tau fixed** (by default where the supervised scorer evicts the target fraction of the training pairs): the last
  map's bias already moves every (layer, head)'s scores, so a learned tau adds no freedom, and a fixed one keeps the
  saved scorer's scale (``tau`` in ``metrics.json`` is the threshold it was trained for);
- **an anchor to the supervised scores** (``--anchor``, 0.1): ``anchor * mean (s - s_supervised)^2`` over the judged
  pairs keeps the ranking of the pairs the KL says nothing about where imitation put it. Without it, fine-tuned on
  the needle tasks, the scorer lost 2.5-4 points at every compression from 4x to 7.7x on the test bed (answers with
  repeated digits, which the supervised scorer gets right); with it, within 1 point of the full cache up to 6.5-8.9x
  (``docs/results.md``);
- **plain text**: ``--text-files`` windows if given, else the test bed's filler prose, or for a real model windows
  of the default oracle corpus's train documents (:mod:`kvzap_lab.corpus`, the text ``collect`` reads);
- **training tasks**: the needle tasks and key-value retrieval by default; fine-tuned on the needle tasks alone, the
  scorer lost 8-16 points on key-value retrieval, which it never saw;
- ``T`` (in score units; the supervised scores spread over ~2) sets the width of the surrogate gradient: pairs
  within a few ``T`` of tau get it; it anneals geometrically from ``--temperature`` to ``--final-temperature``;
- ``--noise`` adds logistic noise to ``s - tau`` (the forward then keeps each pair with probability
  ``sigmoid(s - tau)``, DMS's Gumbel-sigmoid); off by default: the penalty then holds the *sampled* compression at
  the target while the deterministic rule the engine runs evicts another amount (held-out 0.74 against 0.79 sampled
  at step 15 of a test-bed run).

Seeded (batches, noise and held-out samples are pure functions of the seed and the step), resumable after a kill
(the state, optimizer included, is written atomically every ``--checkpoint-every`` steps; the same command
continues), logged to MLflow (KL, compression, kept fraction, temperature, held-out accuracy and compression of the
hard engine every ``--eval-every`` steps; the plot and the summary as artifacts). Writes ``OUT/scorer/`` (the scorer
class's own checkpoint: evaluate, the envs, the study and the kvpress export load it unchanged), ``OUT/metrics.json``,
``OUT/training.png`` and ``OUT/state/``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvzap_lab import cli, io, plots, tasks, tracking
from kvzap_lab.faults import kill_point
from kvzap_lab.model import capture_attention_inputs, describe, fingerprint, load_model
from kvzap_lab.padding import pad_rows
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policy import Policy, Threshold, resolve_policy
from kvzap_lab.soft_eviction import NoGradientError, Schedule, ScorerNet, soft_forward, visibility

TRAIN_SEED = 1_000_000  # task samples of training step s, item k: seed TRAIN_SEED + SEED_STRIDE * seed + ...
VALIDATION_SEED = 900_000  # held-out samples during training (the benchmark and README use 1, 2, 100, 10000+)
SEED_STRIDE = 100_000
CALIBRATION_BATCHES = 4
CORPUS_WINDOWS = 64  # plain-text windows of a real model (drawn, seeded, from the default corpus's train split)
STATE, METRICS, PLOT, SCORER = "state", "metrics.json", "training.png", "scorer"


@dataclass
class Args:
    """Everything ``finetune`` takes (the CLI's flags, one to one)."""

    policy: str
    checkpoint: Path
    out: Path
    model: str = "testbed"
    target_compression: float = 0.83
    tau: float | None = None  # None: where the supervised scorer evicts target_compression of the training pairs
    temperature: float = 1.0
    final_temperature: float = 0.5
    gate: str = "straight_through"
    noise: bool = False
    penalty: float = 1000.0
    anchor: float = 0.1
    steps: int = 100
    batch_size: int = 4
    lr: float = 5e-3
    tasks: tuple[str, ...] = ("single_needle", "multi_key_needle", "kv_retrieval")
    context_tokens: int = 512
    text_fraction: float = 0.25
    text_tokens: int = 32
    text_files: tuple[str, ...] = ()
    window: int = 16
    sinks: int = 4
    chunk_size: int = 128
    eval_every: int = 25
    eval_samples: int = 32
    checkpoint_every: int = 10
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str | None = None
    device: str | None = None
    json: bool = False

    def identity(self) -> dict:
        """The settings that decide the trained weights (a resumed run must have the same)."""
        skip = {"out", "tracking_uri", "experiment", "json", "device", "eval_every", "eval_samples", "checkpoint_every"}
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Item:
    """One teacher-forced training sequence: ``ids`` fed (prompt, then one token per forward); the KL is taken on the
    predictions of the ``targets`` tokens after the prompt."""

    ids: list[int]
    prompt: int
    targets: int


def task_item(tokenizer, task: str, context_tokens: int, seed: int) -> Item:
    """A task sample through its answer: the prompt is prefilled, the answer teacher-forced (KL on every answer token)."""
    sample = tasks.make_samples(task, tokenizer, 1, context_tokens, seed=seed)[0]
    return Item(sample.input_ids + sample.answer_ids[:-1], len(sample.input_ids), len(sample.answer_ids))


def synthetic_text(tokenizer, context_tokens: int, rng: random.Random) -> list[int]:
    """A plain-text window for the test bed: the task suite's filler prose (no question), after the BOS token."""
    encode = tasks.PieceEncoder(tokenizer)
    ids, _ = tasks.build_context(encode, [], context_tokens - 1, rng)
    return [encode.special(tasks.BOS)] + ids


def text_item(window: list[int], text_tokens: int) -> Item:
    """A text window whose last ``text_tokens`` tokens are the continuation (KL on each)."""
    return Item(window[:-1], len(window) - text_tokens, text_tokens)


class Batches:
    """Training batches as a pure function of ``(args.seed, step)`` (so a resumed run sees the same data)."""

    def __init__(self, args: Args, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.windows: list[list[int]] = []  # empty: the test bed's filler prose (synthetic_text)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if args.text_files:
            from kvzap_lab.collect import text_contexts

            found = text_contexts(tokenizer, args.text_files, 10_000, args.context_tokens, args.seed, bos)
            self.windows = [c.prefix + c.ids for c in found if len(c.ids) > args.text_tokens + 16]
            if not self.windows:
                raise ValueError(f"--text-files hold no window longer than {args.text_tokens + 16} tokens")
        elif not tasks.is_testbed_tokenizer(tokenizer) and args.text_fraction > 0:
            # a real model: windows of the default corpus's train documents (collect's default oracle data)
            from kvzap_lab.collect import corpus_contexts
            from kvzap_lab.corpus import load_corpus

            length = (args.context_tokens - len(bos),) * 2
            found = corpus_contexts(tokenizer, load_corpus(), CORPUS_WINDOWS, length, args.seed, bos, test_fraction=0.0)
            self.windows = [c.prefix + c.ids for c in found]

    def item(self, step: int, k: int) -> Item:
        args = self.args
        rng = random.Random(f"finetune:{args.seed}:{step}:{k}")
        if rng.random() < args.text_fraction:
            window = rng.choice(self.windows) if self.windows else synthetic_text(self.tokenizer, args.context_tokens, rng)
            return text_item(window, args.text_tokens)
        seed = TRAIN_SEED + SEED_STRIDE * args.seed + step * args.batch_size + k
        return task_item(self.tokenizer, rng.choice(args.tasks), args.context_tokens, seed)

    def __call__(self, step: int) -> list[Item]:
        return [self.item(step, k) for k in range(self.args.batch_size)]


def targets(items: list[Item], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [b, width] bool, weights [kept])``: the columns whose logits predict each item's targets, and weights
    ``1 / (targets * items)`` so that a weighted sum is the mean over items of the mean over their targets."""
    keep = torch.zeros(len(items), width, dtype=torch.bool)
    weights = []
    for row, it in enumerate(items):
        keep[row, it.prompt - 1 : it.prompt - 1 + it.targets] = True
        weights += [1.0 / (it.targets * len(items))] * it.targets
    return keep, torch.tensor(weights)


# ----------------------------------------------------------------------------------------------------- training
def temperature_at(args: Args, step: int) -> float:
    """Geometric annealing from ``temperature`` (step 0) to ``final_temperature`` (last step)."""
    frac = step / max(args.steps - 1, 1)
    return args.temperature * (args.final_temperature / args.temperature) ** frac


def lr_at(args: Args, step: int) -> float:
    """Cosine decay from ``lr`` to 0 (no warmup: the scorer starts trained)."""
    return args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))


def judged_scores(model, net: ScorerNet, items: list[Item], schedule: Schedule, window: int, sinks: int) -> tuple[torch.Tensor, int]:
    """Scores (full-cache forward) of the pairs the rule judges when ``items`` are fed by ``schedule``, and the number
    of real pairs (tokens x layers x KV heads): what a threshold's compression is counted over."""
    ids = pad_rows([it.ids for it in items], model.config.pad_token_id or 0, device=_device(model))[0]  # right-padded
    vis = visibility([(it.prompt, len(it.ids)) for it in items], schedule, window, sinks)
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        scores = [net(hidden[layer], layer).cpu() for layer in range(net.n_layers)]  # [b, kv_heads, n] each
    judged = torch.cat([s[vis.judged[:, None].expand_as(s)] for s in scores])
    return judged, int(vis.valid.sum()) * scores[0].shape[1] * len(scores)


def tau_for(scores: torch.Tensor, real_pairs: int, compression: float, window: int, sinks: int) -> float:
    """The threshold under which ``compression`` of ``real_pairs`` fall, given the judged pairs' ``scores``.

    Raises:
        ValueError: when the window and sinks keep too much for that compression.
    """
    quantile = compression * real_pairs / max(len(scores), 1)
    if quantile >= 1:
        raise ValueError(
            f"compression {compression} is out of reach: with window {window} and sinks {sinks} at most "
            f"{len(scores) / real_pairs:.3f} of these sequences' pairs can be evicted"
        )
    return float(torch.quantile(scores.double(), quantile))


def calibrate_tau(model, net: ScorerNet, batches: Batches, args: Args, schedule: Schedule) -> float:
    """The tau at which the starting scorer evicts ``target_compression`` of all pairs of the first training batches."""
    found = [judged_scores(model, net, batches(step), schedule, args.window, args.sinks) for step in range(CALIBRATION_BATCHES)]
    scores, real = torch.cat([s for s, _ in found]), sum(n for _, n in found)
    return tau_for(scores, real, args.target_compression, args.window, args.sinks)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def train_step(
    model, net: ScorerNet, start: ScorerNet, optimizer, items: list[Item], args: Args, schedule: Schedule, tau: float, step: int
) -> dict:
    """One optimizer step (``start``: the frozen supervised scorer, for the anchor); returns the step's metrics."""
    device = _device(model)
    ids = pad_rows([it.ids for it in items], model.config.pad_token_id or 0, device=device)[0]  # right-padded
    vis = visibility([(it.prompt, len(it.ids)) for it in items], schedule, args.window, args.sinks)
    keep, weights = (t.to(device) for t in targets(items, ids.shape[1]))
    with torch.no_grad():
        full = F.log_softmax(model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float(), -1)
    temperature = temperature_at(args, step)
    noise = torch.Generator().manual_seed(args.seed * 1_000_003 + step) if args.noise else None
    out = soft_forward(model, net, ids, vis, tau=tau, temperature=temperature, gate=args.gate, noise=noise, logits_to_keep=keep)
    soft = F.log_softmax(out.logits.float(), -1)
    kl = ((full.exp() * (full - soft)).sum(-1) * weights).sum()
    compression = out.expected_compression()
    penalty = args.penalty * (compression - args.target_compression) ** 2
    anchor = torch.zeros((), device=device)
    if args.anchor:
        judged = out.visibility.judged[:, None]
        with torch.no_grad():
            before = [start(h, layer) for layer, h in enumerate(out.hidden)]
        drift = sum(((s - s0).square() * judged).sum() for s, s0 in zip(out.scores, before))
        anchor = args.anchor * drift / (judged.sum() * len(before) * before[0].shape[1]).clamp_min(1)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(args, step)
    optimizer.zero_grad()
    (kl + penalty + anchor).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    return {"step": step + 1, "kl": kl.item(), "penalty": penalty.item(), "anchor": anchor.item(),
            "expected_compression": compression.item(),
            "kept_fraction": out.kept_fraction().item(), "temperature": temperature, "lr": lr_at(args, step)}


def held_out(model, tokenizer, scorer: KVzapLinear, tau: float, args: Args, samples) -> dict:
    """Accuracy and compression of the hard engine with ``scorer`` at ``tau`` on the held-out samples."""
    from kvzap_lab.evaluate import run_cell

    policy = Policy(scorer.policy_name, scorer, Threshold(tau=tau, window=args.window, sinks=args.sinks))
    result = run_cell(model, policy, samples, None, 16, args.chunk_size, tokenizer=tokenizer)
    return {"heldout_accuracy": result["accuracy"], "heldout_compression": result["compression"]}


# ----------------------------------------------------------------------------------------------------- state
def save_state(directory: Path, net: ScorerNet, optimizer, meta: dict) -> None:
    """Write the weights, the optimizer's moments and ``meta`` (step, history, ...) as one atomic directory."""
    tensors = {f"net.{i}": p.detach().cpu().contiguous() for i, p in enumerate(net.parameters())}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        tensors |= {f"adam.{i}.{k}": v.detach().cpu().reshape(-1).contiguous() if k == "step" else v.detach().cpu().contiguous()
                    for k, v in state.items()}
    with io.atomic_directory(directory) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta | {"param_groups": opt["param_groups"]}))


def load_state(directory: Path, net: ScorerNet, optimizer) -> dict | None:
    """Restore what :func:`save_state` wrote (None if nothing is there); returns its ``meta``."""
    if not (directory / "state.json").is_file():
        return None
    meta = json.loads((directory / "state.json").read_text())
    tensors = load_file(directory / "state.safetensors")
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(tensors[f"net.{i}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


# ----------------------------------------------------------------------------------------------------- outputs
def plot_history(history: list[dict], target: float, path: Path) -> None:
    """KL, compression (expected and held-out) and held-out accuracy over steps, as one PNG (atomic)."""
    train = [r for r in history if "kl" in r]
    evals = [r for r in history if "heldout_accuracy" in r]
    fig, grid = plots.figure(1, 3, figsize=(13, 3.6))
    axes = grid[0]
    axes[0].plot([r["step"] for r in train], [r["kl"] for r in train])
    axes[0].set(title="KL(full || soft) per target token", xlabel="step", yscale="log")
    axes[1].plot([r["step"] for r in train], [r["expected_compression"] for r in train], label="expected (soft)")
    axes[1].plot([r["step"] for r in evals], [r["heldout_compression"] for r in evals], "o-", label="held-out (hard engine)")
    axes[1].axhline(target, color="black", linestyle="--", label="target")
    axes[1].set(title="compression", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[2].plot([r["step"] for r in evals], [r["heldout_accuracy"] for r in evals], "o-")
    axes[2].set(title="held-out accuracy (hard engine)", xlabel="step", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
    plots.save(fig, path)


# ----------------------------------------------------------------------------------------------------- entry points
def load_scorer(args: Args, model) -> KVzapLinear:
    """The supervised scorer to start from; one-line errors for a scorer without gradients, a checkpoint of another
    policy or another model."""
    factory = resolve_policy(args.policy)
    if not (isinstance(factory, type) and issubclass(factory, KVzapLinear)):
        raise NoGradientError(
            f"policy {args.policy!r} has no gradient with respect to its parameters; finetune takes the KVzap linear "
            "or MLP scorer (--policy linear or mlp)"
        )
    checkpoint = Path(args.checkpoint)
    if (checkpoint / SCORER).is_dir():  # train's --out directory
        checkpoint = checkpoint / SCORER
    try:
        return factory.load(checkpoint, model=model)
    except TypeError as err:  # the checkpoint holds another scorer class
        raise ValueError(f"--checkpoint {checkpoint}: {err}; give --policy the checkpoint's own policy") from None


def finetune(args: Args, model=None, tokenizer=None, progress: bool = True) -> tuple[KVzapLinear, dict]:
    """Fine-tune (or resume, or return the finished result of) the run described by ``args``.

    Returns:
        The fine-tuned scorer and the summary (also in ``OUT/metrics.json``).
    """
    _check(args)
    if model is None:
        model, tokenizer = load_model(args.model, device=args.device)
    spec = describe(model)
    supervised = load_scorer(args, model)
    identity = args.identity() | {"model_fingerprint": fingerprint(model)}
    out = Path(args.out)
    previous = json.loads((out / METRICS).read_text()) if (out / METRICS).is_file() else None
    if previous is not None and previous.get("settings") == identity:
        return type(supervised).load(out / SCORER, model=model), previous  # finished already
    schedule = Schedule(chunk_size=args.chunk_size)
    batches = Batches(args, tokenizer)
    batches(0)  # bad tasks or a tokenizer without the task suite's tokens fail here, before anything is written
    if args.tracking_uri is None:
        Path("results").mkdir(exist_ok=True)  # the default store's folder
    tracking_uri = args.tracking_uri or f"sqlite:///{Path('results').resolve() / 'mlflow.db'}"
    tracking.check_tracking_uri(tracking_uri)  # within seconds, before the fine-tuning

    net = ScorerNet(supervised).to(_device(model))
    start = ScorerNet(supervised).to(_device(model)).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    meta = load_state(out / STATE, net, optimizer)
    if meta is not None and meta["settings"] != identity:
        changed = sorted(k for k in identity if meta["settings"].get(k) != identity[k])
        raise ValueError(f"{out} holds a fine-tuning run with other settings ({', '.join(changed)}); use another --out "
                         "or the same arguments to resume it")
    tau = meta["tau"] if meta else args.tau if args.tau is not None else calibrate_tau(model, net, batches, args, schedule)
    io.check_writable(out)  # every check passed: from here on the run writes
    io.remove_temporaries(out)
    eval_samples = [s for i, task in enumerate(args.tasks) for s in tasks.make_samples(
        task, tokenizer, math.ceil(args.eval_samples / len(args.tasks)), args.context_tokens, VALIDATION_SEED + SEED_STRIDE * args.seed + i)]
    if meta is None:
        meta = {"settings": identity, "step": 0, "tau": tau, "history": [], "logged": 0, "mlflow_run_id": None}
        meta["history"].append({"step": 0} | held_out(model, tokenizer, supervised, tau, args, eval_samples))
    params = identity | {"tau_used": tau, "n_layers": spec.n_layers}
    tracker, run_id = tracking.open_run(
        tracking_uri, args.experiment or f"finetune-{args.policy}-{args.model.replace('/', '_')}",
        "python -m kvzap_lab.finetune", run_name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}", params=params,
        run_id=meta["mlflow_run_id"])
    meta["mlflow_run_id"] = run_id

    def checkpoint():
        for row in meta["history"][meta["logged"] :]:
            tracker.metrics(run_id, {k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        meta["logged"] = len(meta["history"])
        save_state(out / STATE, net, optimizer, meta)
        kill_point("finetune.checkpoint")  # kill -9 tests: KVZAP_LAB_KILL_AT=finetune.checkpoint:N

    bar = tqdm(range(meta["step"], args.steps), desc="finetune", initial=meta["step"], total=args.steps, disable=not progress)
    for step in bar:
        row = train_step(model, net, start, optimizer, batches(step), args, schedule, tau, step=step)
        meta["history"].append(row)
        meta["step"] = step + 1
        if meta["step"] % args.eval_every == 0 or meta["step"] == args.steps:
            row |= held_out(model, tokenizer, net.to_scorer(), tau, args, eval_samples)
        bar.set_postfix(kl=f"{row['kl']:.3f}", compression=f"{row['expected_compression']:.3f}")
        if meta["step"] % args.checkpoint_every == 0 or meta["step"] == args.steps:
            checkpoint()
    checkpoint()  # logs what is left (with zero steps, the starting point)
    scorer = net.to_scorer()
    scorer.save(out / SCORER)
    first, last = meta["history"][0], meta["history"][-1]
    summary = {
        "settings": identity, "tau": tau, "scorer_dir": str(out / SCORER), "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri, "steps": meta["step"],
        "start": {k: first[k] for k in ("heldout_accuracy", "heldout_compression")},
        "end": {k: last.get(k) for k in ("heldout_accuracy", "heldout_compression", "kl", "expected_compression")},
        "history": meta["history"],
    }
    plot_history(meta["history"], args.target_compression, out / PLOT)
    io.atomic_write_json(out / METRICS, summary)
    for name in (METRICS, PLOT):
        tracker.client.log_artifact(run_id, str(out / name))
    tracker.end(run_id, "FINISHED")
    return scorer, summary


def _check(args: Args) -> None:
    """One-line errors for values out of range (before anything is loaded or written)."""
    if args.tau is not None and not math.isfinite(args.tau):
        raise ValueError(f"--tau must be a finite log-score threshold; got {args.tau}")
    for name in ("temperature", "final_temperature"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0 (score units); got {value}")
    if args.final_temperature > args.temperature:
        raise ValueError(f"--final-temperature ({args.final_temperature}) must be <= --temperature ({args.temperature}): T anneals down")
    if not 0 < args.target_compression < 1:
        raise ValueError(f"--target-compression is the fraction of KV pairs evicted, in (0, 1); got {args.target_compression}")
    if not 0 <= args.text_fraction <= 1:
        raise ValueError(f"--text-fraction must be in [0, 1]; got {args.text_fraction}")
    if not all(math.isfinite(v) and v >= 0 for v in (args.penalty, args.anchor)) or not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--penalty and --anchor must be >= 0 and --lr > 0; got {args.penalty}, {args.anchor}, {args.lr}")
    unknown = sorted(set(args.tasks) - set(tasks.TASKS))
    if unknown or not args.tasks:
        raise ValueError(f"unknown tasks {unknown}; known tasks: {', '.join(tasks.TASKS)}")
    if args.text_tokens >= args.context_tokens:
        raise ValueError(f"--text-tokens ({args.text_tokens}) must be below --context-tokens ({args.context_tokens})")


def parse_args(argv: list[str] | None = None) -> Args:
    defaults = Args(policy="", checkpoint=Path(), out=Path())
    p = argparse.ArgumentParser(prog="python -m kvzap_lab.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the scorer's policy: mlp or linear (kvzap_mlp, kvzap_linear)")
    p.add_argument("--checkpoint", type=Path, required=True, help="the supervised scorer (train's --out or its scorer/)")
    p.add_argument("--out", type=Path, required=True, help="output directory (scorer/, metrics.json, training.png, state/)")
    p.add_argument("--model", default=defaults.model, help="'testbed', a checkpoint directory or a hub name")
    p.add_argument("--target-compression", type=cli.fraction(0, 1, high_open=True), default=defaults.target_compression,
                   help="fraction of all KV pairs the penalty holds evicted, in (0, 1)")
    p.add_argument("--tau", type=cli.finite_float, default=None, help="threshold (default: calibrated to the target)")
    p.add_argument("--temperature", type=cli.finite_float, default=defaults.temperature, help="initial gate temperature (> 0)")
    p.add_argument("--final-temperature", type=cli.finite_float, default=defaults.final_temperature, help="last step's temperature")
    p.add_argument("--gate", choices=("straight_through", "soft"), default=defaults.gate,
                   help="straight_through: the hard rule forward, sigmoid gradient; soft: sigmoid gates")
    p.add_argument("--noise", action="store_true", help="logistic noise on s - tau (sampled keep decisions, as DMS)")
    p.add_argument("--penalty", type=cli.finite_float, default=defaults.penalty, help="weight of (compression - target)^2")
    p.add_argument("--anchor", type=cli.finite_float, default=defaults.anchor,
                   help="weight of the mean squared drift of the judged pairs' scores from the supervised scorer's")
    p.add_argument("--steps", type=cli.non_negative_int, default=defaults.steps)
    p.add_argument("--batch-size", type=cli.positive_int, default=defaults.batch_size)
    p.add_argument("--lr", type=cli.finite_float, default=defaults.lr)
    p.add_argument("--tasks", nargs="+", default=list(defaults.tasks), help=f"task samples to train on ({', '.join(tasks.TASKS)})")
    p.add_argument("--context-tokens", type=cli.positive_int, default=defaults.context_tokens)
    p.add_argument("--text-fraction", type=cli.fraction(), default=defaults.text_fraction, help="share of plain-text windows")
    p.add_argument("--text-tokens", type=cli.positive_int, default=defaults.text_tokens, help="continuation tokens of a window")
    p.add_argument("--text-files", nargs="*", default=[], help="plain-text files (default: the task suite's filler prose)")
    p.add_argument("--window", type=cli.non_negative_int, default=defaults.window)
    p.add_argument("--sinks", type=cli.non_negative_int, default=defaults.sinks)
    p.add_argument("--chunk-size", type=cli.positive_int, default=defaults.chunk_size, help="prefill chunk (tokens)")
    p.add_argument("--eval-every", type=cli.positive_int, default=defaults.eval_every, help="held-out evaluation interval")
    p.add_argument("--eval-samples", type=cli.positive_int, default=defaults.eval_samples)
    p.add_argument("--checkpoint-every", type=cli.positive_int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=cli.non_negative_int, default=defaults.seed)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: finetune-POLICY-MODEL)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="end with the summary as one JSON line")
    ns = p.parse_args(argv)
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, summary = finetune(args, progress=not args.json)
    start, end = summary["start"], summary["end"]
    print(f"fine-tuned {args.policy} for {summary['steps']} steps at tau {summary['tau']:.3f}: held-out accuracy "
          f"{start['heldout_accuracy']:.3f} -> {end['heldout_accuracy']:.3f}, compression {start['heldout_compression']:.3f} -> "
          f"{end['heldout_compression']:.3f}; scorer in {summary['scorer_dir']}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
