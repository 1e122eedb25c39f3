"""Run a lab policy in kvpress: a KVzap linear/MLP scorer with a :class:`~kvzap_lab.policy.Threshold` rule is
kvpress's ``DMSPress(KVzapPress(...), threshold=tau, sliding_window_size=window, decoding=True)``.

kvpress 0.5.5 pins ``transformers<5.3`` and the lab needs ``>=5.24`` (their cache APIs differ), so the two meet
through a directory, each side in its own environment::

    python -m kvzap_lab.kvpress --checkpoint RUN/scorer --tau -6 --window 128 --sinks 4 --out PRESS   # lab venv
    press = kvzap_lab.kvpress.load_press("PRESS")                     # kvpress venv (kvpress, gymnasium, and
    with press(model):                                                # kvzap-lab installed with --no-deps)
        model.model(input_ids=ids, past_key_values=DynamicCache())

``PRESS`` is a kvpress ``KVzapModel`` checkpoint (``KVzapModel.from_pretrained`` reads it; the scorer comes from
the lab, not the hub) plus ``press.json`` (threshold, window, sinks, and the sha256 of the weights). How each part
of the rule maps, exactly:

- per-layer and per-head taus: kvpress has one threshold ``T`` (the mean tau); ``tau[l][h] - T`` is subtracted
  from the last bias of layer ``l``, head ``h``, so ``score < tau[l][h]`` iff ``score' < T`` (a global tau is
  passed as it is and the scorer is unchanged);
- window: ``sliding_window_size = max(window, 1)`` (the lab never offers the newest token either);
- sinks: DMSPress has none, so the scorer press gives the first ``sinks`` positions an infinite score;
- decoding: DMSPress checks every step, the lab's engine every ``evict_every`` steps; with fixed scores and a
  threshold the pairs evicted are the same.

Refused with a one-line ValueError: other scorers (boosted trees, training-free or accumulated-attention scorers,
deeper MLPs, which kvpress's KVzapModel cannot hold), other rules (TopK budgets), NaN or infinite per-layer or
per-head taus.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

import torch

from kvzap_lab import checkpoint, cli, io

PRESS_NAME = "press.json"


def fold_thresholds(weights: list[tuple[torch.Tensor, torch.Tensor]], tau) -> tuple[list, float]:
    """``(weights', T)``: the last bias shifted by ``tau[l][h] - T`` so that one threshold ``T`` decides as ``tau``.

    ``weights`` are stacked maps ``[(W [layers, out, in], b [layers, out]), ...]``; ``tau`` a float, one per
    layer, or ``[layers][kv_heads]``. A float is returned unchanged with the weights as they are.
    """
    tau64 = torch.as_tensor(tau, dtype=torch.float64)
    if tau64.dim() == 0:
        return weights, float(tau64)
    n_layers, n_heads = weights[-1][1].shape
    if not torch.isfinite(tau64).all():
        raise ValueError(f"per-layer or per-head taus must be finite to fold into kvpress's one threshold; got {tau!r}")
    if tau64.dim() == 1:
        tau64 = tau64[:, None].expand(-1, n_heads)
    if tau64.shape != (n_layers, n_heads):
        raise ValueError(f"taus of shape {list(tau64.shape)} do not fit a scorer of {n_layers} layers and {n_heads} KV heads")
    T = float(tau64.mean())
    W, b = weights[-1]
    return weights[:-1] + [(W, (b.double() - (tau64 - T)).float())], T


def _press_settings(policy) -> tuple[list, dict]:
    """Folded weights and press settings of a lab policy; ValueError for what kvpress cannot express."""
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.policy import Threshold

    scorer, rule = policy.scorer, policy.rule
    if not isinstance(scorer, KVzapLinear):
        raise ValueError(f"policy {policy.name!r}: kvpress runs KVzap linear and MLP scorers only; got a {type(scorer).__name__}")
    scorer._check_fitted()
    if len(scorer.weights_) > 2:
        raise ValueError(f"policy {policy.name!r}: a KVzap MLP of depth {len(scorer.weights_) - 1} has no kvpress model (KVzapModel holds depth 0 or 1)")
    if type(rule) is not Threshold:
        raise ValueError(f"policy {policy.name!r}: kvpress's DMSPress applies one threshold; a {type(rule).__name__} rule cannot be expressed")
    weights, threshold = fold_thresholds(scorer.weights_, rule.tau)
    settings = {"threshold": threshold, "sliding_window_size": max(rule.window, 1), "sinks": rule.sinks, "decoding": True,
                "tau": rule.tau, "window": rule.window, "policy": policy.name, "trained_for": scorer.trained_for_}
    return weights, settings


def export_press(policy, path: str | Path) -> Path:
    """Write ``policy`` as a kvpress press directory (a KVzapModel checkpoint + ``press.json``); returns ``path``."""
    weights, settings = _press_settings(policy)
    n_layers, d_out, d_in = weights[0][0].shape[0], weights[-1][0].shape[1], weights[0][0].shape[2]
    width = None if len(weights) == 1 else weights[0][0].shape[1]
    config = checkpoint.kvzap_config(d_in, d_out, width, n_layers, len(weights) - 1)
    path = Path(path)
    with io.atomic_directory(path) as tmp:
        settings["weights_sha256"] = checkpoint.fill_directory(tmp, config, checkpoint.kvzap_state(weights))
        (tmp / PRESS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    return path


@functools.cache
def _lab_kvzap_press():
    """kvpress's KVzapPress with the scorer handed over (no hub download) and ``sinks`` first positions kept."""
    from dataclasses import dataclass

    from kvpress import KVzapPress

    @dataclass
    class LabKVzapPress(KVzapPress):
        """KVzapPress scoring with a given ``KVzapModel``; positions below ``sinks`` get an infinite score."""

        kvzap_model: torch.nn.Module | None = None
        sinks: int = 0

        def post_init_from_model(self, model):
            config, ours = model.config, self.kvzap_model.config
            want = {"n_modules": config.num_hidden_layers, "input_dim": config.hidden_size,
                    "output_dim": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
            wrong = [f"{k} {getattr(ours, k)} (model: {v})" for k, v in want.items() if getattr(ours, k) != v]
            if wrong:
                raise ValueError(f"the KVzap scorer does not fit {type(model).__name__}: {', '.join(wrong)}")

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            if self.sinks:
                positions = kwargs["cache_position"].to(scores.device)
                scores = scores.masked_fill((positions < self.sinks)[None, None, :], float("inf"))
            return scores

    return LabKVzapPress


def _dms_press(kvzap_model, settings: dict):
    from kvpress import DMSPress

    scorer_press = _lab_kvzap_press()(model_type="linear" if kvzap_model.config.hidden_dim is None else "mlp",
                                      kvzap_model=kvzap_model.eval(), sinks=settings["sinks"])
    return DMSPress(scorer_press, threshold=settings["threshold"], sliding_window_size=settings["sliding_window_size"],
                    decoding=settings["decoding"])


def load_press(path: str | Path):
    """The ``DMSPress`` of a directory written by :func:`export_press` (needs kvpress; loads the scorer with
    kvpress's own ``KVzapModel.from_pretrained`` and refuses any missing or unexpected weight)."""
    from kvpress.presses.kvzap_press import KVzapModel

    path = Path(path)
    try:
        settings = json.loads((path / PRESS_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a press directory: missing {PRESS_NAME} (write one with python -m kvzap_lab.kvpress)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / PRESS_NAME} is not valid JSON ({err})") from None
    if hashlib.sha256((path / checkpoint.WEIGHTS_NAME).read_bytes()).hexdigest() != settings.get("weights_sha256"):
        raise ValueError(f"{path / checkpoint.WEIGHTS_NAME} does not match the sha256 recorded in {path / PRESS_NAME}")
    kvzap_model, info = KVzapModel.from_pretrained(path, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise ValueError(f"kvpress did not load {path / checkpoint.WEIGHTS_NAME} whole: {bad or info['error_msgs']}")
    return _dms_press(kvzap_model, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.kvpress", description="Export a trained KVzap scorer and a "
                                     "threshold rule as a kvpress press directory (read it with kvzap_lab.kvpress.load_press).")
    parser.add_argument("--checkpoint", required=True, help="a KVzap linear or MLP scorer directory (train's OUT/scorer)")
    parser.add_argument("--tau", default="-6.0", help="a float, a JSON list per layer, or a JSON [layers][kv_heads] list [-6.0]")
    parser.add_argument("--window", type=cli.non_negative_int, default=None, help="sliding window (default: the lab's)")
    parser.add_argument("--sinks", type=cli.non_negative_int, default=None, help="first tokens never evicted (default: the lab's)")
    parser.add_argument("--out", required=True, help="the press directory to write")
    args = parser.parse_args(argv)

    from kvzap_lab.checkpoint import load_scorer
    from kvzap_lab.policy import Policy, Threshold

    try:
        tau = json.loads(args.tau)
    except json.JSONDecodeError:
        raise ValueError(f"--tau takes a number or a JSON list (e.g. -6 or '[-6, -5.5]'); got {args.tau!r}") from None
    io.check_writable(Path(args.out).parent)
    scorer = load_scorer(args.checkpoint)
    rule = Threshold(tau=tau, **{k: v for k, v in (("window", args.window), ("sinks", args.sinks)) if v is not None})
    out = export_press(Policy(name=scorer.policy_name, scorer=scorer, rule=rule), args.out)
    print(f"wrote {out}: KVzapModel checkpoint + {PRESS_NAME} (threshold, window, sinks); kvpress side: "
          f"kvzap_lab.kvpress.load_press({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m kvzap_lab.kvpress"))
