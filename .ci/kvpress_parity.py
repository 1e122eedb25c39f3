"""kvpress parity on the test bed, in two halves that run in two environments (see .ci/kvpress.sh).

    .venv/bin/python .ci/kvpress_parity.py lab OUT                # the lab's venv (transformers >= 5.24)
    .venv-kvpress/bin/python .ci/kvpress_parity.py kvpress OUT    # kvpress 0.5.5's venv (transformers 5.2)

Lab half: collect a small oracle dataset on the test bed, fit a KVzap linear and a KVzap MLP scorer, and for four
policies (each scorer x a global tau / per-head taus calibrated to 50 % removed; window 16, sinks 4) write the
press directory (:func:`kvzap_lab.kvpress.export_press`) and, on a fixed prompt (the kvpress golden's ids): the
hidden states entering each attention layer, the lab's predictions on them shifted by the folded taus, and the
pairs the lab's engine keeps after one prefill. kvpress half: the lab's own scorer checkpoints load in kvpress
with no missing or unexpected key, predict as the lab does, and re-save byte for byte; for each policy,
``load_press(DIR)``; the exported
KVzapModel's outputs on the same hidden states equal the lab's to 1e-5, and one prefill of the same ids under the
press masks exactly the pairs the lab's engine evicted (same count per layer and head, same positions).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
PROMPT = REPO / "tests" / "golden" / "kvpress" / "kvzip_testbed" / "golden.safetensors"
WINDOW, SINKS, ATOL = 16, 4, 1e-5


def lab_half(out: Path) -> None:
    import numpy as np

    from kvzap_lab.collect import main as collect
    from kvzap_lab.data import load_dataset
    from kvzap_lab.engine import evicting
    from kvzap_lab.kvpress import export_press, fold_thresholds
    from kvzap_lab.model import capture_attention_inputs, load_model
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP
    from kvzap_lab.policy import Policy, calibrate

    with tempfile.TemporaryDirectory() as tmp:
        collect(["--n-sequences", "8", "--context-tokens", "128", "--tokens-per-sequence", "48", "--out", tmp])
        data = load_dataset(tmp)
    model, _ = load_model("testbed")
    ids = load_file(PROMPT)["prompt_ids"]
    with torch.no_grad(), capture_attention_inputs(model) as captured:
        model(input_ids=ids)
    X = torch.stack([captured[layer][0] for layer in range(len(captured))], dim=1)  # [n, layers, hidden]
    tensors, cases = {"ids": ids, "X": X.contiguous()}, []
    for kind, scorer in (("linear", KVzapLinear()), ("mlp", KVzapMLP(width=16, epochs=3))):
        scorer.fit(data.X_train, data.y_train, manifest=data.manifest)
        scorer.save(out / f"{kind}_scorer")  # the lab's own checkpoint, as train writes it
        tensors[f"{kind}_scorer.scores"] = scorer.predict(X).contiguous()
        held_out = scorer.predict(data.X_test)
        for per in ("global", "head"):
            name = f"{kind}_{per}"
            rule = calibrate(held_out, 0.5, per=per, window=WINDOW, sinks=SINKS)
            policy = Policy(name=name, scorer=scorer, rule=rule)
            export_press(policy, out / name)
            folded, _ = fold_thresholds(scorer.weights_, rule.tau)
            shift = folded[-1][1] - scorer.weights_[-1][1]  # [layers, kv_heads]
            tensors[f"{name}.scores"] = (scorer.predict(X) + shift).contiguous()
            with torch.no_grad(), evicting(model, policy) as run:
                model(input_ids=ids)
            kept = torch.zeros(len(run.cache.layers), shift.shape[1], ids.shape[1], dtype=torch.bool)
            for layer, held in enumerate(run.cache.layers):
                for head in range(kept.shape[1]):
                    kept[layer, head, held.positions[0, head, : held.used][held.alive[0, head, : held.used]]] = True
            tensors[f"{name}.kept"] = kept
            cases.append(name)
            print(f"lab {name}: tau {np.round(np.asarray(rule.tau, dtype=float), 3).tolist()}, evicted per layer and head "
                  f"{(~kept).sum(-1).tolist()}")
    save_file(tensors, out / "expected.safetensors")
    (out / "cases.json").write_text(json.dumps(cases))


def kvpress_half(out: Path) -> int:
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging

    from kvpress.presses.kvzap_press import KVzapModel

    from kvzap_lab.kvpress import load_press

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(REPO / "kvzap_lab" / "testbed_model", attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    expected = load_file(out / "expected.safetensors")
    ids, X = expected["ids"], expected["X"]
    failures = []
    for kind in ("linear", "mlp"):  # the lab's checkpoints load in kvpress whole, predict alike, re-save unchanged
        scorer_dir = out / f"{kind}_scorer"
        kvzap_model, info = KVzapModel.from_pretrained(scorer_dir, output_loading_info=True)
        with torch.no_grad():
            gap = (kvzap_model.eval()(X) - expected[f"{kind}_scorer.scores"]).abs().max().item()
        kvzap_model.save_pretrained(out / f"{kind}_resaved")
        same_file = (scorer_dir / "model.safetensors").read_bytes() == (out / f"{kind}_resaved" / "model.safetensors").read_bytes()
        print(f"kvpress loads the lab's {kind} checkpoint: {info}; max |kvpress - lab| = {gap:.2e}; re-saved "
              f"{'byte for byte' if same_file else 'DIFFERENTLY'}")
        if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")) or gap > ATOL or not same_file:
            failures.append(f"{kind} scorer checkpoint: loading info {info}, gap {gap:.2e}, re-saved identically: {same_file}")
    for name in json.loads((out / "cases.json").read_text()):
        press = load_press(out / name)
        with torch.no_grad():
            exported = press.press.kvzap_model(X)
        gap = (exported - expected[f"{name}.scores"]).abs().max().item()
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=DynamicCache())
        lab_evicted = ~expected[f"{name}.kept"]  # [layers, kv_heads, n]
        masked = torch.zeros_like(lab_evicted)
        for layer, decoder in enumerate(model.model.layers):
            indices = decoder.self_attn.masked_key_indices
            if indices is not None:
                batch, head, position = indices
                masked[layer, head[batch == 0], position[batch == 0]] = True
        same = bool(torch.equal(masked, lab_evicted))
        print(f"kvpress {name}: scorer max |kvpress - lab| = {gap:.2e}; masked per layer and head {masked.sum(-1).tolist()} "
              f"({'=' if same else '!='} lab's evicted {lab_evicted.sum(-1).tolist()})")
        if gap > ATOL:
            failures.append(f"{name}: exported scorer differs from the lab's by {gap:.2e} > {ATOL}")
        if not same:
            failures.append(f"{name}: kvpress masked {int((masked & ~lab_evicted).sum())} pairs the lab kept and kept "
                            f"{int((lab_evicted & ~masked).sum())} pairs the lab evicted")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("lab", "kvpress"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out, start = Path(sys.argv[2]), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if sys.argv[1] == "lab":
        lab_half(out)
        code = 0
    else:
        code = kvpress_half(out)
    print(f"{sys.argv[1]} half: {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
