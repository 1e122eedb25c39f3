"""Prefill once, branch per policy: each branch gives exactly what ``generate`` with a one-chunk prefill gives."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_lab import tasks
from kvzap_lab.engine import attention_mass, generate, prefill
from kvzap_lab.oracle import oracle_table
from kvzap_lab.model import describe, load_model, random_tiny_model
from kvzap_lab.policy import Policy, Threshold, TopK, get_policy

WINDOW, SINKS = 8, 2


def same(a, b):
    assert a.tokens == b.tokens
    assert a.compression.overall == b.compression.overall
    assert torch.equal(a.compression.per_row, b.compression.per_row)
    assert (a.bytes_held, a.full_bytes) == (b.bytes_held, b.full_bytes)


def mlp_policy(model, tau):
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP

    spec, gen = describe(model), torch.Generator().manual_seed(0)
    X = torch.randn(256, spec.n_layers, spec.hidden_size, generator=gen)
    mlp = KVzapMLP(epochs=1).fit(X.numpy(), torch.randn(256, spec.n_layers, spec.n_kv_heads, generator=gen).numpy())
    return Policy("kvzap_mlp", mlp, Threshold(tau=tau, window=WINDOW, sinks=SINKS))


@pytest.mark.parametrize("attention_mass", [False, True])  # accumulated attention: its own prefill, or the shared one's mass
def test_branches_equal_generate_with_a_one_chunk_prefill(attention_mass):
    model = random_tiny_model("llama", seed=2)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (60, 37, 52)]  # left-padded batch
    pre = prefill(model, rows, attention_mass=attention_mass)
    assert (pre.attention_mass is not None) == attention_mass
    policies = [
        lambda: None,  # full cache
        lambda: mlp_policy(model, 0.0),  # threshold, fused KVzap scorer
        lambda: get_policy("knorm", rule=TopK(budget=10, window=WINDOW, sinks=SINKS)),
        lambda: get_policy("streaming_llm", rule=TopK(budget=0, window=WINDOW, sinks=SINKS)),
        lambda: get_policy("random", rule=TopK(budget=6, across_heads=True, window=WINDOW, sinks=SINKS)),
        lambda: get_policy("accumulated_attention", rule=TopK(budget=8, window=WINDOW, sinks=SINKS)),
    ]
    evicted = []
    for make in policies:
        for evict_every in (1, 8):
            kwargs = dict(eos_token_id=[], evict_every=evict_every)
            branched = pre.branch(make(), 14, **kwargs)  # fresh policy objects: the random scorer restarts its seed
            same(branched, generate(model, rows, make(), 14, chunk_size=60, **kwargs))
        evicted.append(branched.compression.overall)
    assert evicted[0] == 0 and all(c > 0.2 for c in evicted[1:])
    # the prefill is intact after its branches: the full-cache branch still equals generate
    same(pre.branch(None, 14, eos_token_id=[]), generate(model, rows, None, 14, eos_token_id=[], chunk_size=64))


def test_oracle_branches_on_the_test_bed_stop_like_generate():
    model, tokenizer = load_model("testbed", device="cpu")
    samples = tasks.make_samples("single_needle", tokenizer, 3, 96, seed=0)
    prompts, answers = [s.input_ids for s in samples], [s.answer_ids for s in samples]
    end = tokenizer.convert_tokens_to_ids(tasks.END)
    table = oracle_table(model, tokenizer, samples)
    pre = prefill(model, prompts)
    results = []
    for tau in (-7.0, -5.0, -3.0):
        policy = get_policy("oracle", rule=Threshold(tau=tau, window=16, sinks=4))
        policy.scorer.set_scores(table)
        branched = pre.branch(policy, 12, eos_token_id=end, expected=answers)
        same(branched, generate(model, prompts, policy, 12, eos_token_id=end, expected=answers, chunk_size=len(max(prompts, key=len))))
        results.append(branched.compression.overall)
    assert results == sorted(results) and results[0] < results[-1]  # higher tau, more evicted


def test_prefill_shapes_and_bad_input():
    model = random_tiny_model("llama", seed=1)
    spec = describe(model)
    pre = prefill(model, torch.randint(3, 128, (2, 20)))
    assert len(pre.hidden) == spec.n_layers and pre.hidden[0].shape == (2, 20, spec.hidden_size)
    assert pre.logits.shape == (2, 1, 128) and pre.cache.seen == 20 and pre.cache.compression().overall == 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        pre.branch(None, 0)


def test_attention_mass_is_the_column_sum_of_the_softmax_whatever_the_block():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 10, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen)
    mask = torch.rand(2, 3, 10, 7, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees a key
    expected = (query @ key.transpose(-1, -2) * 0.5).masked_fill(~mask, -math.inf).softmax(-1).sum(2)
    for block in (1, 3, 10, 1024):
        torch.testing.assert_close(attention_mass(query, key, mask, 0.5, block=block), expected)
    one = mask[:, :, :1]  # a mask shared by every query row (a decode step)
    torch.testing.assert_close(attention_mass(query, key, one, 0.5, block=4),
                               (query @ key.transpose(-1, -2) * 0.5).masked_fill(~one, -math.inf).softmax(-1).sum(2))
