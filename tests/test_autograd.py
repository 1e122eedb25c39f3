"""The eviction engine under autograd: same outputs with and without gradients, and gradients that flow through
the compacted cache (to the model's weights, and to a scorer's parameters through the scores the cache holds)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kvzap_lab.engine import evicting
from kvzap_lab.model import random_tiny_model
from kvzap_lab.policies.knorm import KNormScorer
from kvzap_lab.policy import Policy, Threshold, TopK

CHUNK = 16


class LinearScorer(nn.Module):
    """A trainable scorer: one linear map hidden -> kv_heads shared by every layer."""

    accumulates_attention = False

    def __init__(self, hidden: int, kv_heads: int):
        super().__init__()
        self.proj = nn.Linear(hidden, kv_heads)

    def score(self, hidden, layer, *, keys=None, values=None, positions=None):
        return self.proj(hidden).transpose(1, 2)  # [b, kv_heads, t]


def run_engine(model, policy, ids, decode, grad: bool, **schedule):
    """Chunked prefill of ``ids`` then one forward per token of ``decode`` (teacher-forced), inside ``evicting``.

    Returns the logits of every forward concatenated ``[b, n, vocab]`` and the run (its cache is the one used)."""
    with (contextlib.nullcontext() if grad else torch.no_grad()), evicting(model, policy, **schedule) as run:
        cache = run.new_cache()
        outputs = [model(input_ids=ids[:, s : s + CHUNK], cache=cache).logits for s in range(0, ids.shape[1], CHUNK)]
        outputs += [model(input_ids=decode[:, i : i + 1], cache=cache).logits for i in range(decode.shape[1])]
    return torch.cat(outputs, 1), run


def tokens(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (b, n), generator=torch.Generator().manual_seed(seed))


def test_evicting_gives_the_same_logits_with_and_without_grad():
    model = random_tiny_model("llama", num_hidden_layers=2)
    policy = Policy("knorm", KNormScorer(), TopK(budget=6, window=4, sinks=1))
    ids, decode = tokens(2, 3 * CHUNK, 0), tokens(2, 12, 1)
    schedule = dict(evict_every=1, compact_every=2)  # evictions and compactions at decode steps too
    reference, run = run_engine(model, policy, ids, decode, grad=False, **schedule)
    assert run.cache.compression().overall > 0.3  # pairs were evicted and compacted away
    logits, run = run_engine(model, policy, ids, decode, grad=True, **schedule)
    assert logits.requires_grad
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_gradients_flow_through_the_compacted_cache():
    """Keeping every pair, the engine (chunked, compacting after every chunk) computes the plain forward: its
    gradients equal a one-shot forward's, which needs the keys and values of earlier chunks to carry theirs."""
    ids = tokens(2, 3 * CHUNK, 2)
    model = random_tiny_model("qwen3", num_hidden_layers=2)
    logits, run = run_engine(model, Policy("all", LinearScorer(64, 2), Threshold(tau=float("-inf"), window=4, sinks=1)), ids, ids[:, :0], grad=True)
    assert run.cache.layers[0].used == ids.shape[1]  # compacted (keeping all) after each chunk
    logits.logsumexp(-1).sum().backward()
    engine_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(ids).logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(engine_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_scorer_parameters_get_gradients_through_the_held_scores():
    model = random_tiny_model("llama", num_hidden_layers=2)
    for p in model.parameters():
        p.requires_grad_(False)  # only the scorer trains
    scorer = LinearScorer(64, 2)
    policy = Policy("linear", scorer, TopK(budget=6, window=4, sinks=1))
    _, run = run_engine(model, policy, tokens(1, 3 * CHUNK, 3), tokens(1, 4, 4), grad=True, evict_every=1, compact_every=2)
    layer = run.cache.layers[1]
    held = layer.scores[:, :, : layer.used][layer.alive[:, :, : layer.used]]
    assert held.requires_grad and held.numel() < 2 * (3 * CHUNK + 4)  # 2 KV heads; pairs were evicted
    held.sum().backward()
    assert scorer.proj.weight.grad is not None and scorer.proj.weight.grad.abs().sum() > 0
