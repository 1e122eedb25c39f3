"""Tests of kvzap_lab.kernels.

The torch paths (what the kernels must compute) are tested in this process. The Triton kernels are tested
against them under ``TRITON_INTERPRET=1``, which must be set before ``import triton``; another test may already
have imported triton here, so ``test_triton_kernels_under_interpreter`` reruns this file in a subprocess with
the variable set, where the ``test_interpreted_*`` tests exist (they are only defined there).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kvzap_lab import kernels
from kvzap_lab.kernels import ScorerWeights, compact, compact_torch, score_and_threshold, score_and_threshold_torch

INTERPRETED = kernels.INTERPRETED
D, M, H = 64, 32, 2


def make_weights(mlp: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> ScorerWeights:
    """Random scorer weights, D=64 -> (M=32 ->) H=2, scaled so that scores are O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = M if mlp else H
    w1, b1 = torch.randn(D, out, generator=g) / math.sqrt(D), torch.randn(out, generator=g)
    if not mlp:
        return ScorerWeights(w1.to(dtype), b1.to(dtype))
    w2, b2 = torch.randn(M, H, generator=g) / math.sqrt(M), torch.randn(H, generator=g)
    return ScorerWeights(w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))


def make_layer(b=2, h=3, cap=40, d=16, seed=0, dtype=torch.float32, empty_tail=5):
    """A random cache layer ``[b, h, cap, d]``; the last ``empty_tail`` slots are empty (position -1, keep False),
    row (0, 1) keeps nothing and row (1, 0) keeps every non-empty slot."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, cap, d, generator=g).to(dtype)
    values = torch.randn(b, h, cap, d, generator=g).to(dtype)
    positions = torch.arange(cap).repeat(b, h, 1)
    scores = torch.randn(b, h, cap, generator=g)
    keep = torch.rand(b, h, cap, generator=g) < 0.5
    keep[0, 1] = False
    keep[1, 0] = True
    if empty_tail:
        positions[..., -empty_tail:] = -1
        keep[..., -empty_tail:] = False
    return keys, values, positions, scores, keep


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ----------------------------------------------------------------------------------------------------------
# Torch paths: the semantics
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp", [False, True])
def test_torch_scorer_matches_the_nn_module_it_was_read_from(mlp):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(D, M), nn.GELU(), nn.Linear(M, H)) if mlp else nn.Linear(D, H)
    hidden = torch.randn(7, D)
    scores, keep = score_and_threshold_torch(hidden, ScorerWeights.from_module(module), tau=0.1)
    expected = module(hidden).detach().T
    assert scores.shape == (H, 7) and scores.dtype == torch.float32 and keep.dtype == torch.bool
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(keep, scores >= 0.1)


@pytest.mark.parametrize("mlp", [False, True])
def test_from_stacked_reads_the_labs_trained_scorers(mlp):
    from kvzap_lab.policies.kvzap_linear import KVzapLinear
    from kvzap_lab.policies.kvzap_mlp import KVzapMLP

    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(96, 2, D, generator=g).numpy(), torch.randn(96, 2, H, generator=g).numpy()
    scorer = (KVzapMLP(epochs=1) if mlp else KVzapLinear()).fit(X, y)
    hidden = torch.randn(2, 5, D, generator=g)
    for layer in range(2):
        weights = ScorerWeights.from_stacked(scorer.weights_, layer)
        assert weights.is_mlp == mlp
        scores, _ = score_and_threshold_torch(hidden, weights, 0.0)
        torch.testing.assert_close(scores, scorer.score(hidden, layer), atol=1e-5, rtol=1e-5)


def test_torch_scorer_per_head_tau_and_batched_hidden():
    weights = make_weights(mlp=True)
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    tau = torch.tensor([-0.5, 0.5])
    scores, keep = score_and_threshold_torch(hidden, weights, tau)
    assert scores.shape == keep.shape == (2, H, 5)
    for i in range(2):
        alone, _ = score_and_threshold_torch(hidden[i], weights, tau)
        torch.testing.assert_close(scores[i], alone, atol=1e-6, rtol=0)
    assert torch.equal(keep, scores >= tau[:, None])
    assert torch.equal(keep[:, 0], scores[:, 0] >= -0.5) and torch.equal(keep[:, 1], scores[:, 1] >= 0.5)


def test_compact_torch_on_a_hand_made_layer():
    keys = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(1, 2, 4, 1) + 1  # values 1..8
    positions = torch.tensor([[[0, 1, 2, -1], [0, 1, 2, 3]]])
    scores = torch.tensor([[[0.5, 0.6, 0.7, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    keep = torch.tensor([[[False, True, True, False], [True, False, False, True]]])
    out_keys, out_values, out_pos, out_scores, lengths = compact_torch(keys, -keys, positions, scores, keep, multiple=3)
    assert lengths.tolist() == [[2, 2]]
    assert out_keys[..., 0].tolist() == [[[2, 3, 0], [5, 8, 0]]]
    assert torch.equal(out_values, -out_keys)
    assert out_pos.tolist() == [[[1, 2, -1], [0, 3, -1]]]
    assert torch.equal(out_scores, torch.tensor([[[0.6, 0.7, -math.inf], [1.0, 4.0, -math.inf]]]))


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_compact_torch_keeps_each_rows_pairs_in_order(multiple):
    keys, values, positions, scores, keep = make_layer()
    out_keys, out_values, out_pos, out_scores, lengths = compact_torch(keys, values, positions, scores, keep, multiple)
    longest = int(keep.sum(-1).max())
    assert out_keys.shape[2] == math.ceil(longest / multiple) * multiple and out_keys.shape[2] % multiple == 0
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            n, kept = int(lengths[b, h]), keep[b, h]
            assert n == int(kept.sum())
            assert torch.equal(out_keys[b, h, :n], keys[b, h, kept]) and torch.equal(out_values[b, h, :n], values[b, h, kept])
            assert torch.equal(out_pos[b, h, :n], positions[b, h, kept]) and torch.equal(out_scores[b, h, :n], scores[b, h, kept])
            assert (out_pos[b, h, n:] == -1).all() and (out_scores[b, h, n:] == -math.inf).all()
            assert (out_keys[b, h, n:] == 0).all() and (out_values[b, h, n:] == 0).all()
    assert lengths[0, 1] == 0 and lengths[1, 0] == keys.shape[2] - 5


def test_compact_of_an_all_evicted_layer_has_zero_capacity():
    keys, values, positions, scores, keep = make_layer()
    out = compact(keys, values, positions, scores, torch.zeros_like(keep))
    assert out[0].shape == (2, 3, 0, 16) and out[2].shape == (2, 3, 0) and (out[4] == 0).all()


@pytest.mark.parametrize(
    "tau, match",
    [(math.nan, "finite"), (math.inf, "finite"), (torch.tensor([0.0, -math.inf]), "finite"), (torch.zeros(3), r"per-head tensor \[2\]"), ("-6", "finite number")],
)
def test_scorer_rejects_bad_tau(tau, match):
    with pytest.raises(ValueError, match=match):
        score_and_threshold(torch.randn(3, D), make_weights(mlp=False), tau)


def test_scorer_rejects_bad_hidden_and_weights():
    weights = make_weights(mlp=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., t, 64\]"):
        score_and_threshold(torch.randn(3, D + 1), weights, 0.0)
    with pytest.raises(ValueError, match="w1 \\[D, M\\], b1 \\[M\\], w2 \\[M, H\\]"):
        ScorerWeights(weights.w1, weights.b1, torch.randn(M + 1, H), weights.b2)
    with pytest.raises(ValueError, match="both w2 and b2"):
        ScorerWeights(weights.w1, weights.b1, weights.w2)
    with pytest.raises(TypeError, match="ScorerWeights"):
        score_and_threshold(torch.randn(3, D), {"w1": weights.w1}, 0.0)
    with pytest.raises(TypeError, match="exact GELU"):
        ScorerWeights.from_module(nn.Sequential(nn.Linear(D, M), nn.GELU(approximate="tanh"), nn.Linear(M, H)))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda l: (l[0], l[1][..., :8], *l[2:]), "same shape"),
        (lambda l: (*l[:2], l[2].int(), *l[3:]), "positions must be torch.int64"),
        (lambda l: (*l[:3], l[3].double(), l[4]), "scores must be torch.float32"),
        (lambda l: (*l[:4], l[4][..., :-1]), r"keep must be torch.bool \(2, 3, 40\)"),
    ],
)
def test_compact_rejects_bad_layers(change, match):
    with pytest.raises(ValueError, match=match):
        compact(*change(make_layer()))


def test_compact_rejects_bad_multiple():
    with pytest.raises(ValueError, match="multiple"):
        compact(*make_layer(), multiple=0)


def test_kernels_import_and_fall_back_to_torch_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from kvzap_lab import kernels as k\n"
        "w = k.ScorerWeights(torch.randn(8, 2), torch.zeros(2))\n"
        "s, keep = k.score_and_threshold(torch.randn(3, 8), w, 0.0)\n"
        "assert k.triton is None and not k.uses_triton(s) and s.shape == (2, 3)\n"
        "try:\n"
        "    k.compact_triton(*[torch.zeros(1, 1, 2, 4)] * 2, torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, dtype=torch.bool))\n"
        "except RuntimeError as err:\n"
        "    assert 'needs the optional dependency triton' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('compact_triton ran without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


if not INTERPRETED:

    def test_cpu_tensors_take_the_torch_path(monkeypatch):
        calls = []
        monkeypatch.setattr(kernels, "compact_torch", lambda *a: calls.append("compact") or compact_torch(*a))
        monkeypatch.setattr(kernels, "score_and_threshold_torch", lambda *a: calls.append("score") or score_and_threshold_torch(*a))
        compact(*make_layer())
        score_and_threshold(torch.randn(3, D), make_weights(mlp=False), 0.0)
        assert calls == ["compact", "score"] and not kernels.uses_triton(torch.zeros(1))

    def test_triton_kernels_under_interpreter(need):
        need("triton")
        if kernels.triton is not None:  # the CPU refusal only exists where triton is there
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                kernels.compact_triton(*make_layer())
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "interpreted"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        passed = re.search(r"(\d+) passed", output)
        assert passed and int(passed.group(1)) >= 30 and "skipped" not in output, output


    SCORER_TYPES = {"x_ptr": "*{dt}", "w1_ptr": "*{dt}", "b1_ptr": "*{dt}", "w2_ptr": "*{dt}", "partial_ptr": "*fp32"}
    COMPILE_CASES = {  # what the block heuristic picks for decoding (t=1) and prefill (t>=64) on a GPU
        "scorer-mlp-fp32-decode": ("_scorer_partial_kernel", SCORER_TYPES, "fp32", dict(IS_MLP=True, NATIVE_DOT=False, BLOCK_T=16, BLOCK_S=16, BLOCK_K=32, BLOCK_H=16)),
        "scorer-mlp-bf16-prefill": ("_scorer_partial_kernel", SCORER_TYPES, "bf16", dict(IS_MLP=True, NATIVE_DOT=True, BLOCK_T=64, BLOCK_S=64, BLOCK_K=64, BLOCK_H=16)),
        "scorer-linear-fp32-prefill": ("_scorer_partial_kernel", SCORER_TYPES, "fp32", dict(IS_MLP=False, NATIVE_DOT=False, BLOCK_T=64, BLOCK_S=32, BLOCK_K=32, BLOCK_H=16)),
        "reduce-threshold": ("_reduce_threshold_kernel", {"partial_ptr": "*fp32", "bias_ptr": "*{dt}", "tau_ptr": "*fp32", "scores_ptr": "*fp32", "keep_ptr": "*u8"}, "bf16", dict(BLOCK_T=128, BLOCK_H=16)),
        "compact-bf16": (
            "_compact_kernel",
            {"keys_ptr": "*{dt}", "values_ptr": "*{dt}", "pos_ptr": "*i64", "scores_ptr": "*fp32", "keep_ptr": "*u8", "lengths_ptr": "*i64",
             "out_keys_ptr": "*{dt}", "out_values_ptr": "*{dt}", "out_pos_ptr": "*i64", "out_scores_ptr": "*fp32"},
            "bf16",
            dict(BLOCK_N=64, BLOCK_D=128),
        ),
    }  # fmt: skip

    @pytest.mark.slow
    @pytest.mark.parametrize("case", list(COMPILE_CASES))
    def test_kernels_compile_for_a_gpu_without_one(case, tmp_path, monkeypatch, need):
        """Ahead-of-time compilation for sm_90 (Triton ships ptxas): catches what the interpreter lets through
        (types of loop-carried values, tl.dot shape limits, stores that need casts)."""
        need("triton")
        import triton
        from triton.backends.compiler import GPUTarget

        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
        name, pointer_types, dtype, constexprs = COMPILE_CASES[case]
        fn = getattr(kernels, name)
        signature = {arg: "constexpr" if arg in constexprs else pointer_types.get(arg, "i32").format(dt=dtype) for arg in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_stages": 2})
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 64 * 1024


# ----------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (defined only in the TRITON_INTERPRET=1 subprocess)
# ----------------------------------------------------------------------------------------------------------


def tau_between_scores(scores: torch.Tensor) -> torch.Tensor:
    """A per-head tau ``[H]`` halfway between two neighbouring scores near each head's median (so that summation
    order cannot flip a keep decision), ``scores [..., H, t]``."""
    per_head = scores.transpose(0, -2).reshape(scores.shape[-2], -1).sort(dim=-1).values
    if per_head.shape[1] == 1:
        return per_head[:, 0] - 0.5
    i = per_head.shape[1] // 2
    gap = per_head[:, i] - per_head[:, i - 1]
    assert (gap > 1e-4).all(), "pick another seed: two scores are too close to separate"
    return (per_head[:, i] + per_head[:, i - 1]) / 2


if INTERPRETED:
    from kvzap_lab.kernels import compact_triton, score_and_threshold_triton

    SCORER_CASES = {
        "linear-t1": dict(mlp=False, shape=(1, D)),
        "linear-t16": dict(mlp=False, shape=(16, D)),
        "linear-t16-2splits": dict(mlp=False, shape=(16, D), blocks=dict(block_s=32)),
        "mlp-t1": dict(mlp=True, shape=(1, D)),
        "mlp-t13": dict(mlp=True, shape=(13, D)),
        "mlp-t16-1split": dict(mlp=True, shape=(16, D), blocks=dict(block_s=32, block_k=64)),
        "mlp-batched": dict(mlp=True, shape=(2, 5, D)),
        "mlp-strided-hidden": dict(mlp=True, shape=(9, D), strided=True),
        "mlp-bf16": dict(mlp=True, shape=(16, D), dtype=torch.bfloat16),
        "mlp-bf16-hidden-fp32-weights": dict(mlp=True, shape=(16, D), hidden_dtype=torch.bfloat16),
        "linear-bf16": dict(mlp=False, shape=(16, D), dtype=torch.bfloat16),
    }

    @pytest.mark.parametrize("per_head_tau", [False, True])
    @pytest.mark.parametrize("case", list(SCORER_CASES))
    def test_interpreted_scorer_matches_torch(case, per_head_tau):
        spec = SCORER_CASES[case]
        weights = make_weights(spec["mlp"], seed=2, dtype=spec.get("dtype", torch.float32))
        hidden_dtype = spec.get("hidden_dtype", spec.get("dtype", torch.float32))
        g = torch.Generator().manual_seed(3)
        if spec.get("strided"):
            hidden = torch.randn(*spec["shape"][:-1], 2 * D, generator=g).to(hidden_dtype)[..., ::2]
        else:
            hidden = torch.randn(*spec["shape"], generator=g).to(hidden_dtype)
        reference, _ = score_and_threshold_torch(hidden, weights, 0.0)
        tau = tau_between_scores(reference)
        tau = tau if per_head_tau else float(tau.mean())
        ref_scores, ref_keep = score_and_threshold_torch(hidden, weights, tau)
        scores, keep = score_and_threshold_triton(hidden, weights, tau, **spec.get("blocks", {}))
        assert scores.shape == ref_scores.shape and scores.dtype == torch.float32 and keep.dtype == torch.bool
        # Not bitwise: the kernel's dots sum over D in another order than torch's matmul (~1e-7 apart here).
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
        assert torch.equal(keep, ref_keep)
        assert torch.equal(keep, scores >= torch.as_tensor(tau).expand(H)[:, None])
        if spec["shape"][-2] > 1 and per_head_tau:
            assert keep.any() and not keep.all()

    def test_interpreted_scorer_reads_an_nn_module_through_strided_views():
        torch.manual_seed(4)
        module = nn.Sequential(nn.Linear(D, M), nn.GELU(), nn.Linear(M, H))
        weights = ScorerWeights.from_module(module)  # transposed views: non-unit strides
        assert weights.w1.stride(0) == 1
        hidden = torch.randn(11, D)
        scores, _ = score_and_threshold_triton(hidden, weights, 0.0)
        torch.testing.assert_close(scores, module(hidden).detach().T, atol=1e-5, rtol=0)

    COMPACT_CASES = {
        "fp32": dict(),
        "bf16": dict(dtype=torch.bfloat16),
        "fp32-multiple-8": dict(multiple=8),
        "bf16-multiple-64-beyond-capacity": dict(dtype=torch.bfloat16, multiple=64),
        "blocks-of-16": dict(block_n=16),
        "blocks-of-16-multiple-8": dict(block_n=16, multiple=8),
        "head-dim-24-not-power-of-2": dict(d=24),
        "no-empty-slots": dict(empty_tail=0, block_n=16),
    }

    @pytest.mark.parametrize("case", list(COMPACT_CASES))
    def test_interpreted_compact_is_bitwise_equal_to_torch(case):
        spec = dict(COMPACT_CASES[case])
        multiple, block_n = spec.pop("multiple", 1), spec.pop("block_n", None)
        layer = make_layer(seed=5, **spec)
        expected = compact_torch(*layer, multiple)
        got = compact_triton(*layer, multiple, block_n=block_n)
        assert [bitwise_equal(a, b) for a, b in zip(got, expected)] == [True] * 5

    def test_interpreted_compact_of_strided_views():
        keys, values, positions, scores, keep = make_layer(cap=48, seed=6)
        views = (keys.transpose(0, 1), values[:, :, :40].transpose(0, 1), positions.transpose(0, 1), scores.transpose(0, 1), keep.transpose(0, 1))
        views = (views[0][:, :, :40], views[1], *(v[:, :, :40] for v in views[2:]))
        assert not any(v.is_contiguous() for v in views)
        expected = compact_torch(*views, 4)
        got = compact_triton(*views, 4, block_n=16)
        assert [bitwise_equal(a, b) for a, b in zip(got, expected)] == [True] * 5

    def test_interpreted_dispatch_sends_cpu_tensors_to_triton(monkeypatch):
        calls = []
        monkeypatch.setattr(kernels, "compact_triton", lambda *a: calls.append("compact") or compact_triton(*a))
        monkeypatch.setattr(kernels, "score_and_threshold_triton", lambda *a: calls.append("score") or score_and_threshold_triton(*a))
        compact(*make_layer(cap=8, empty_tail=2))
        score_and_threshold(torch.randn(2, D), make_weights(mlp=False), 0.0)
        assert calls == ["compact", "score"] and kernels.uses_triton(torch.zeros(1))


@pytest.mark.slow
def test_gpu_check_script_passes_its_cpu_dry_run(tmp_path):
    """benchmarks/gpu_check.py on CPU (Triton interpreted, tiny shapes): every section runs and passes."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dry"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "summary: scorer PASS, compact PASS, engine PASS, env PASS" in result.stdout
    assert (tmp_path / "gpu_check.json").exists() and (tmp_path / "gpu_check.txt").exists()
