"""Scores of the oracle as it was at commit aadc42f (before the fused scoring), to pin the new one to it.

Run from the repository root at that commit: `git checkout aadc42f -- kvzap_lab && python tests/golden/oracle/make_scores.py`.
"""
import json, torch
from safetensors.torch import save_file
from kvzap_lab import oracle
from kvzap_lab.model import load_model, random_tiny_model
from kvzap_lab.tasks import make_samples
torch.set_num_threads(1)
tensors, cases = {}, []
def add(name, model, template, contexts, **kw):
    results = oracle.score_contexts(model, template, contexts, **kw)
    for i, (c, r) in enumerate(zip(contexts, results)):
        tensors[f"{name}.{i}.ids"] = torch.tensor(c)
        tensors[f"{name}.{i}.scores"] = r.scores
    cases.append({"name": name, "n": len(contexts), **{k: v for k, v in kw.items()}})
model, tok = load_model("testbed", device="cpu", dtype=torch.float32)
ctx = []
for task, n, seed in [("single_needle", 200, 1), ("kv_retrieval", 120, 2), ("copy", 300, 3)]:
    s = make_samples(task, tok, 1, n, seed=seed)[0]
    ctx.append(s.input_ids[slice(*s.context_span)])
add("testbed", model, tok, ctx)
add("testbed_chunk64", model, tok, ctx[:2], chunk_size=64, anchor=8)
add("testbed_unchunked_kvzip", model, tok, ctx[:2], chunk_size=None, normalize=False)
tiny = random_tiny_model("llama", seed=21, num_hidden_layers=3)
T = oracle.RepeatTemplate(prefix=(1, 5), middle=(7, 8, 9, 10))
g = torch.Generator().manual_seed(0)
tctx = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (90, 41, 67)]
add("tiny_llama", tiny, T, tctx)
add("tiny_llama_chunk24", tiny, T, tctx, chunk_size=24, anchor=3)
add("tiny_llama_unchunked", tiny, T, tctx, chunk_size=None)
save_file(tensors, "tests/golden/oracle/scores-aadc42f.safetensors", metadata={"cases": json.dumps(cases)})
print(cases, sum(t.numel() for t in tensors.values()))
