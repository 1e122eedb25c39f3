"""The memory bound through the engine: bytes held <= (1 - c) + 10 % of a full cache at every decode step.

README's claim, checked on the real decode loop rather than a hand-driven cache: ``generate``-style prefill in
128-token chunks, then teacher-forced decoding, with the random policy (every head evicts alike) and the oracle
(heads keep very different counts), at 128, 256 and ~1,100 tokens, three left-padded rows of different lengths.
At every step, the bytes the compacted cache holds over the bytes a full cache would hold at that step stay
within ``(1 - c) + 0.10``, ``c`` being the compression achieved so far (evicted pairs over pairs seen).
"""

import numpy as np
import pytest
import torch

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_CHUNK, evicting, left_pad
from kvzap_lab.oracle import oracle_table
from kvzap_lab.model import load_model
from kvzap_lab.policy import Threshold, get_policy

TARGETS = (0.5, 0.75, 0.9)
DECODE = 48


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


def _ratios(model, ids, mask, tokens, policy):
    """(held / full, compression) after every decode step."""
    out = []
    with torch.no_grad(), evicting(model, policy, evict_every=1) as run:
        cache = run.new_cache()
        for start in range(0, ids.shape[1], DEFAULT_CHUNK):
            end = min(start + DEFAULT_CHUNK, ids.shape[1])
            model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=cache)
        for i in range(tokens.shape[1]):
            full_mask = torch.cat([mask, torch.ones_like(tokens[:, : i + 1])], 1)
            model(input_ids=tokens[:, i : i + 1], attention_mask=full_mask, cache=cache)
            out.append((cache.bytes_held() / cache.full_bytes(), cache.compression().overall))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("context_tokens", [128, 256, 1100])
def test_bytes_held_stay_within_the_bound_at_every_step(testbed, context_tokens):
    model, tokenizer = testbed
    samples = [tasks.make_samples("single_needle", tokenizer, 1, context_tokens - 16 * i, seed=i)[0] for i in range(3)]
    ids, mask = left_pad([s.input_ids for s in samples], tokenizer.pad_token_id)
    tokens = torch.randint(10, model.config.vocab_size, (3, DECODE), generator=torch.Generator().manual_seed(0))
    table = oracle_table(model, tokenizer, samples)
    context = torch.cat([table[i, :, :, s.context_span[0] : s.context_span[1]].flatten() for i, s in enumerate(samples)])
    taus = {
        "random": [float(np.quantile(np.random.default_rng(0).standard_normal(200_000), c)) for c in TARGETS],
        "oracle": [float(torch.quantile(context, c)) for c in TARGETS],
    }
    for name, tau_list in taus.items():
        for tau in tau_list:
            policy = get_policy(name, rule=Threshold(tau=tau), **({"seed": 0} if name == "random" else {}))
            if name == "oracle":
                policy.scorer.set_scores(table)
            steps = _ratios(model, ids, mask, tokens, policy)
            assert steps[-1][1] > 0.3, f"{name} tau={tau:.2f} evicted too little to test the bound"
            for step, (held, c) in enumerate(steps):
                assert held <= (1 - c) + 0.10, f"{name} tau={tau:.2f} step {step}: held {held:.3f} > (1 - {c:.3f}) + 0.10"
