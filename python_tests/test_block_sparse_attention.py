"""Tests for af2_ext.ops.block_sparse_attention against af2_ext.reference.block_sparse_attention_ref.

Each test is written once and parametrised by device (``helpers.DEVICES``; ``helpers.per_device`` where the
devices run different cases, e.g. fp64 on the CPU only); a CUDA case skips, with the reason, without CUDA or
without a CUDA kernel (``helpers.require_device``). Tests named ``_cpu`` / ``_cuda`` check what only that device
does. Tolerances come from helpers.assert_matches only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import helpers
from af2_ext import layouts, ops, reference

OP = "block_sparse_attention_forward"
bsa = ops.block_sparse_attention


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _inputs(device, dtype=torch.float32, *, B=2, H=2, Nq=40, Nk=40, D=16, block_size=16, layout=None, seed=0,
            mask=False, fully_padded=(), bias=None, neg_inf=0.0, empty_rows=(), requires_grad=True) -> dict:
    """Keyword arguments of the op. ``bias`` is None or (Bb, Hb); ``layout`` defaults to a random per-head one."""
    q, k, v = helpers.make_qkv(B, H, Nq, Nk, D, seed=seed, dtype=dtype, device=device, requires_grad=requires_grad)
    if layout is None:
        layout = helpers.random_layout(H, _blocks(Nq, block_size), _blocks(Nk, block_size), seed=seed + 10,
                                       empty_rows=empty_rows)
    kpm = None
    if mask or fully_padded:
        kpm = helpers.make_key_padding_mask(B, Nk, seed=seed + 20, device=device, fully_padded=fully_padded)
    b = None
    if bias is not None:
        b = helpers.make_bias(*bias, Nq, Nk, seed=seed + 30, dtype=dtype, device=device, neg_inf_fraction=neg_inf,
                              requires_grad=requires_grad)
    return dict(q=q, k=k, v=v, layout=layout.to(device), block_size=block_size, key_padding_mask=kpm, bias=b)


def _split(inputs: dict) -> tuple[dict, dict]:
    """(differentiable tensors, the rest)."""
    diff = {name: inputs[name] for name in ("q", "k", "v", "bias")}
    rest = {name: value for name, value in inputs.items() if name not in diff}
    return diff, rest


def _grad_out(inputs: dict, seed: int = 99) -> torch.Tensor:
    q = inputs["q"]
    return helpers.randn(*q.shape, seed=seed, dtype=q.dtype, device=q.device)


def _run_kernel(inputs: dict, *, grads=True, scale=None, impl="kernel") -> tuple[torch.Tensor, dict]:
    diff, rest = _split(inputs)
    return helpers.forward_backward(bsa, diff, _grad_out(inputs) if grads else None, **rest, scale=scale, impl=impl)


def _assert_like_reference(inputs: dict, out: torch.Tensor, grads: dict, *, scale=None, label: str = "") -> None:
    """Compares the op's output and gradients (for grad_out = _grad_out(inputs)) with the reference under the
    tolerance policy; fp16/bf16 also run the low-precision oracle for the rule."""
    diff, rest = _split(inputs)
    dtype = inputs["q"].dtype
    grad_out = _grad_out(inputs) if grads else None
    ref, ref_grads = helpers.forward_backward(reference.block_sparse_attention_ref, diff, grad_out,
                                              dtype=helpers.oracle_dtype(dtype), **rest, scale=scale)
    lowp, lowp_grads = None, {}
    if dtype in helpers.LOW_PRECISION:
        lowp, lowp_grads = helpers.forward_backward(helpers.block_sparse_attention_lowp, diff, grad_out, **rest,
                                                    scale=scale)
    assert out.dtype == dtype and out.device == inputs["q"].device, f"{label}out is {out.dtype} on {out.device}"
    helpers.assert_matches(f"{label}out", out, ref, ref_lowp=lowp)
    assert set(grads) == set(ref_grads), f"{label}gradients {sorted(grads)} != reference {sorted(ref_grads)}"
    for name in grads:
        assert grads[name].dtype == diff[name].dtype, \
            f"{label}grad {name} is {grads[name].dtype}, input {diff[name].dtype}"
        helpers.assert_matches(f"{label}grad {name}", grads[name], ref_grads[name], kind="grad",
                               ref_lowp=lowp_grads.get(name), precision=dtype)


def _check_against_reference(inputs: dict, *, scale=None) -> tuple[torch.Tensor, dict]:
    """Runs the kernel forward and backward (for every input that requires grad) and compares with the
    reference. Returns the kernel's (out, grads)."""
    out, grads = _run_kernel(inputs, scale=scale)
    _assert_like_reference(inputs, out, grads, scale=scale)
    return out, grads


def _assert_runs_equal(inputs: dict, base: dict) -> None:
    """The kernel's output and gradients for ``inputs`` equal those for ``base`` bit for bit."""
    out, grads = _run_kernel(inputs)
    clean_out, clean_grads = _run_kernel(base)
    assert torch.equal(out, clean_out), f"out differs by up to {helpers.max_abs_err(out, clean_out):.3g}"
    for name in grads:
        assert torch.equal(grads[name], clean_grads[name]), f"grad {name} differs"


@pytest.fixture(params=["fused", "two_pass"])
def cpu_backward(request, monkeypatch):
    """Runs a test under each CPU backward plan (AF2_EXT_CPU_BACKWARD): the fused pass wherever it is valid
    (grad_q, grad_k and grad_v wanted, any bias gradient per (batch, head)), and the row and column passes. The
    plan is a CPU choice: a CUDA case runs once."""
    if request.node.callspec.params.get("device") == "cuda" and request.param != "fused":
        pytest.skip("the CPU backward plan does not apply to CUDA")
    monkeypatch.setenv("AF2_EXT_CPU_BACKWARD", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_fp32(device, contiguous, cpu_backward):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=3, Nq=64, Nk=64, D=32, mask=True, bias=(2, 3), seed=1)
    if not contiguous:  # (B, N, H, D) storage seen as (B, H, N, D), as attention modules produce it
        for name in ("q", "k", "v"):
            t = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2)
            inputs[name] = t.requires_grad_()
        assert not inputs["q"].is_contiguous()
    _check_against_reference(inputs)
    _check_against_reference(inputs, scale=0.37)


# fp64 is CPU-only: the CUDA kernels run fp32, fp16 and bf16 (test_fp64_cuda_falls_back).
@pytest.mark.parametrize("device, dtype", helpers.per_device(cpu=[torch.float32, torch.float64],
                                                             cuda=[torch.float32]))
def test_strided_grad_out(device, dtype):
    """A loss whose gradient reaches the op as a broadcast (stride 0) plus a strided slice of it."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, dtype, B=2, H=2, Nq=40, Nk=33, D=16, bias=(1, 2), mask=True, seed=26)
    diff, rest = _split(inputs)

    def loss(fn, compute_dtype, **kwargs):
        leaves = {name: t.detach().to(compute_dtype).requires_grad_() for name, t in diff.items()}
        out = fn(**leaves, **rest, **kwargs)
        (out.sum() + (out.transpose(1, 2)[:, ::3] ** 2).sum()).backward()
        return {name: leaf.grad for name, leaf in leaves.items()}

    grads = loss(bsa, dtype, impl="kernel")
    ref_grads = loss(reference.block_sparse_attention_ref, helpers.oracle_dtype(dtype))
    for name in grads:
        helpers.assert_matches(f"grad {name}", grads[name], ref_grads[name], kind="grad")


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", helpers.LOW_PRECISION, ids=str)
def test_low_precision(device, dtype):
    helpers.require_device(device, OP)
    inputs = _inputs(device, dtype, B=2, H=2, Nq=77, Nk=50, D=64, block_size=32, mask=True, bias=(1, 2),
                     neg_inf=0.05, seed=2)
    _check_against_reference(inputs)


def test_fp64_cpu():  # fp64 is CPU-only
    inputs = _inputs("cpu", torch.float64, B=2, H=2, Nq=50, Nk=45, D=16, mask=True, bias=(2, 1), seed=3)
    _check_against_reference(inputs)


# Every block size and every head dim once, not the cross product.
BLOCK_SIZE_HEAD_DIM = [(16, 128), (32, 16), (64, 32), (128, 64)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("block_size, D", BLOCK_SIZE_HEAD_DIM)
def test_block_size_head_dim(device, block_size, D):
    helpers.require_device(device, OP)
    Nq, Nk = 2 * block_size + 3, block_size + 5  # partial tail blocks, Nq != Nk
    inputs = _inputs(device, B=1, H=2, Nq=Nq, Nk=Nk, D=D, block_size=block_size, mask=True, bias=(1, 2), seed=4)
    _check_against_reference(inputs)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("block_size, D", BLOCK_SIZE_HEAD_DIM)
def test_bf16_block_size_head_dim(device, block_size, D):
    """bf16 at every block size and head dim (on a CPU with AVX512-BF16: the bf16 dot-product kernel), odd
    lengths (an odd number of keys leaves the last key pair half empty), a padded key and a row with no key."""
    helpers.require_device(device, OP)
    Nq, Nk = 2 * block_size + 3, block_size + 5
    inputs = _inputs(device, torch.bfloat16, B=2, H=2, Nq=Nq, Nk=Nk, D=D, block_size=block_size, mask=True,
                     fully_padded=(1,), bias=(1, 2), neg_inf=0.05, empty_rows=(1,), seed=64)
    _check_against_reference(inputs)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("bias", [(1, 2), (2, 2)], ids=["shared_bias", "bias_per_head"])
def test_bf16_keys_longer(device, bias, cpu_backward):
    """bf16 with more keys than queries (the CPU's fused backward then runs keys outer), a padded key, a row with no
    key, a bias shared by the batch (its gradient through ordered partial sums) or one per (batch row, head)."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, torch.bfloat16, B=2, H=2, Nq=37, Nk=101, D=32, block_size=16, mask=True,
                     fully_padded=(1,), bias=bias, empty_rows=(1,), seed=66)
    _check_against_reference(inputs)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bf16_odd_row_strides(device):
    """bf16 q, k, v whose rows are an odd number of elements apart (views of wider NaN-filled storage): the
    results equal the contiguous run bit for bit (the CPU bf16 kernel reads k in 32-bit pairs: such a k is copied)."""
    helpers.require_device(device, OP)
    base = _inputs(device, torch.bfloat16, B=2, H=1, Nq=40, Nk=33, D=32, mask=True, bias=(1, 1), seed=65)
    inputs = dict(base)
    for name in ("q", "k", "v"):
        t = base[name].detach()
        storage = torch.full((*t.shape[:3], t.shape[3] + 1), NAN, dtype=t.dtype, device=device)
        view = storage[..., :t.shape[3]]
        view.copy_(t)
        assert view.stride(2) % 2 == 1
        inputs[name] = view.requires_grad_()
    _assert_runs_equal(inputs, base)


LENGTHS = [(1, 1), (17, 50), (50, 17), (33, 33), (100, 7)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("Nq, Nk", LENGTHS)
def test_lengths(device, Nq, Nk, cpu_backward):
    helpers.require_device(device, OP)
    _check_against_reference(_inputs(device, B=2, H=2, Nq=Nq, Nk=Nk, D=16, mask=True, bias=(2, 2), seed=5))


PARTIAL_GRADS = [("q",), ("k",), ("v",), ("bias",), ("q", "bias"), ("k", "v"), ("q", "k", "v")]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("wanted", PARTIAL_GRADS, ids="+".join)
def test_partial_grads(device, wanted, cpu_backward):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=33, D=16, bias=(1, 2), mask=True, seed=23)
    for name in ("q", "k", "v", "bias"):
        inputs[name] = inputs[name].detach().requires_grad_(name in wanted)
    _, grads = _check_against_reference(inputs)
    assert set(grads) == set(wanted), f"asked for gradients of {wanted}, got {sorted(grads)}"


# A bias in a wider floating dtype than q (the gradient comes back in the bias' dtype, as accurate as q's).
BIAS_DTYPES = [(torch.float16, torch.float32), (torch.float32, torch.float64)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype, bias_dtype", BIAS_DTYPES, ids=str)
def test_bias_dtype(device, dtype, bias_dtype):
    helpers.require_device(device, OP)
    inputs = _inputs(device, dtype, B=2, H=2, Nq=40, Nk=33, D=16, bias=(1, 2), mask=True, seed=24)
    inputs["bias"] = inputs["bias"].detach().to(bias_dtype).requires_grad_()
    _, grads = _check_against_reference(inputs)
    assert grads["bias"].dtype == bias_dtype, f"grad bias is {grads['bias'].dtype}, bias is {bias_dtype}"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_large_logits(device):
    """Logits in the hundreds: exp must not overflow (the softmax is shifted by the running max)."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=33, D=16, bias=(1, 2), mask=True, seed=25)
    inputs["q"] = (inputs["q"].detach() * 30).requires_grad_()
    inputs["bias"] = (inputs["bias"].detach() * 50).requires_grad_()
    _check_against_reference(inputs)


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------

N_LAYOUT, H_LAYOUT, BS_LAYOUT = 123, 2, 16  # 8 blocks of 16, the last one partial
NB_LAYOUT = _blocks(N_LAYOUT, BS_LAYOUT)


def _element_mask() -> torch.Tensor:
    """(H, N, N) element mask for from_mask: a band of +-20 tokens, per-head shifted, plus token 0 global."""
    i = torch.arange(N_LAYOUT)
    heads = [((i[:, None] - i[None, :] - 7 * h).abs() <= 20) | (i[None, :] == 0) for h in range(H_LAYOUT)]
    return torch.stack(heads)


LAYOUT_BUILDERS = {
    "dense": lambda: layouts.dense(NB_LAYOUT, num_heads=H_LAYOUT),
    "local": lambda: layouts.local(NB_LAYOUT, window=3, num_heads=1),
    "bigbird": lambda: layouts.bigbird(NB_LAYOUT, window=3, num_global=1, num_random=1, num_heads=H_LAYOUT, seed=3),
    "fixed": lambda: layouts.fixed(NB_LAYOUT, num_local_blocks=4, num_global_blocks=1,
                                   num_different_global_patterns=2, num_heads=H_LAYOUT),
    "variable": lambda: layouts.variable(NB_LAYOUT, local_window_blocks=(2, 3), global_block_indices=(0, 5),
                                         num_random_blocks=1, horizontal_global_attention=True, seed=4),
    "seed_default": lambda: layouts.seed_default(N_LAYOUT, block_size=BS_LAYOUT, num_heads=H_LAYOUT, seed=5),
    "from_mask": lambda: layouts.from_mask(_element_mask(), BS_LAYOUT),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("name", sorted(LAYOUT_BUILDERS))
def test_layout_builder(device, name):
    helpers.require_device(device, OP)
    layout = LAYOUT_BUILDERS[name]()
    assert layout.shape[1:] == (NB_LAYOUT, NB_LAYOUT), f"{name} layout shape {tuple(layout.shape)}"
    inputs = _inputs(device, B=1, H=H_LAYOUT, Nq=N_LAYOUT, Nk=N_LAYOUT, D=32, block_size=BS_LAYOUT, layout=layout,
                     mask=True, seed=6)
    _check_against_reference(inputs)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_shared_vs_per_head_layout(device):
    helpers.require_device(device, OP)
    H = 3
    shared = helpers.random_layout(1, 4, 3, seed=7)
    inputs = _inputs(device, B=2, H=H, Nq=60, Nk=40, D=16, layout=shared, bias=(1, H), seed=7)
    out_shared, grads_shared = _check_against_reference(inputs)
    # The same layout given once per head is the same computation.
    out_repeated, grads_repeated = _run_kernel({**inputs, "layout": shared.expand(H, -1, -1).contiguous().to(device)})
    assert torch.equal(out_shared, out_repeated), "a 1-head layout and the same layout repeated per head differ"
    for name in grads_shared:
        assert torch.equal(grads_shared[name], grads_repeated[name]), f"grad {name}: 1-head vs repeated layout"

    # Heads with different layouts: head h must be the op run on head h alone with layout[h].
    per_head = helpers.random_layout(H, 4, 3, seed=8, density=0.4)
    assert not (torch.equal(per_head[0], per_head[1]) and torch.equal(per_head[1], per_head[2]))
    inputs = {**inputs, "layout": per_head.to(device)}
    out, grads = _check_against_reference(inputs)
    for h in range(H):
        alone = {name: (t[:, h:h + 1].detach() if name in ("q", "k", "v", "bias") else t)
                 for name, t in inputs.items()}
        alone["layout"] = per_head[h:h + 1].to(device)
        out_h = bsa(**alone, impl="kernel")
        helpers.assert_matches(f"head {h} alone vs in the batch of heads", out[:, h:h + 1], out_h)
        # Another head's (different) layout on head h's data gives something else: the match is specific.
        for g in range(H):
            if not torch.equal(per_head[g], per_head[h]):
                out_hg = bsa(**{**alone, "layout": per_head[g:g + 1].to(device)}, impl="kernel")
                assert helpers.max_abs_err(out_hg, out_h) > 1e-3, \
                    f"layouts of heads {g} and {h} differ but give the same output: test is vacuous"


# ----------------------------------------------------------------------------------------------------------
# Empty rows, padding, bias
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_rows_and_fully_padded(device, dtype, cpu_backward):
    helpers.require_device(device, OP)
    bs, Nq, Nk = 16, 70, 45  # query blocks 0..4, the last partial
    empty_blocks, padded_batch = (0, 2, 4), 1
    inputs = _inputs(device, dtype, B=3, H=2, Nq=Nq, Nk=Nk, D=32, block_size=bs, bias=(3, 2), seed=9,
                     mask=True, fully_padded=(padded_batch,), empty_rows=empty_blocks)
    out, grads = _check_against_reference(inputs)
    for name, t in (("out", out), *((f"grad {n}", g) for n, g in grads.items())):
        helpers.assert_finite(name, t)
    empty_q = torch.zeros(Nq, dtype=torch.bool)
    for blk in empty_blocks:
        empty_q[blk * bs:(blk + 1) * bs] = True
    empty_q = empty_q.to(device)

    def assert_zero(name, t):
        assert t.numel() > 0 and torch.count_nonzero(t) == 0, \
            f"{name} must be exactly zero, got {int(torch.count_nonzero(t))} non-zeros (max |x| {t.abs().max()})"

    assert_zero("out of query rows with an empty layout row", out[:, :, empty_q])
    assert_zero("grad q of query rows with an empty layout row", grads["q"][:, :, empty_q])
    assert_zero("grad bias of query rows with an empty layout row", grads["bias"][:, :, empty_q])
    assert_zero("out of the fully padded batch row", out[padded_batch])
    for name in ("q", "k", "v", "bias"):
        assert_zero(f"grad {name} of the fully padded batch row", grads[name][padded_batch])
    assert torch.count_nonzero(out[0][:, ~empty_q]) > 0, "visible rows must not be zero (test is vacuous)"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_all_empty_layout(device):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=24, D=16, bias=(1, 1), seed=10,
                     layout=torch.zeros(2, 3, 2, dtype=torch.bool))
    out, grads = _run_kernel(inputs)
    assert torch.count_nonzero(out) == 0, "an all-False layout must give a zero output"
    for name, g in grads.items():
        helpers.assert_finite(f"grad {name}", g)
        assert torch.count_nonzero(g) == 0, f"an all-False layout must give zero grad {name}"


BIAS_SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]  # (Bb, Hb) for B=4, H=2


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("Bb, Hb", BIAS_SHAPES)
def test_bias_broadcast(device, Bb, Hb, cpu_backward):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=4, H=2, Nq=40, Nk=33, D=16, bias=(Bb, Hb), mask=True, seed=11)
    _, grads = _check_against_reference(inputs)
    assert grads["bias"].shape == (Bb, Hb, 40, 33)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_neg_inf(device, dtype, cpu_backward):
    helpers.require_device(device, OP)
    inputs = _inputs(device, dtype, B=2, H=2, Nq=50, Nk=40, D=16, bias=(2, 1), neg_inf=0.3, seed=12)
    bias = inputs["bias"].detach().clone()
    bias[0, 0, 5] = -torch.inf  # query row 5 of batch 0 sees nothing through the bias alone
    bias[1, 0, :, 3] = -torch.inf  # key 3 of batch 1 is masked for every query
    inputs["bias"] = bias.requires_grad_()
    out, grads = _check_against_reference(inputs)
    assert torch.count_nonzero(out[0, :, 5]) == 0, "a query row whose bias is all -inf must be zero"
    assert torch.count_nonzero(grads["q"][0, :, 5]) == 0, "grad q of a query row whose bias is all -inf"
    assert torch.count_nonzero(grads["k"][1, :, 3]) == 0 and torch.count_nonzero(grads["v"][1, :, 3]) == 0, \
        "grad k and v of a key masked by -inf bias must be zero"
    neg_inf = torch.isneginf(bias)
    assert torch.count_nonzero(grads["bias"][neg_inf]) == 0, "grad bias must be zero where the bias is -inf"


# ----------------------------------------------------------------------------------------------------------
# Determinism, gradcheck, opcheck, torch.compile, impl choice
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, dtype", helpers.per_device(cpu=[torch.float32, torch.bfloat16],
                                                             cuda=[torch.float32]))
@pytest.mark.parametrize("bias", [(1, 1), (4, 4)], ids=["shared_bias", "bias_per_head"])
def test_determinism(device, dtype, bias):
    """Repeated runs are bitwise equal; on the CPU also with a different number of threads (bf16: the bf16
    dot-product kernels where the CPU has them)."""
    helpers.require_device(device, OP)
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads, default_threads, 1] if device == "cpu" else [1, 1]
    # (1, 1): every batch row and head shares one bias, the bias gradient sums over all of them (the CPU's two
    # passes); (4, 4): a bias per (batch row, head) (the CPU's fused pass).
    inputs = _inputs(device, dtype, B=4, H=4, Nq=96, Nk=80, D=32, bias=bias, mask=True, seed=13)
    runs = []
    for threads in thread_counts:
        with helpers.num_threads(threads):
            runs.append((threads, _run_kernel(inputs)))
    (t0, (out0, grads0)), rest = runs[0], runs[1:]
    for threads, (out, grads) in rest:
        assert torch.equal(out, out0), f"out differs between runs ({t0} and {threads} threads)"
        for name in ("bias", "q", "k", "v"):
            diff = (grads[name] - grads0[name]).abs().max()
            assert torch.equal(grads[name], grads0[name]), \
                f"grad {name} differs between runs ({t0} and {threads} threads): max |diff| {diff}"


GRADCHECK_CASES = {
    # per-head layout with an empty row, bias shared over the batch, a fully padded batch row
    "bias_mask": dict(B=2, H=2, Nq=17, Nk=18, layout=torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]]).bool(),
                      bias=(1, 2), mask=True, fully_padded=(1,)),
    # one shared layout, Nq != Nk, bias per batch row and shared over heads, custom scale
    "shared_layout": dict(B=2, H=2, Nq=17, Nk=33, layout=torch.tensor([[[1, 0, 1], [0, 1, 1]]]).bool(),
                          bias=(2, 1), mask=True, scale=0.3),
    # a bias per (batch row, head), which the fused CPU pass differentiates; more keys than queries, and more
    # queries than keys (the fused pass's two loop orders)
    "bias_per_head_keys_longer": dict(B=2, H=2, Nq=17, Nk=40, bias=(2, 2), mask=True),
    "bias_per_head_queries_longer": dict(B=2, H=2, Nq=40, Nk=17, bias=(2, 2), mask=True, fully_padded=(1,)),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_fp64_cpu(case, cpu_backward):  # fp64 is CPU-only
    kwargs = dict(GRADCHECK_CASES[case])
    scale = kwargs.pop("scale", None)
    inputs = _inputs("cpu", torch.float64, D=16, seed=14, **kwargs)
    diff, rest = _split(inputs)

    def fn(q, k, v, bias):
        return bsa(q, k, v, **rest, bias=bias, scale=scale, impl="kernel")

    # Full (not fast_mode) gradcheck: fast mode misses a 0.1% error in one gradient entry. One thread: these
    # thousands of tiny calls are fastest, and least hurt by a busy machine, without a thread pool.
    with helpers.num_threads(1):
        assert torch.autograd.gradcheck(fn, (diff["q"], diff["k"], diff["v"], diff["bias"]), eps=1e-6, atol=1e-7,
                                        rtol=1e-5)


def _opcheck_samples(device):
    samples = []
    for kwargs in (
        dict(B=1, H=2, Nq=40, Nk=24, D=16, empty_rows=(1,)),
        dict(B=2, H=2, Nq=33, Nk=33, D=32, block_size=32, mask=True, bias=(1, 2)),
        dict(B=2, H=1, Nq=20, Nk=50, D=16, mask=True, fully_padded=(0,), bias=(2, 1), requires_grad=False,
             layout=torch.tensor([[[1, 0, 1, 1], [0, 0, 0, 0]]]).bool()),
    ):
        inputs = _inputs(device, seed=15, **kwargs)
        index = ops.layout_index(inputs["layout"])
        samples.append((inputs["q"], inputs["k"], inputs["v"], *index, inputs["block_size"],
                        inputs["key_padding_mask"], inputs["bias"], 0.25))
    return samples


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck(device):
    helpers.require_device(device, OP)
    helpers.assert_opcheck(torch.ops.af2_ext.block_sparse_attention_forward.default, _opcheck_samples(device))


@pytest.mark.slow
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_torch_compile(device):
    helpers.require_device(device, OP)
    torch._dynamo.reset()
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=33, D=16, bias=(1, 2), mask=True, seed=16)
    diff, rest = _split(inputs)

    def attention(q, k, v, bias):
        return bsa(q, k, v, rest["layout"], block_size=16, key_padding_mask=rest["key_padding_mask"], bias=bias,
                   impl="kernel")

    compiled = torch.compile(attention, fullgraph=True)
    grad_out = _grad_out(inputs)
    eager_out, eager_grads = helpers.forward_backward(attention, diff, grad_out)
    out, grads = helpers.forward_backward(compiled, diff, grad_out)
    helpers.assert_matches("compiled out vs eager", out, eager_out)
    for name in eager_grads:
        helpers.assert_matches(f"compiled grad {name} vs eager", grads[name], eager_grads[name], kind="grad")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_impl_choice(device):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=2, Nq=45, Nk=40, D=32, bias=(2, 2), mask=True, seed=17)
    kernel_out, kernel_grads = _run_kernel(inputs, impl="kernel")
    ref_out, ref_grads = _run_kernel(inputs, impl="reference")
    helpers.assert_matches("impl='kernel' vs impl='reference' out", kernel_out, ref_out)
    for name in kernel_grads:
        helpers.assert_matches(f"impl='kernel' vs impl='reference' grad {name}", kernel_grads[name],
                               ref_grads[name], kind="grad")
    auto_out, _ = _run_kernel(inputs, grads=False, impl="auto")
    assert torch.equal(auto_out, kernel_out), "impl='auto' must run the kernel where one is registered"
    with ops.use_impl("reference"):
        default_out, _ = _run_kernel(inputs, grads=False, impl=None)
    assert torch.equal(default_out, ref_out), "use_impl('reference') must make impl=None run the reference"


# ----------------------------------------------------------------------------------------------------------
# CPU instruction-set variants (AF2_EXT_CPU_ISA lowers the dispatch; it is read once per process)
# ----------------------------------------------------------------------------------------------------------

ISA_RANK = {"generic": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3}
ISA_CHILD = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import test_block_sparse_attention as t
cases = {
    "fp32": t._inputs("cpu", torch.float32, B=2, H=2, Nq=45, Nk=37, D=32, mask=True, fully_padded=(1,),
                      bias=(1, 2), neg_inf=0.1, empty_rows=(1,), seed=18),
    "fp64": t._inputs("cpu", torch.float64, B=1, H=2, Nq=40, Nk=70, D=16, block_size=32, bias=(1, 1), seed=19),
    "bf16": t._inputs("cpu", torch.bfloat16, B=1, H=2, Nq=64, Nk=64, D=64, block_size=64, mask=True, seed=20),
    "fp32_bs128": t._inputs("cpu", torch.float32, B=1, H=1, Nq=130, Nk=40, D=128, block_size=128, bias=(1, 1),
                            seed=21),
}
results = {}
for name, inputs in cases.items():
    out, grads = t._run_kernel(inputs)
    results[name] = (inputs, out, grads)
torch.save({"isa": torch.ops.af2_ext.cpu_isa(), "results": results}, sys.argv[2])
"""


@pytest.mark.slow
def test_isa_variants_cpu(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    native = ops.cpu_isa()
    children = {}
    for isa in ("avx512", "avx2", "generic"):  # at once: most of the time is interpreter start-up
        env = {**os.environ, "AF2_EXT_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
        path = tmp_path / f"{isa}.pt"
        proc = subprocess.Popen([sys.executable, "-c", ISA_CHILD, tests_dir, str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children[isa] = (proc, path)
    for isa, (proc, path) in children.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"AF2_EXT_CPU_ISA={isa} child failed (rc {proc.returncode}):\n{output}"
        saved = torch.load(path, weights_only=False)
        assert ISA_RANK[saved["isa"]] <= ISA_RANK[isa], f"asked for {isa}, cpu_isa() reports {saved['isa']}"
        if "AF2_EXT_CPU_ISA" not in os.environ:  # then this process reports the native ISA
            expected = min(isa, native, key=ISA_RANK.get)
            assert saved["isa"] == expected, f"asked for {isa} on a {native} CPU, cpu_isa() reports {saved['isa']}"
        for case, (inputs, out, grads) in saved["results"].items():
            _assert_like_reference(inputs, out, grads, label=f"[AF2_EXT_CPU_ISA={isa}, {case}] ")


# ----------------------------------------------------------------------------------------------------------
# Bad input: errors that name the argument
# ----------------------------------------------------------------------------------------------------------


def _replace(**changes):
    """A mutation of the base inputs (B=2, H=2, Nq=Nk=32, D=16, block 16): name -> f(inputs, other_device)."""

    def mutate(inputs, other):
        for name, change in changes.items():
            inputs[name] = change(inputs, other)

    return mutate


def _qkv(d, dtype=torch.float32):
    return lambda inputs, other: helpers.randn(2, 2, 32, d, seed=0, dtype=dtype, device=inputs["q"].device)


BAD_INPUTS = {
    "q_rank": (_replace(q=lambda i, o: i["q"][0]), r"q must be \(B, H, Nq, D\)"),
    "k_rank": (_replace(k=lambda i, o: i["k"][None]), r"k must be \(B, H, Nk, D\)"),
    "v_rank": (_replace(v=lambda i, o: i["v"][0]), r"v must be \(B, H, Nk, D\)"),
    "k_batch": (_replace(k=lambda i, o: i["k"][:1], v=lambda i, o: i["v"][:1]), r"k must be \(B=2, H=2, Nk, D=16\)"),
    "k_heads": (_replace(k=lambda i, o: i["k"][:, :1], v=lambda i, o: i["v"][:, :1]), r"k must be \(B=2, H=2"),
    "k_head_dim": (_replace(k=_qkv(32), v=_qkv(32)), r"k must be \(B=2, H=2, Nk, D=16\)"),
    "v_shape": (_replace(v=lambda i, o: i["v"][:, :, :-1]), r"v must have k's shape"),
    "k_dtype": (_replace(k=lambda i, o: i["k"].double()), r"k and v must have q's dtype"),
    "v_dtype": (_replace(v=lambda i, o: i["v"].half()), r"k and v must have q's dtype"),
    "int32": (_replace(q=_qkv(16, torch.int32), k=_qkv(16, torch.int32), v=_qkv(16, torch.int32)),
              r"q must be float32, float16 or bfloat16"),
    "head_dim_48": (_replace(q=_qkv(48), k=_qkv(48), v=_qkv(48)), r"head dim D \(q.size\(-1\)\) must be .* got 48"),
    "block_size_8": (_replace(block_size=lambda i, o: 8), r"block_size must be 16, 32, 64 or 128, got 8"),
    "block_size_24": (_replace(block_size=lambda i, o: 24), r"block_size must be 16, 32, 64 or 128, got 24"),
    "block_size_256": (_replace(block_size=lambda i, o: 256), r"block_size must be 16, 32, 64 or 128, got 256"),
    "layout_blocks": (_replace(layout=lambda i, o: i["layout"][:, :1]), r"layout must be \(1 or H=2"),
    "layout_heads": (_replace(layout=lambda i, o: i["layout"][:1].expand(3, -1, -1)), r"layout must be \(1 or H=2"),
    "layout_rank": (_replace(layout=lambda i, o: i["layout"][0]), r"layout must be \(1 or H=2"),
    "layout_dtype": (_replace(layout=lambda i, o: i["layout"].to(torch.uint8)), r"layout must be a bool tensor"),
    "mask_dtype": (_replace(key_padding_mask=lambda i, o: i["key_padding_mask"].float()),
                   r"key_padding_mask must be bool"),
    "mask_keys": (_replace(key_padding_mask=lambda i, o: i["key_padding_mask"][:, :-1]),
                  r"key_padding_mask must be \(B=2, Nk=32\)"),
    "mask_batch": (_replace(key_padding_mask=lambda i, o: i["key_padding_mask"][:1]),
                   r"key_padding_mask must be \(B=2, Nk=32\)"),
    "bias_dtype": (_replace(bias=lambda i, o: i["bias"].to(torch.int32)), r"bias must be a floating tensor"),
    "bias_queries": (_replace(bias=lambda i, o: i["bias"][:, :, :-1]), r"bias must be \(Bb, 1 or H=2, Nq=32, Nk=32\)"),
    "bias_batch_3": (_replace(bias=lambda i, o: i["bias"][:1].expand(3, -1, -1, -1)), r"bias must be \(Bb, 1 or H=2"),
    "bias_heads_3": (_replace(bias=lambda i, o: i["bias"][:, :1].expand(-1, 3, -1, -1)), r"bias must be \(Bb, 1 or H=2"),
    "bias_rank": (_replace(bias=lambda i, o: i["bias"][0]), r"bias must be \(Bb, 1 or H=2"),
    "kv_device": (_replace(k=lambda i, o: i["k"].to(o), v=lambda i, o: i["v"].to(o)), r"k and v must be on q's device"),
    "layout_device": (_replace(layout=lambda i, o: i["layout"].to(o)), r"layout must be on q's device"),
    "mask_device": (_replace(key_padding_mask=lambda i, o: i["key_padding_mask"].to(o)),
                    r"key_padding_mask must be on q's device"),
    "bias_device": (_replace(bias=lambda i, o: i["bias"].to(o)), r"bias must be on q's device"),
    "q_not_tensor": (_replace(q=lambda i, o: i["q"].tolist()), r"q must be a torch.Tensor"),
    "empty": (_replace(q=lambda i, o: i["q"][:, :, :0], layout=lambda i, o: i["layout"][:, :0],
                       bias=lambda i, o: i["bias"][:, :, :0]), r"q and k must be non-empty"),
}


def _bad_base(device) -> dict:
    return _inputs(device, B=2, H=2, Nq=32, Nk=32, D=16, mask=True, bias=(2, 2), requires_grad=False, seed=21)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(device, case):
    helpers.require_device(device, OP)
    mutate, match = BAD_INPUTS[case]
    inputs = _bad_base(device)
    mutate(inputs, helpers.other_device(device))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bsa(**inputs, impl="kernel")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bad_impl(device):
    helpers.require_device(device, OP)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        bsa(**_bad_base(device), impl="fast")


def _forward_args(inputs: dict) -> dict:
    """Keyword arguments of torch.ops.af2_ext.block_sparse_attention_forward for the op's inputs."""
    row_count, row_index, col_count, col_index = ops.layout_index(inputs["layout"])
    return dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], row_count=row_count, row_index=row_index,
                col_count=col_count, col_index=col_index, block_size=inputs["block_size"],
                key_padding_mask=inputs["key_padding_mask"], bias=inputs["bias"], scale=0.25)


# The C++ binding's own checks, reached by calling the registered op directly (no Python checks on the way).
BAD_OP_INPUTS = {
    name: BAD_INPUTS[name] for name in ("q_rank", "k_batch", "v_shape", "k_dtype", "int32", "head_dim_48",
                                        "block_size_24", "mask_dtype", "mask_keys", "bias_dtype", "bias_queries",
                                        "bias_heads_3")
}
BAD_INDEX = {
    "row_count_dtype": (lambda a: a.update(row_count=a["row_count"].long()), r"row_count and row_index must be int32"),
    "row_index_shape": (lambda a: a.update(row_index=a["row_index"][:, :, :1]), r"row_index must be \(2, 2, 2\)"),
    "col_count_heads": (lambda a: a.update(col_count=a["col_count"][:1], col_index=a["col_index"][:1]),
                        r"col_count must have row_count's layout heads"),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("case", list(BAD_OP_INPUTS) + list(BAD_INDEX))
def test_bad_op_input(device, case):
    helpers.require_device(device, OP)
    if case in BAD_OP_INPUTS:
        mutate, match = BAD_OP_INPUTS[case]
        inputs = _bad_base(device)
        mutate(inputs, helpers.other_device(device))
        args = _forward_args(inputs)
    else:
        corrupt, match = BAD_INDEX[case]
        args = _forward_args(_bad_base(device))
        corrupt(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.af2_ext.block_sparse_attention_forward.default(**args)


# A corrupt layout index must be rejected by the op, never read out of bounds. Base layout: H=2, 3 x 2 blocks.
def _set(name, position, value):
    def corrupt(args):
        t = args[name].clone()
        t[position] = value
        args[name] = t

    return corrupt


def _chain(*corruptions):
    def corrupt(args):
        for c in corruptions:
            c(args)

    return corrupt


CORRUPT_ROW_INDEX = {
    "count_above_blocks": _set("row_count", (0, 0), 3),
    "count_negative": _set("row_count", (1, 2), -1),
    "index_out_of_range": _chain(_set("row_count", (0, 1), 1), _set("row_index", (0, 1, 0), 2)),
    "index_negative": _chain(_set("row_count", (0, 1), 1), _set("row_index", (0, 1, 0), -1)),
    "index_huge": _chain(_set("row_count", (1, 0), 1), _set("row_index", (1, 0, 0), 2 ** 30)),
    "descending": _chain(_set("row_count", (0, 2), 2), _set("row_index", (0, 2), torch.tensor([1, 0]))),
    "repeated": _chain(_set("row_count", (0, 2), 2), _set("row_index", (0, 2), torch.tensor([1, 1]))),
}


def _corrupt_base(device) -> dict:
    layout = torch.tensor([[[1, 0], [0, 1], [1, 1]], [[1, 1], [0, 1], [1, 0]]]).bool()
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=20, D=16, mask=True, bias=(1, 2), requires_grad=False, seed=22,
                     layout=layout)
    return _forward_args(inputs)


@pytest.mark.parametrize("case", list(CORRUPT_ROW_INDEX))
def test_corrupt_row_index_cpu(case):
    args = _corrupt_base("cpu")
    CORRUPT_ROW_INDEX[case](args)
    with pytest.raises(RuntimeError, match=r"row_index"):
        torch.ops.af2_ext.block_sparse_attention_forward.default(**args)


# On CUDA the raw op trusts its index: validating it would cost a host sync on every call, and the public op
# builds the index itself (ops.layout_index). The kernels still never read through an entry out of range: such
# calls complete without a memory error (compute-sanitizer's memcheck checks the same in cuda_tests).
MEMORY_SAFE_CASES = ["count_negative", "count_above_blocks", "index_out_of_range", "index_negative", "index_huge"]


@pytest.mark.parametrize("case", MEMORY_SAFE_CASES)
def test_corrupt_row_index_memory_safe_cuda(case):
    helpers.require_device("cuda", OP)
    args = _corrupt_base("cuda")
    CORRUPT_ROW_INDEX[case](args)
    out, lse = torch.ops.af2_ext.block_sparse_attention_forward.default(**args)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "a skipped entry must not bring garbage into the output"


CORRUPT_COL_INDEX = {  # col_count is (2, 2), col_index (2, 2, 3)
    "count_above_blocks": _set("col_count", (0, 0), 4),
    "index_out_of_range": _chain(_set("col_count", (0, 0), 1), _set("col_index", (0, 0, 0), 3)),
    "repeated": _chain(_set("col_count", (1, 0), 2), _set("col_index", (1, 0), torch.tensor([2, 2, 1]))),
}


@pytest.mark.parametrize("case", list(CORRUPT_COL_INDEX))
def test_corrupt_col_index_backward_cpu(case):
    args = _corrupt_base("cpu")
    out, lse = torch.ops.af2_ext.block_sparse_attention_forward.default(**args)
    CORRUPT_COL_INDEX[case](args)
    with pytest.raises(RuntimeError, match=r"col_index"):
        torch.ops.af2_ext.block_sparse_attention_backward.default(
            torch.ones_like(out), args["q"], args["k"], args["v"], out, lse, args["row_count"], args["row_index"],
            args["col_count"], args["col_index"], args["block_size"], args["key_padding_mask"], args["bias"],
            args["scale"], [True, True, True, True])


# ----------------------------------------------------------------------------------------------------------
# Layout index cache, fake-kernel checks, ISA override warning
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_layout_edit_in_place(device):
    helpers.require_device(device, OP)
    inputs = _inputs(device, layout=layouts.dense(3, num_heads=2), requires_grad=False)
    before = bsa(**inputs)
    inputs["layout"][:, :, 1:] = False  # an in-place edit must not reuse the cached block index
    after = bsa(**inputs)
    expected = reference.block_sparse_attention_ref(**inputs)
    helpers.assert_matches("output after the layout was edited in place", after, expected)
    assert not torch.allclose(before, after), "editing the layout in place did not change the output"


def test_fake_kernel_checks_index():
    """Under FakeTensorMode (torch.compile's tracing) a bad block index fails with the C++ binding's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = _inputs("cpu", requires_grad=False)
    row_count, row_index, col_count, col_index = ops.layout_index(inputs["layout"])
    bad_row_index = row_index[:, :, :1].contiguous()
    with FakeTensorMode() as mode:
        q, k, v = (mode.from_tensor(inputs[n]) for n in ("q", "k", "v"))
        bad_index = mode.from_tensor(bad_row_index)
        with pytest.raises(RuntimeError, match="row_index must be"):
            torch.ops.af2_ext.block_sparse_attention_forward(q, k, v, mode.from_tensor(row_count), bad_index,
                                                             mode.from_tensor(col_count), mode.from_tensor(col_index),
                                                             16, None, None, 0.25)


def test_unknown_cpu_isa_warns():
    code = "import warnings; warnings.simplefilter('error'); import af2_ext"
    env = {**os.environ, "AF2_EXT_CPU_ISA": "avx9000"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "AF2_EXT_CPU_ISA='avx9000' is not one of" in proc.stderr, proc.stderr[-2000:]


def test_compile_reduce_overhead_cuda():
    """CUDA graphs capture the op on a side stream: it must launch on the current stream, not the default one."""
    helpers.require_device("cuda", OP)
    inputs = _inputs("cuda", requires_grad=False, B=2, H=2, Nq=45, Nk=37, D=32, bias=(1, 2), mask=True)
    layout, kpm, bias = inputs["layout"], inputs["key_padding_mask"], inputs["bias"]
    expected = reference.block_sparse_attention_ref(**inputs)

    def attend(q, k, v):
        return bsa(q, k, v, layout, block_size=inputs["block_size"], key_padding_mask=kpm, bias=bias)

    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(4):  # warm-up, recording, then replays of the CUDA graph
            out = compiled(inputs["q"], inputs["k"], inputs["v"]).clone()
    torch.cuda.current_stream().wait_stream(stream)
    helpers.assert_matches("reduce-overhead output", out, expected)


# ----------------------------------------------------------------------------------------------------------
# Real shapes: batch x heads beyond the 65,535 of a CUDA grid's y / z, shared memory, fp64 on CUDA, the index
# validated once
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_batch_beyond_grid_limit(device):
    """The model folds b * n rows into the batch (b=64, n=1024: B = 65,536): B * H past 65,535 must run, and a
    bias shared by every batch row sums its gradient over all of them."""
    helpers.require_device(device, OP)
    B, H, N, D, bs = 65_536 + 17, 1, 16, 16, 16
    q, k, v = helpers.make_qkv(B, H, N, N, D, seed=40, device=device, requires_grad=True)
    bias = helpers.make_bias(1, H, N, N, seed=41, device=device, requires_grad=True)
    layout = torch.ones(1, 1, 1, dtype=torch.bool, device=device)
    kpm = helpers.make_key_padding_mask(B, N, seed=42, device=device)
    grad_out = helpers.randn(B, H, N, D, seed=43, device=device)
    diff = dict(q=q, k=k, v=v, bias=bias)
    rest = dict(layout=layout, block_size=bs, key_padding_mask=kpm)
    out, grads = helpers.forward_backward(bsa, diff, grad_out, **rest, impl="kernel")
    ref, ref_grads = helpers.forward_backward(reference.block_sparse_attention_ref, diff, grad_out, **rest)
    helpers.assert_matches("out", out, ref)
    for name in ("q", "k", "v"):
        helpers.assert_matches(f"grad {name}", grads[name], ref_grads[name], kind="grad")
    # A sum over 65,553 rows: the reference's own summation order differs, so allow for the length of the sum.
    scale = ref_grads["bias"].abs().max().item()
    err = (grads["bias"] - ref_grads["bias"]).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0) * 8, f"grad bias: max |err| {err} (max |ref| {scale})"
    _, again = helpers.forward_backward(bsa, diff, grad_out, **rest, impl="kernel")
    assert torch.equal(again["bias"], grads["bias"]), "the bias gradient over many rows must be deterministic"


def test_cuda_smem_bytes_formula():
    """The host-side shared-memory sizes the bindings and the fallback use: every size fits an A100 (the largest
    tiles were sized for its 163 KB), the fp32 D=128 block-128 backward does not fit the 99 KB of sm_86/sm_89
    GPUs (so it must fall back there), and low precision halves the tiles."""
    smem = torch.ops.af2_ext.block_sparse_attention_cuda_smem_bytes
    a100, sm86 = 166_912, 101_376
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in ops.HEAD_DIMS:
            for bs in ops.BLOCK_SIZES:
                fwd, bwd = smem(dtype, D, bs, False), smem(dtype, D, bs, True)
                assert 0 < fwd <= bwd <= a100, f"{dtype} D={D} bs={bs}: forward {fwd}, step {bwd} bytes"
    assert smem(torch.float32, 128, 128, True) > sm86
    assert smem(torch.float32, 128, 128, False) <= sm86
    # bf16, D=64, bs=64: a 64-row query tile and two 64-row chunks of 64 + 8 halves each.
    assert smem(torch.bfloat16, 64, 64, False) == (64 + 2 * 64) * (64 + 8) * 2
    assert smem(torch.float16, 48, 64, False) == -1 and smem(torch.float64, 64, 64, False) == -1


def test_unsupported_configuration_falls_back_or_raises(monkeypatch):
    """The one decision point: a configuration the kernel cannot run warns once and runs the reference under
    impl='auto', and raises naming the reason under impl='kernel'."""
    inputs = _inputs("cpu", B=1, H=2, Nq=40, Nk=40, D=16, seed=44)
    ref_out, _ = _run_kernel(inputs, grads=False, impl="reference")
    reason = "block_sparse_attention: a configuration this test declares unsupported"
    monkeypatch.setattr(ops, "_cuda_unsupported", lambda *args, **kwargs: reason)
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="declares unsupported"):
        out, _ = _run_kernel(inputs, grads=False, impl="auto")
    assert torch.equal(out, ref_out), "the fallback must be the reference"
    with pytest.raises(RuntimeError, match="impl='kernel' but block_sparse_attention: a configuration"):
        _run_kernel(inputs, grads=False, impl="kernel")


def test_smem_verdict_names_the_configuration(monkeypatch):
    """With a GPU whose opt-in shared memory is smaller than a configuration needs, the verdict names the dtype,
    head dim, block size, bytes and the GPU; a configuration that fits gets none."""
    props = types.SimpleNamespace(name="Small GPU", shared_memory_per_block_optin=101_376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda0 = torch.device("cuda", 0)
    verdict = ops._smem_verdict("block_sparse_attention", torch.float32, 128, 128, True, cuda0)
    assert verdict is not None and "torch.float32" in verdict and "D=128" in verdict and "block_size=128" in verdict
    assert "Small GPU's 101376" in verdict and "(backward)" in verdict
    assert ops._smem_verdict("block_sparse_attention", torch.float32, 128, 128, False, cuda0) is None
    assert ops._smem_verdict("block_sparse_attention", torch.bfloat16, 128, 128, True, cuda0) is None
    assert ops._cuda_unsupported("x", torch.float64, torch.device("cpu")) is None, "CPU runs fp64 in the kernels"


def test_smem_fallback_cuda(monkeypatch):
    """On a GPU that pretends to have too little shared memory, impl='auto' falls back to the reference (same
    values as impl='reference') and impl='kernel' raises."""
    helpers.require_device("cuda", OP)
    real = torch.cuda.get_device_properties(0)
    fake = types.SimpleNamespace(name=real.name, shared_memory_per_block_optin=1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: fake)
    monkeypatch.setattr(ops, "_SMEM_VERDICTS", {})
    monkeypatch.setattr(ops, "_warned", set())
    inputs = _inputs("cuda", B=1, H=2, Nq=64, Nk=64, D=64, block_size=64, seed=45)
    ref_out, ref_grads = _run_kernel(inputs, impl="reference")
    with pytest.warns(RuntimeWarning, match="bytes of shared memory"):
        out, grads = _run_kernel(inputs, impl="auto")
    assert torch.equal(out, ref_out) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    with pytest.raises(RuntimeError, match="impl='kernel' but .*shared memory"):
        _run_kernel(inputs, impl="kernel")


def test_fp64_cuda_falls_back():
    """fp64 on CUDA runs the reference under impl='auto' (so gradcheck works on a GPU) and is refused, naming
    float64, under impl='kernel'."""
    helpers.require_device("cuda", OP)
    inputs = _inputs("cuda", torch.float64, B=1, H=1, Nq=17, Nk=18, D=16, bias=(1, 1), mask=True, seed=46)
    diff, rest = _split(inputs)
    with pytest.warns(RuntimeWarning, match="float64"):
        assert torch.autograd.gradcheck(lambda q, k, v, b: bsa(q, k, v, **rest, bias=b),
                                        (diff["q"], diff["k"], diff["v"], diff["bias"]), eps=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="float64"):
        _run_kernel(inputs, impl="kernel")


def test_layout_index_validated_once(monkeypatch):
    """The block index is checked where it is built and cached — once per layout, not on every call (on CUDA
    that check is a host sync) — and a corrupt index is caught there."""
    calls = []
    real = ops._check_index_values
    monkeypatch.setattr(ops, "_check_index_values", lambda *args: calls.append(args[2]) or real(*args))
    inputs = _inputs("cpu", B=1, H=2, Nq=40, Nk=40, D=16, seed=47)
    for _ in range(3):
        _run_kernel(inputs)
    assert calls == ["row_index", "col_index"], f"index checked {calls}"
    row_count, row_index, _, _ = ops.layout_index(torch.ones(1, 3, 3, dtype=torch.bool))
    real(row_count, row_index, "row_index", 3)  # a valid index passes
    broken = row_index.clone()
    broken[0, 0, :2] = broken[0, 0, :2].flip(0)  # two visited blocks out of order
    with pytest.raises(RuntimeError, match="corrupt"):
        real(row_count, broken, "row_index", 3)
    with pytest.raises(RuntimeError, match="corrupt"):
        real(row_count, row_index, "row_index", 2)  # block 2 out of range
    with pytest.raises(RuntimeError, match="corrupt"):
        real(row_count + 1, row_index, "row_index", 3)  # more entries counted than the row has


# ----------------------------------------------------------------------------------------------------------
# Nothing silent: layouts edited behind the version counter, second-order gradients
# ----------------------------------------------------------------------------------------------------------


def _edit_from_numpy(layout_np, layout):
    layout_np[0, 0, :] = ~layout_np[0, 0, :]  # the array a torch.from_numpy layout shares


def _edit_numpy_view(layout_np, layout):
    layout.numpy()[0, 1, :] = False


def _edit_data(layout_np, layout):
    layout.data[:, 2, 0] = ~layout.data[:, 2, 0]


@pytest.mark.parametrize("edit", [_edit_from_numpy, _edit_numpy_view, _edit_data], ids=lambda f: f.__name__[6:])
def test_edited_layout_is_not_stale(edit):
    """Each way of editing a layout that does not bump its version counter: the next call sees the new sparsity."""
    layout_np = np.random.default_rng(48).random((2, 3, 3)) < 0.6
    layout_np[:, :, 0] = True
    layout = torch.from_numpy(layout_np)
    inputs = _inputs("cpu", B=1, H=2, Nq=40, Nk=40, D=16, layout=layout, seed=48)
    out_before, _ = _run_kernel(inputs, grads=False)
    version = layout._version
    edit(layout_np, layout)
    assert layout._version == version, "this edit was meant to bypass the version counter"
    out_after, _ = _run_kernel(inputs, grads=False)
    ref_after, _ = _run_kernel(inputs, grads=False, impl="reference")
    helpers.assert_matches("out after the edit", out_after, ref_after)
    assert not torch.equal(out_after, out_before), "the edit must change the result (else the test checks nothing)"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_double_backward_refused(device):
    """create_graph=True through the kernels raises naming the op (it used to give silent zeros); the reference
    computes it."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=1, H=1, Nq=20, Nk=20, D=16, bias=(1, 1), seed=49)
    diff, rest = _split(inputs)
    out = bsa(**diff, **rest, impl="kernel")
    with pytest.raises(RuntimeError, match="block_sparse_attention: second-order gradients"):
        torch.autograd.grad(out.square().sum(), diff["q"], create_graph=True)
    ref = bsa(**diff, **rest, impl="reference")
    (grad_q,) = torch.autograd.grad(ref.square().sum(), diff["q"], create_graph=True)
    (second,) = torch.autograd.grad(grad_q.sum(), diff["k"])
    assert second.abs().sum() > 0, "the reference's second-order gradient is not zero"


# ----------------------------------------------------------------------------------------------------------
# Non-finite values: a NaN or inf reaches exactly the outputs and gradients it touches (kernel = reference);
# whatever a masked pair or padded position holds never reaches anything
# ----------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _nonfinite_base(device, dtype=torch.float32, seed=60) -> dict:
    """B=2, H=2, Nq=45, Nk=37 in blocks of 16 (partial tails), a key padding mask, a (1, 2) bias; query block 2
    (rows 32..44) sees nothing, so that some rows stay empty whatever the scale."""
    return _inputs(device, dtype, B=2, H=2, Nq=45, Nk=37, D=16, mask=True, bias=(1, 2), empty_rows=(2,), seed=seed)


def _visible(inputs: dict) -> torch.Tensor:
    """(B, H, Nq, Nk) bool on the CPU: the pairs the layout computes and the key padding mask keeps."""
    q, k = inputs["q"], inputs["k"]
    B, H, Nq, _ = q.shape
    vis = layouts.to_mask(inputs["layout"].cpu(), inputs["block_size"], Nq, k.shape[2]).unsqueeze(0)
    if inputs["key_padding_mask"] is not None:
        vis = vis & inputs["key_padding_mask"].cpu()[:, None, None, :]
    return vis.expand(B, H, -1, -1)


def _edited(inputs: dict, **edits) -> dict:
    """A copy of ``inputs`` whose tensors ``name`` are detached clones changed in place by ``edits[name](t)``."""
    new = dict(inputs)
    for name, edit in edits.items():
        t = inputs[name].detach().clone()
        edit(t)
        new[name] = t.requires_grad_(inputs[name].requires_grad)
    return new


def _put(index, value):
    """An edit for :func:`_edited`: t[index] = value."""
    return lambda t: t.__setitem__(index, value)


def _reference_run(inputs: dict, scale=None) -> tuple[torch.Tensor, dict]:
    diff, rest = _split(inputs)
    return helpers.forward_backward(reference.block_sparse_attention_ref, diff, _grad_out(inputs),
                                    dtype=helpers.oracle_dtype(inputs["q"].dtype), **rest, scale=scale)


def _assert_nonfinite_at(name: str, got: torch.Tensor, where: torch.Tensor) -> None:
    """got is non-finite exactly where ``where`` is True."""
    bad = ~torch.isfinite(got).cpu()
    wrong = bad != where.cpu()
    assert not wrong.any(), (
        f"{name}: non-finite at {int(bad.sum())} places, expected {int(where.sum())}; "
        f"{int((bad & ~where.cpu()).sum())} unexpected, {int((~bad & where.cpu()).sum())} missing, first wrong at "
        f"{tuple(wrong.nonzero()[0].tolist())}")


def _assert_finite_equal(name: str, got: torch.Tensor, clean: torch.Tensor) -> None:
    """Where got is finite it equals the run without the non-finite inputs, bit for bit."""
    finite = torch.isfinite(got)
    assert torch.equal(got[finite], clean[finite]), (
        f"{name}: finite entries differ from the run without the non-finite inputs by up to "
        f"{helpers.max_abs_err(got[finite], clean[finite]):.3g}")


def _assert_nonfinite_like_reference(inputs: dict, out: torch.Tensor, grads: dict, *, scale=None, clean=None,
                                     expect=None, label: str = "") -> None:
    """The kernel's (out, grads) on ``inputs``, which hold NaN/inf somewhere, against the reference: the same
    non-finite pattern for the output and every gradient (where exactly NaN or +-inf appears may differ), the
    places ``expect`` (name -> bool mask, "out" or a gradient name) pins; where finite, the values match the
    reference's (fp32 / fp64) and, given ``clean`` (the kernel's (out, grads) without the non-finite inputs, for
    cases where they touch nothing else), equal those bit for bit."""
    ref, ref_grads = _reference_run(inputs, scale)
    results = {"out": (out, ref), **{name: (grads[name], ref_grads[name]) for name in grads}}
    assert set(grads) == set(ref_grads), f"{label}gradients {sorted(grads)} != reference {sorted(ref_grads)}"
    for name, (got, want) in results.items():
        _assert_nonfinite_at(f"{label}{name} (the reference's pattern)", got, ~torch.isfinite(want))
        if expect is not None and name in expect:
            _assert_nonfinite_at(f"{label}{name} (expected pattern)", got, expect[name])
        if got.dtype not in helpers.LOW_PRECISION:
            finite = torch.isfinite(got)
            helpers.assert_matches(f"{label}{name} where finite", torch.where(finite, got, 0),
                                   torch.where(finite.to(want.device), want, 0).to(got.device),
                                   kind="out" if name == "out" else "grad")
    if clean is not None:
        clean_out, clean_grads = clean
        _assert_finite_equal(f"{label}out", out, clean_out)
        for name in grads:
            _assert_finite_equal(f"{label}grad {name}", grads[name], clean_grads[name])


def _rows_expect(inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, Nq, D) bool: whole query rows (a (B, H, Nq) mask)."""
    return rows[..., None].expand(*inputs["q"].shape)


def _case_nan_q_row(inputs):
    b, h, i = 0, 1, 5
    vis = _visible(inputs)
    assert vis[b, h, i].any(), "query row 5 must see a key (test is vacuous)"
    rows = torch.zeros(vis.shape[:3], dtype=torch.bool)
    rows[b, h, i] = True
    keys = torch.zeros(inputs["k"].shape, dtype=torch.bool)
    keys[b, h] = vis[b, h, i][:, None]
    bias = torch.zeros(inputs["bias"].shape, dtype=torch.bool)
    bias[0, h, i] = vis[b, h, i]  # the (1, 2) bias is shared by both batch rows
    expect = {"out": _rows_expect(inputs, rows), "q": _rows_expect(inputs, rows), "k": keys, "v": keys, "bias": bias}
    return _edited(inputs, q=_put((b, h, i, 3), NAN)), None, expect


def _key_rows(inputs, b, h, j):
    """Query rows of (b, h) that see key j (a (B, H, Nq) mask)."""
    vis = _visible(inputs)
    assert vis[b, h, :, j].any() and not vis[b, h, :, j].all(), "key j must be seen by some rows, not all"
    rows = torch.zeros(vis.shape[:3], dtype=torch.bool)
    rows[b, h] = vis[b, h, :, j]
    return rows


def _case_k(value):
    def case(inputs):
        b, h, j = 1, 0, 0  # key 0 is never padded
        # NaN: every row that sees the key; +-inf: the rows where q·k is +inf (those where it is -inf mask the key)
        expect = {"out": _rows_expect(inputs, _key_rows(inputs, b, h, j))} if value != value else None
        return _edited(inputs, k=_put((b, h, j, 2), value)), None, expect
    return case


def _case_v(value):
    def case(inputs):
        b, h, j, d = 0, 0, 0, 4
        out = torch.zeros(inputs["q"].shape, dtype=torch.bool)
        out[..., d] = _key_rows(inputs, b, h, j)
        return _edited(inputs, v=_put((b, h, j, d), value)), None, {"out": out}
    return case


def _case_nan_bias(inputs):
    h = 1
    vis = _visible(inputs)
    i, j = vis[:, h].all(0).nonzero()[0].tolist()  # a pair both batch rows see: the (1, 2) bias serves both
    rows = torch.zeros(vis.shape[:3], dtype=torch.bool)
    rows[:, h, i] = True
    return _edited(inputs, bias=_put((0, h, i, j), NAN)), None, {"out": _rows_expect(inputs, rows)}


def _case_neg_inf_bias_nan_v(inputs):
    """A pair masked by a -inf bias whose key's v holds a NaN: the pair's probability and logit gradient are 0, but
    (unlike a pair the layout or the key padding mask removes) its terms still meet in the products: 0 * NaN."""
    h, j = 1, 0
    vis = _visible(inputs)
    i = int(vis[:, h, :, j].all(0).nonzero()[0])
    inputs = _edited(inputs, bias=_put((0, h, i, j), -INF))
    return _edited(inputs, v=_put((slice(None), h, j, 2), NAN)), None, None


def _case_scale(value):
    def case(inputs):
        seen = _visible(inputs).any(-1)
        assert seen.any() and not seen.all(), "some rows must see keys, some none"
        expect = {"out": _rows_expect(inputs, seen)} if value != INF else None
        return inputs, value, expect
    return case


# name -> inputs -> (inputs with non-finite entries, scale, expected non-finite places or None)
NONFINITE_CASES = {
    "nan_q_row": _case_nan_q_row,
    "nan_k": _case_k(NAN),
    "inf_k": _case_k(INF),
    "neg_inf_k": _case_k(-INF),
    "nan_v": _case_v(NAN),
    "inf_v": _case_v(INF),
    "nan_bias": _case_nan_bias,
    "neg_inf_bias_nan_v": _case_neg_inf_bias_nan_v,
    "nan_scale": _case_scale(NAN),
    "inf_scale": _case_scale(INF),
}
# Whose non-finite inputs touch nothing but what goes non-finite: elsewhere the run equals the clean one.
NONFINITE_LOCAL = ("nan_q_row", "nan_k", "nan_v", "inf_v", "nan_bias")


# bf16: the NaN cases (inf in a key or the scale depends on the sign of q·k, which bf16 rounding may flip).
NONFINITE_PARAMS = [(torch.float32, case) for case in NONFINITE_CASES] + \
                   [(torch.bfloat16, case) for case in NONFINITE_CASES if case.startswith("nan")]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype, case", NONFINITE_PARAMS, ids=lambda x: str(x).replace("torch.", ""))
def test_nonfinite_reaches_what_it_touches(device, dtype, case, cpu_backward):
    helpers.require_device(device, OP)
    base = _nonfinite_base(device, dtype)
    inputs, scale, expect = NONFINITE_CASES[case](base)
    out, grads = _run_kernel(inputs, scale=scale)
    clean = _run_kernel(base) if case in NONFINITE_LOCAL else None
    assert not torch.isfinite(out).all(), "the non-finite input must reach the output (test is vacuous)"
    _assert_nonfinite_like_reference(inputs, out, grads, scale=scale, clean=clean, expect=expect,
                                      label=f"[{case}, {dtype}] ")
    empty = ~_visible(inputs).any(-1)  # rows with no visible key stay exactly zero whatever else is NaN
    assert torch.count_nonzero(out.cpu()[empty]) == 0 and torch.count_nonzero(grads["q"].cpu()[empty]) == 0
    # The bias gradient of a masked pair is exactly zero, also in a NaN row: masked in both batch rows the (1, 2)
    # bias serves, by the layout, the key padding mask or a -inf bias.
    masked = (~_visible(inputs) | torch.isneginf(inputs["bias"].detach().cpu())).all(0, keepdim=True)
    assert torch.count_nonzero(grads["bias"].cpu()[masked]) == 0, "grad bias of masked pairs must be exactly zero"


def _poison_masked(inputs: dict) -> dict:
    """NaN / inf in everything a masked pair or padded key holds: k, v and the bias of key-padded keys (inside
    visited blocks), of the keys of a block no query block visits, and the bias outside the layout."""
    kpm = inputs["key_padding_mask"].cpu()
    layout = inputs["layout"].cpu()
    Nq, Nk, bs = inputs["q"].shape[2], inputs["k"].shape[2], inputs["block_size"]
    inside = layouts.to_mask(layout, bs, Nq, Nk)  # [H, Nq, Nk]
    unvisited = ~layout.any(0).any(0)  # key blocks no query block of any head visits
    assert unvisited.any() and (~kpm).any(), "the layout must leave a key block unvisited and the mask pad a key"
    dead = ~kpm.clone()  # [B, Nk] keys nobody sees
    for blk in unvisited.nonzero().flatten().tolist():
        dead[:, blk * bs:(blk + 1) * bs] = True
    dev = inputs["q"].device
    dead_keys = dead.to(dev)[:, None, :, None]  # [B, 1, Nk, 1]

    def poison(value, column_values):
        def edit(t):
            t.masked_fill_(dead_keys, value)
            for d, other in column_values:  # a few columns of other non-finite values
                t[..., d].masked_fill_(dead_keys[..., 0], other)
        return edit

    def poison_bias(t):
        t.masked_fill_((~inside).unsqueeze(0).to(dev), NAN)
        t.masked_fill_(dead.all(0)[None, None, None, :].to(dev), INF)  # the (1, H) bias serves both batch rows
    return _edited(inputs, k=poison(NAN, [(0, INF), (1, -INF)]), v=poison(INF, [(1, NAN), (2, -INF)]),
                   bias=poison_bias)


def _masked_base(device, dtype):
    layout = helpers.random_layout(2, 3, 3, seed=62)
    layout[:, :, 1] = False  # key block 1 (keys 16..31) is never visited
    layout[:, :, 0] = True
    inputs = _inputs(device, dtype, B=2, H=2, Nq=45, Nk=37, D=16, mask=True, bias=(1, 2), layout=layout, seed=62)
    kpm = inputs["key_padding_mask"].clone()
    kpm[:, 3] = False  # padded keys inside visited blocks 0 and 2 ...
    kpm[:, 35] = False
    kpm[1, 33:] = False  # ... and a shorter second sequence: its padded tail
    inputs["key_padding_mask"] = kpm
    return inputs


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_nonfinite_changes_nothing(device, dtype, cpu_backward):
    """NaN / inf in the k, v and bias of masked keys (padded inside a visited block, or in a block nobody visits)
    and in the bias outside the layout: the output and every gradient are finite and equal, bit for bit, to the
    run without them; the masked entries' gradients are exactly zero."""
    helpers.require_device(device, OP)
    base = _masked_base(device, dtype)
    inputs = _poison_masked(base)
    out, grads = _run_kernel(inputs)
    clean_out, clean_grads = _run_kernel(base)
    assert torch.equal(out, clean_out), f"out changed by up to {helpers.max_abs_err(out, clean_out):.3g}"
    for name in grads:
        assert torch.equal(grads[name], clean_grads[name]), \
            f"grad {name} changed by up to {helpers.max_abs_err(grads[name], clean_grads[name]):.3g}"
    ref, ref_grads = _reference_run(inputs)
    clean_ref, clean_ref_grads = _reference_run(base)
    torch.testing.assert_close(ref, clean_ref, atol=0, rtol=0, msg=lambda m: f"reference out: {m}")
    for name in ref_grads:
        torch.testing.assert_close(ref_grads[name], clean_ref_grads[name], atol=0, rtol=0,
                                   msg=lambda m, n=name: f"reference grad {n}: {m}")
    _assert_like_reference(base, clean_out, clean_grads)
    dead = ~_visible(inputs).any(2)  # [B, H, Nk]: keys no query sees
    assert dead.any()
    for name in ("k", "v"):
        assert torch.count_nonzero(grads[name].cpu()[dead]) == 0, f"grad {name} of masked keys must be exactly zero"
    hidden = ~_visible(inputs)[:1]  # the (1, 2) bias: pairs batch row 0 cannot see ...
    hidden = hidden & ~_visible(inputs)[1:]  # ... nor batch row 1
    assert torch.count_nonzero(grads["bias"].cpu()[hidden]) == 0, "grad bias of masked pairs must be exactly zero"


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_storage_past_the_ends_is_never_read(device, dtype, cpu_backward):
    """q, k, v and grad_out as views into NaN-filled storage (rows past Nq / Nk, columns past D): nothing of it
    reaches the output or a gradient; the results equal the contiguous run bit for bit."""
    helpers.require_device(device, OP)
    base = _nonfinite_base(device, dtype, seed=63)
    inputs = dict(base)
    for name in ("q", "k", "v"):
        t = base[name].detach()
        B, H, N, D = t.shape
        storage = torch.full((B, N + 9, H, D + 8), NAN, dtype=dtype, device=device)
        view = storage.transpose(1, 2)[:, :, :N, :D]
        view.copy_(t)
        inputs[name] = view.requires_grad_()
    _assert_runs_equal(inputs, base)


ISA_NONFINITE_CHILD = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import test_block_sparse_attention as t
results = {}
for case in ("nan_q_row", "nan_v", "inf_k", "nan_scale"):
    base = t._nonfinite_base("cpu")
    inputs, scale, expect = t.NONFINITE_CASES[case](base)
    results[case] = (inputs, scale, expect, t._run_kernel(inputs, scale=scale), t._run_kernel(base))
masked = t._masked_base("cpu", torch.float32)
poisoned = t._poison_masked(masked)
results["masked"] = (poisoned, None, None, t._run_kernel(poisoned), t._run_kernel(masked))
torch.save({"isa": torch.ops.af2_ext.cpu_isa(), "results": results}, sys.argv[2])
"""


@pytest.mark.slow
def test_isa_variants_nonfinite_cpu(tmp_path):
    """The non-finite semantics under every instruction set the CPU kernels dispatch to (AF2_EXT_CPU_ISA)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    children = {}
    for isa in ("avx512", "avx2", "generic"):
        env = {**os.environ, "AF2_EXT_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
        path = tmp_path / f"{isa}.pt"
        proc = subprocess.Popen([sys.executable, "-c", ISA_NONFINITE_CHILD, tests_dir, str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children[isa] = (proc, path)
    runs = {}
    for isa, (proc, path) in children.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"AF2_EXT_CPU_ISA={isa} child failed (rc {proc.returncode}):\n{output}"
        saved = torch.load(path, weights_only=False)
        assert ISA_RANK[saved["isa"]] <= ISA_RANK[isa], f"asked for {isa}, cpu_isa() reports {saved['isa']}"
        runs[isa] = saved["results"]
    for isa, results in runs.items():
        for case, (inputs, scale, expect, (out, grads), (clean_out, clean_grads)) in results.items():
            label = f"[AF2_EXT_CPU_ISA={isa}, {case}] "
            if case == "masked":
                assert torch.equal(out, clean_out), f"{label}out changed"
                for name in grads:
                    assert torch.equal(grads[name], clean_grads[name]), f"{label}grad {name} changed"
                continue
            clean = (clean_out, clean_grads) if case in NONFINITE_LOCAL else None
            _assert_nonfinite_like_reference(inputs, out, grads, scale=scale, clean=clean, expect=expect, label=label)


def test_lse_is_not_differentiable():
    """The raw op's log-sum-exp is a by-product for the backward: marked non-differentiable, so a loss through it
    fails loudly instead of getting a silently wrong gradient."""
    args = _forward_args(_inputs("cpu", B=1, H=1, Nq=20, Nk=20, D=16, seed=62))
    out, lse = torch.ops.af2_ext.block_sparse_attention_forward.default(**args)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_cpu_output_is_laid_out_for_the_output_projection():
    """The CPU kernel writes (B, H, Nq, D) in (B, Nq, H, D) memory, so the heads-side-by-side view the output
    projection reads is free (no copy of the output per call), and the fake kernel says so (torch.compile)."""
    q, k, v = helpers.make_qkv(2, 3, 40, 33, 16, seed=0)
    out = ops.block_sparse_attention(q, k, v, layouts.dense(1, 1), block_size=64, impl="kernel")
    assert out.shape == (2, 3, 40, 16) and out.stride() == (40 * 3 * 16, 16, 3 * 16, 1), out.stride()
    heads_side_by_side = out.transpose(1, 2).reshape(2, 40, 3 * 16)
    assert heads_side_by_side.data_ptr() == out.data_ptr() and heads_side_by_side._base is not None
    ref = reference.block_sparse_attention_ref(q, k, v, layouts.dense(1, 1), block_size=64)
    helpers.assert_matches("out", out, ref)


def test_bad_cpu_backward_plan(monkeypatch):
    """A misspelt AF2_EXT_CPU_BACKWARD is an error naming the variable, not a silent default."""
    inputs = _inputs("cpu", B=1, H=1, Nq=16, Nk=16)
    monkeypatch.setenv("AF2_EXT_CPU_BACKWARD", "fast")
    with pytest.raises(RuntimeError, match="AF2_EXT_CPU_BACKWARD must be 'auto', 'fused' or 'two_pass', got 'fast'"):
        _run_kernel(inputs)
