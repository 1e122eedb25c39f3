"""Triton kernels for the eviction hot path, each with a torch reference that defines what it computes.

- :func:`score_and_threshold` scores new tokens with one layer's KVzap scorer (linear or GELU MLP, given as
  :class:`ScorerWeights`) and applies the threshold: ``hidden [t, D] -> scores [H, t] float32, keep [H, t] bool``.
- :func:`compact` moves the kept pairs of a cache layer ``[b, kv_heads, cap, d]`` to the front of each row
  (order preserved) and shrinks the capacity to the longest row, with padding marked by position -1.

Each public function dispatches on its own: the Triton path runs when ``triton`` imports and the tensors are on
CUDA, or when ``TRITON_INTERPRET=1`` was set before this module was imported (CPU tensors then go through
Triton's interpreter, which is how the tests check the kernels without a GPU); the torch path runs otherwise.
Both paths are public as ``*_torch`` and ``*_triton`` so that tests and ``benchmarks/gpu_check.py`` can compare
them. Importing this module never needs triton.

Numerics: the scorer computes in float32 whatever the input dtype (bf16/fp16 products are exact in float32),
and fp32 Triton dots use ``input_precision="ieee"`` (no TF32), so the two scorer paths differ only by summation
order (~1e-6 relative). Compaction only moves data: both paths agree bitwise.
"""

import contextlib
import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths still work; the *_triton functions raise a clear error
    triton = None

# triton.jit decides at decoration time (i.e. when this module is imported) whether kernels are interpreted.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(tensor: Tensor) -> bool:
    """True when the automatic dispatch sends work on ``tensor`` to the Triton kernels."""
    return triton is not None and (tensor.is_cuda or INTERPRETED)


def _require_triton(tensor: Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what} needs the optional dependency triton (pip install 'kvzap-lab[triton]'); use {what.replace('_triton', '_torch')} instead")
    if not uses_triton(tensor):
        raise RuntimeError(
            f"{what} got tensors on {tensor.device}: Triton runs on CUDA tensors, or on CPU tensors only when "
            "TRITON_INTERPRET=1 is set before kvzap_lab.kernels is imported"
        )


# ----------------------------------------------------------------------------------------------------------
# Scorer: weights
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerWeights:
    """One layer's KVzap scorer as plain tensors (math layout, ``x @ W``, not nn.Linear's ``[out, in]``).

    Linear: ``w1 [D, H]``, ``b1 [H]``, ``w2 = b2 = None``: ``scores = hidden @ w1 + b1``.
    MLP: ``w1 [D, M]``, ``b1 [M]``, ``w2 [M, H]``, ``b2 [H]``: ``scores = GELU(hidden @ w1 + b1) @ w2 + b2``
    (exact erf GELU). ``D`` is the model's hidden size, ``H`` the layer's KV heads, ``M`` the MLP width.
    """

    w1: Tensor
    b1: Tensor
    w2: Tensor | None = None
    b2: Tensor | None = None

    def __post_init__(self):
        if (self.w2 is None) != (self.b2 is None):
            raise ValueError("ScorerWeights: give both w2 and b2 (MLP) or neither (linear)")
        shapes = [(self.w1, 2, "w1"), (self.b1, 1, "b1")] + ([(self.w2, 2, "w2"), (self.b2, 1, "b2")] if self.is_mlp else [])
        for tensor, dim, name in shapes:
            if not isinstance(tensor, Tensor) or tensor.dim() != dim or not tensor.is_floating_point():
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"ScorerWeights.{name} must be a {dim}-D floating tensor; got {got}")
        width = self.w1.shape[1]
        if self.b1.shape[0] != width:
            raise ValueError(f"ScorerWeights: b1 has {self.b1.shape[0]} entries, w1 {tuple(self.w1.shape)} has {width} outputs")
        if self.is_mlp and (self.w2.shape[0] != width or self.b2.shape[0] != self.w2.shape[1]):
            raise ValueError(
                f"ScorerWeights: MLP shapes must chain as w1 [D, M], b1 [M], w2 [M, H], b2 [H]; got w1 "
                f"{tuple(self.w1.shape)}, w2 {tuple(self.w2.shape)}, b2 {tuple(self.b2.shape)}"
            )

    @property
    def is_mlp(self) -> bool:
        return self.w2 is not None

    @property
    def hidden_size(self) -> int:
        return self.w1.shape[0]

    @property
    def n_heads(self) -> int:
        return (self.w2 if self.is_mlp else self.w1).shape[1]

    def to(self, device=None, dtype=None) -> "ScorerWeights":
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        return ScorerWeights(*(None if w is None else w.to(device=device, dtype=dtype) for w in (self.w1, self.b1, self.w2, self.b2)))

    @classmethod
    def from_stacked(cls, weights: list[tuple[Tensor, Tensor]], layer: int) -> "ScorerWeights":
        """Layer ``layer`` of stacked nn.Linear-layout maps ``[(W [layers, out, in], b [layers, out]), ...]``, as
        what a scorer's ``fused_weights()`` returns (KVzapLinear: one map; KVzapMLP: two, GELU between)."""
        if len(weights) not in (1, 2):
            raise ValueError(f"the kernel runs linear (1 map) or one-hidden-layer MLP (2 maps) scorers; got {len(weights)} maps")
        return cls(*(t for W, b in weights for t in (W[layer].T, b[layer])))

    @classmethod
    def from_module(cls, module: nn.Module) -> "ScorerWeights":
        """Views (no copies) of a torch scorer: ``nn.Linear(D, H)`` or ``nn.Sequential(Linear(D, M), GELU(), Linear(M, H))``."""
        if isinstance(module, nn.Linear) and module.bias is not None:
            return cls(module.weight.detach().T, module.bias.detach())
        layers = list(module.children()) if isinstance(module, nn.Sequential) else []
        if (
            len(layers) == 3
            and all(isinstance(m, nn.Linear) and m.bias is not None for m in (layers[0], layers[2]))
            and isinstance(layers[1], nn.GELU)
            and layers[1].approximate == "none"
        ):
            first, _, second = layers
            return cls(first.weight.detach().T, first.bias.detach(), second.weight.detach().T, second.bias.detach())
        raise TypeError(
            "ScorerWeights.from_module takes nn.Linear(D, H) with bias or nn.Sequential(nn.Linear(D, M), "
            f"nn.GELU(), nn.Linear(M, H)) with biases and exact GELU; got {module.__class__.__name__}: {module}"
        )


def _check_scorer_args(hidden: Tensor, weights: ScorerWeights, tau: float | Tensor) -> Tensor:
    """Validate the scorer inputs; return tau as a float32 ``[H]`` tensor on hidden's device."""
    if not isinstance(weights, ScorerWeights):
        raise TypeError(f"weights must be ScorerWeights (see ScorerWeights.from_module); got {type(weights).__name__}")
    if hidden.dim() < 2 or hidden.shape[-1] != weights.hidden_size or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating tensor [..., t, {weights.hidden_size}] (the scorer's input size); "
            f"got {hidden.dtype} {tuple(hidden.shape)}"
        )
    params = [weights.w1, weights.b1] + ([weights.w2, weights.b2] if weights.is_mlp else [])
    if any(p.device != hidden.device for p in params):
        raise ValueError(f"the scorer weights must be on hidden's device {hidden.device}; got {[str(p.device) for p in params]}")
    n_heads = weights.n_heads
    if isinstance(tau, Tensor):
        if tau.dim() > 1 or (tau.dim() == 1 and tau.shape[0] != n_heads):
            raise ValueError(f"tau must be a scalar or a per-head tensor [{n_heads}]; got shape {tuple(tau.shape)}")
        if not torch.isfinite(tau).all():
            raise ValueError(f"tau must be finite; got {tau.tolist()}")
        return tau.to(hidden.device, torch.float32).expand(n_heads).contiguous()
    if not isinstance(tau, numbers.Real) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number or a per-head tensor [{n_heads}]; got {tau!r}")
    return torch.full((n_heads,), float(tau), device=hidden.device)


# ----------------------------------------------------------------------------------------------------------
# Scorer: torch path
# ----------------------------------------------------------------------------------------------------------


def score_and_threshold_torch(hidden: Tensor, weights: ScorerWeights, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`score_and_threshold` (same arguments and results)."""
    tau = _check_scorer_args(hidden, weights, tau)
    out = hidden.float() @ weights.w1.float() + weights.b1.float()
    if weights.is_mlp:
        out = nn.functional.gelu(out) @ weights.w2.float() + weights.b2.float()
    scores = out.transpose(-1, -2).contiguous()  # [..., H, t]
    return scores, scores >= tau[:, None]


# ----------------------------------------------------------------------------------------------------------
# Compaction: shared checks and torch path
# ----------------------------------------------------------------------------------------------------------


def _check_cache_layer(keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor, keep: Tensor, multiple: int) -> None:
    if keys.dim() != 4 or values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(
            "keys and values must have the same shape [batch, kv_heads, capacity, head_dim] and dtype; got "
            f"keys {keys.dtype} {tuple(keys.shape)}, values {values.dtype} {tuple(values.shape)}"
        )
    row_shape = keys.shape[:3]
    for name, tensor, dtype in (("positions", positions, torch.int64), ("scores", scores, torch.float32), ("keep", keep, torch.bool)):
        if tensor.shape != row_shape or tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} {tuple(row_shape)} (keys' first three dims); got {tensor.dtype} {tuple(tensor.shape)}")
    if any(t.device != keys.device for t in (values, positions, scores, keep)):
        raise ValueError(f"keys, values, positions, scores and keep must share one device; keys are on {keys.device}")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple (the output capacity is rounded up to it) must be an int >= 1; got {multiple!r}")


def _kept_lengths(keep: Tensor, multiple: int) -> tuple[Tensor, int]:
    """``lengths [b, kv_heads]`` int64 (kept pairs per row) and the output capacity (max length rounded up)."""
    lengths = keep.sum(-1)
    longest = int(lengths.max()) if lengths.numel() else 0
    return lengths, -(-longest // multiple) * multiple


def compact_torch(
    keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor, keep: Tensor, multiple: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Torch reference of :func:`compact` (same arguments and results)."""
    _check_cache_layer(keys, values, positions, scores, keep, multiple)
    lengths, capacity = _kept_lengths(keep, multiple)
    b, h, _, d = keys.shape
    filled = torch.arange(capacity, device=keys.device) < lengths[..., None]  # [b, h, capacity]
    out_keys, out_values = keys.new_zeros(b, h, capacity, d), values.new_zeros(b, h, capacity, d)
    out_positions = positions.new_full((b, h, capacity), -1)
    out_scores = scores.new_full((b, h, capacity), -math.inf)
    # Boolean indexing walks both masks in row-major order and each row has lengths[row] True entries in both,
    # so the i-th kept pair of a row lands in that row's slot i.
    out_keys[filled], out_values[filled] = keys[keep], values[keep]
    out_positions[filled], out_scores[filled] = positions[keep], scores[keep]
    return out_keys, out_values, out_positions, out_scores, lengths


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _scorer_partial_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, partial_ptr,
        n_tokens, hidden_size, width, n_heads,
        stride_xn, stride_xd, stride_w1d, stride_w1m, stride_w2m, stride_w2h,
        IS_MLP: tl.constexpr, NATIVE_DOT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """Program (token block, split s) writes ``partial[s, tokens, :H]``; the splits sum to ``scores - last bias``.

        MLP: split s owns hidden units ``[s*BLOCK_S, (s+1)*BLOCK_S)`` (full D loop, bias, GELU, times w2 rows).
        Linear: split s owns input features ``[s*BLOCK_S, (s+1)*BLOCK_S)`` (BLOCK_S == BLOCK_K).
        """
        pid_t, split = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        heads = tl.arange(0, BLOCK_H)
        row_ok, head_ok = rows < n_tokens, heads < n_heads
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xn
        if IS_MLP:
            units = split * BLOCK_S + tl.arange(0, BLOCK_S)
            unit_ok = units < width
            pre = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
            for k0 in range(0, hidden_size, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_ok[:, None] & (ks[None, :] < hidden_size), other=0.0)
                w = tl.load(w1_ptr + ks[:, None] * stride_w1d + units[None, :] * stride_w1m, mask=(ks[:, None] < hidden_size) & unit_ok[None, :], other=0.0)
                if NATIVE_DOT:  # bf16/fp16 products are exact in the fp32 accumulator
                    pre += tl.dot(x, w)
                else:
                    pre += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            pre += tl.load(b1_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
            act = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))  # exact GELU, as torch.nn.GELU()
            w2 = tl.load(w2_ptr + units[:, None] * stride_w2m + heads[None, :] * stride_w2h, mask=unit_ok[:, None] & head_ok[None, :], other=0.0)
            part = tl.dot(act, w2.to(tl.float32), input_precision="ieee")
        else:
            ks = split * BLOCK_S + tl.arange(0, BLOCK_S)
            x = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_ok[:, None] & (ks[None, :] < hidden_size), other=0.0)
            w = tl.load(w1_ptr + ks[:, None] * stride_w1d + heads[None, :] * stride_w1m, mask=(ks[:, None] < hidden_size) & head_ok[None, :], other=0.0)
            if NATIVE_DOT:
                part = tl.dot(x, w)
            else:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        out = partial_ptr + (split * n_tokens + rows[:, None]).to(tl.int64) * n_heads + heads[None, :]
        tl.store(out, part, mask=row_ok[:, None] & head_ok[None, :])

    @triton.jit
    def _reduce_threshold_kernel(
        partial_ptr, bias_ptr, tau_ptr, scores_ptr, keep_ptr,
        n_tokens, tokens_per_seq, n_heads, n_splits,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """Sum the splits in order, add the last bias, threshold, write ``scores``/``keep`` ``[seq, H, t]``."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        heads = tl.arange(0, BLOCK_H)
        mask = (rows[:, None] < n_tokens) & (heads[None, :] < n_heads)
        offsets = rows[:, None].to(tl.int64) * n_heads + heads[None, :]
        total = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for split in range(0, n_splits):
            total += tl.load(partial_ptr + split * n_tokens * n_heads + offsets, mask=mask, other=0.0)
        total += tl.load(bias_ptr + heads, mask=heads < n_heads, other=0.0).to(tl.float32)[None, :]
        keep = total >= tl.load(tau_ptr + heads, mask=heads < n_heads, other=0.0)[None, :]
        seq, tok = rows // tokens_per_seq, rows % tokens_per_seq
        out = (seq[:, None].to(tl.int64) * n_heads + heads[None, :]) * tokens_per_seq + tok[:, None]
        tl.store(scores_ptr + out, total, mask=mask)
        tl.store(keep_ptr + out, keep.to(tl.uint8), mask=mask)

    @triton.jit
    def _compact_kernel(
        keys_ptr, values_ptr, pos_ptr, scores_ptr, keep_ptr, lengths_ptr,
        out_keys_ptr, out_values_ptr, out_pos_ptr, out_scores_ptr,
        n_kv_heads, capacity, out_capacity, head_dim,
        skv_b, skv_h, skv_n, skv_d, svv_b, svv_h, svv_n, svv_d,
        sp_b, sp_h, sp_n, ss_b, ss_h, ss_n, sk_b, sk_h, sk_n,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (row = b*kv_heads + h, block j): scatter the kept slots of input block j to their compacted
        index (kept count before the block + in-block prefix sum), and fill output slots of block j that are
        past the row's length with padding. Outputs are contiguous ``[b, kv_heads, out_capacity(, d)]``."""
        row, block = tl.program_id(0), tl.program_id(1)
        b, h = row // n_kv_heads, row % n_kv_heads
        keep_row = keep_ptr + b.to(tl.int64) * sk_b + h * sk_h
        before = 0
        for start in range(0, block * BLOCK_N, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            before += tl.sum(tl.load(keep_row + slots * sk_n, mask=slots < capacity, other=0).to(tl.int32))
        slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kept = tl.load(keep_row + slots * sk_n, mask=slots < capacity, other=0).to(tl.int32)
        dest = before + tl.cumsum(kept, 0) - 1
        moving, dims = kept > 0, tl.arange(0, BLOCK_D)
        tile_mask = moving[:, None] & (dims[None, :] < head_dim)
        out_row = row.to(tl.int64) * out_capacity
        out_tile = (out_row + dest[:, None]) * head_dim + dims[None, :]
        src_k = keys_ptr + b.to(tl.int64) * skv_b + h * skv_h + slots[:, None] * skv_n + dims[None, :] * skv_d
        src_v = values_ptr + b.to(tl.int64) * svv_b + h * svv_h + slots[:, None] * svv_n + dims[None, :] * svv_d
        tl.store(out_keys_ptr + out_tile, tl.load(src_k, mask=tile_mask), mask=tile_mask)
        tl.store(out_values_ptr + out_tile, tl.load(src_v, mask=tile_mask), mask=tile_mask)
        src_pos = pos_ptr + b.to(tl.int64) * sp_b + h * sp_h + slots * sp_n
        src_scores = scores_ptr + b.to(tl.int64) * ss_b + h * ss_h + slots * ss_n
        tl.store(out_pos_ptr + out_row + dest, tl.load(src_pos, mask=moving), mask=moving)
        tl.store(out_scores_ptr + out_row + dest, tl.load(src_scores, mask=moving), mask=moving)
        # padding: output slots of this block in [length, out_capacity)
        length = tl.load(lengths_ptr + row)
        padding = (slots >= length) & (slots < out_capacity)
        pad_tile = (out_row + slots[:, None]) * head_dim + dims[None, :]
        pad_mask = padding[:, None] & (dims[None, :] < head_dim)
        zeros = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        tl.store(out_keys_ptr + pad_tile, zeros, mask=pad_mask)
        tl.store(out_values_ptr + pad_tile, zeros, mask=pad_mask)
        tl.store(out_pos_ptr + out_row + slots, tl.full((BLOCK_N,), -1, tl.int64), mask=padding)
        tl.store(out_scores_ptr + out_row + slots, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=padding)


def _device_guard(tensor: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Triton paths
# ----------------------------------------------------------------------------------------------------------


def _pow2(n: int, low: int = 16, high: int | None = None) -> int:
    """``n`` rounded up to a power of two, clamped to ``[low, high]`` (tl.dot needs every dim >= 16)."""
    p = max(low, triton.next_power_of_2(max(1, n)))
    return min(p, high) if high is not None else p


def score_and_threshold_triton(
    hidden: Tensor,
    weights: ScorerWeights,
    tau: float | Tensor,
    *,
    block_t: int | None = None,
    block_s: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton path of :func:`score_and_threshold`; the block sizes default to a heuristic (powers of two >= 16).

    Two launches: ``_scorer_partial_kernel`` over (token blocks x splits of the MLP width, or of D for a linear
    scorer) writes float32 partial sums; ``_reduce_threshold_kernel`` adds them in split order, adds the last
    bias and writes scores and the keep mask. Splitting keeps the GPU busy when t is 1 (decoding).
    """
    _require_triton(hidden, "score_and_threshold_triton")
    tau = _check_scorer_args(hidden, weights, tau)
    *lead, t, d = hidden.shape
    x = hidden.reshape(-1, d)
    n, n_heads = x.shape[0], weights.n_heads
    scores = torch.empty(*lead, n_heads, t, device=hidden.device, dtype=torch.float32)
    keep = torch.empty(*lead, n_heads, t, device=hidden.device, dtype=torch.uint8)
    if n == 0:
        return scores, keep.view(torch.bool)
    w1, w2 = weights.w1, weights.w2
    width = w1.shape[1]
    # Half-precision dots run natively on GPU; Triton's interpreter gets them wrong (3.9), so it takes the
    # upcast path, which computes the same thing.
    native_dot = x.dtype in (torch.bfloat16, torch.float16) and w1.dtype == x.dtype and not INTERPRETED
    # Two pipeline stages of [block_t, block_k] + [block_k, block_s] tiles stay under 64 KiB of shared memory.
    block_t = block_t or _pow2(n, high=64)
    block_k = block_k or _pow2(d, high=64 if native_dot else 32)
    if weights.is_mlp:
        block_s = block_s or (16 if n <= 64 else 64)
        n_splits = triton.cdiv(width, block_s)
    else:
        block_s = block_k = block_s or block_k
        n_splits = triton.cdiv(d, block_s)
    partial = torch.empty(n_splits, n, n_heads, device=hidden.device, dtype=torch.float32)
    w2_args = (w2, w2.stride(0), w2.stride(1)) if weights.is_mlp else (w1, 0, 0)  # w2 unused by the linear branch
    with _device_guard(hidden):
        _scorer_partial_kernel[(triton.cdiv(n, block_t), n_splits)](
            x, w1, weights.b1, w2_args[0], partial,
            n, d, width, n_heads,
            x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w2_args[1], w2_args[2],
            IS_MLP=weights.is_mlp, NATIVE_DOT=native_dot,
            BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_H=_pow2(n_heads), num_stages=2,
        )  # fmt: skip
        reduce_block = _pow2(n, high=128)
        _reduce_threshold_kernel[(triton.cdiv(n, reduce_block),)](
            partial, weights.b2 if weights.is_mlp else weights.b1, tau, scores, keep,
            n, t, n_heads, n_splits,
            BLOCK_T=reduce_block, BLOCK_H=_pow2(n_heads),
        )  # fmt: skip
    return scores, keep.view(torch.bool)


def compact_triton(
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    scores: Tensor,
    keep: Tensor,
    multiple: int = 1,
    *,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton path of :func:`compact`; ``block_n`` (slots per program, a power of two) defaults to 64.

    One launch over (b * kv_heads rows) x (slot blocks); inputs may be strided views (no copies are made).
    """
    _require_triton(keys, "compact_triton")
    _check_cache_layer(keys, values, positions, scores, keep, multiple)
    lengths, out_capacity = _kept_lengths(keep, multiple)
    b, h, capacity, d = keys.shape
    out_keys = keys.new_empty(b, h, out_capacity, d)
    out_values = values.new_empty(b, h, out_capacity, d)
    out_positions = positions.new_empty(b, h, out_capacity)
    out_scores = scores.new_empty(b, h, out_capacity)
    keep_bytes = keep.view(torch.uint8)
    block_n = block_n or 64
    n_blocks = triton.cdiv(max(capacity, out_capacity), block_n)
    if b * h and out_capacity:  # nothing to write otherwise (and empty CUDA tensors have null pointers)
        with _device_guard(keys):
            _compact_kernel[(b * h, n_blocks)](
                keys, values, positions, scores, keep_bytes, lengths,
                out_keys, out_values, out_positions, out_scores,
                h, capacity, out_capacity, d,
                *keys.stride(), *values.stride(), *positions.stride(), *scores.stride(), *keep_bytes.stride(),
                BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
            )  # fmt: skip
    return out_keys, out_values, out_positions, out_scores, lengths


# ----------------------------------------------------------------------------------------------------------
# Public entry points (automatic dispatch)
# ----------------------------------------------------------------------------------------------------------


def score_and_threshold(hidden: Tensor, weights: ScorerWeights, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """Score new tokens with one layer's KVzap scorer and threshold them.

    ``hidden [t, D]`` (or ``[..., t, D]``, e.g. ``[b, t, D]``) is the hidden state entering the attention layer;
    ``tau`` a finite float or a per-head ``[H]`` tensor. Returns ``scores [H, t]`` (``[..., H, t]``) float32
    and ``keep [H, t]`` bool, ``keep = scores >= tau``. Triton when :func:`uses_triton`, torch otherwise.
    """
    path = score_and_threshold_triton if uses_triton(hidden) else score_and_threshold_torch
    return path(hidden, weights, tau)


def compact(
    keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor, keep: Tensor, multiple: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Compact one cache layer: move each row's kept pairs to the front, in order, and shrink the capacity.

    ``keys``/``values [b, kv_heads, cap, d]``, ``positions [b, kv_heads, cap]`` int64 (-1 = empty slot),
    ``scores [b, kv_heads, cap]`` float32, ``keep [b, kv_heads, cap]`` bool (must be False on empty slots).
    Returns ``(keys, values, positions, scores)`` with capacity ``new_cap`` = the longest row's kept count
    rounded up to a multiple of ``multiple``, padding slots holding zeros / -1 / -inf, and
    ``lengths [b, kv_heads]`` int64. Costs one device sync (the new capacity). Triton when :func:`uses_triton`.
    """
    path = compact_triton if uses_triton(keys) else compact_torch
    return path(keys, values, positions, scores, keep, multiple)
