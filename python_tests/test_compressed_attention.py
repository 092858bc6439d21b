"""Tests for af2_ext.ops.compressed_attention and af2_ext.ops.kv_compress against af2_ext.reference
(explicit pad, conv1d, mask pooling, dense fp32 attention).

Each test is written once and parametrised by device (``helpers.DEVICES``; ``helpers.per_device`` where the
devices run different cases, e.g. fp64 on the CPU only); a CUDA case skips, with the reason, without CUDA or
without a CUDA kernel (``helpers.require_device``). Tests named ``_cpu`` / ``_cuda`` check what only that device
does. Tolerances come from helpers.assert_matches only.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import helpers
from af2_ext import ops, reference

OP = "kv_compress_forward"
DIFF = ("q", "k", "v", "weight", "bias")


def _inputs(device, dtype=torch.float32, *, B=2, H=2, Nq=40, Nk=37, D=16, ratio=3, bias=True, mask=False,
            fully_padded=(), layout=False, block_size=16, seed=0, requires_grad=True) -> dict:
    """Keyword arguments of compressed_attention. ``layout=True`` makes a random per-head layout over
    (query blocks, compressed key blocks)."""
    q, k, v = helpers.make_qkv(B, H, Nq, Nk, D, seed=seed, dtype=dtype, device=device, requires_grad=requires_grad)
    weight = b = None
    if ratio > 1:
        # Scaled like the default Conv1d initialisation, so compressed keys stay O(1).
        weight = helpers.randn(H * D, D, ratio, seed=seed + 5, dtype=dtype, device=device,
                               scale=(D * ratio) ** -0.5, requires_grad=requires_grad)
        if bias:
            b = helpers.randn(H * D, seed=seed + 6, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad)
    kpm = None
    if mask or fully_padded:
        kpm = helpers.make_key_padding_mask(B, Nk, seed=seed + 20, keep=0.5, device=device, fully_padded=fully_padded)
    lay = None
    if layout:
        nc = -(-Nk // ratio)
        lay = helpers.random_layout(H, -(-Nq // block_size), -(-nc // block_size), seed=seed + 10).to(device)
    return dict(q=q, k=k, v=v, ratio=ratio, weight=weight, bias=b, key_padding_mask=kpm, layout=lay,
                block_size=block_size)


def _split(inputs: dict) -> tuple[dict, dict]:
    diff = {name: inputs[name] for name in DIFF}
    rest = {name: value for name, value in inputs.items() if name not in diff}
    return diff, rest


def _grad_out(inputs: dict, seed: int = 99) -> torch.Tensor:
    q = inputs["q"]
    return helpers.randn(*q.shape, seed=seed, dtype=q.dtype, device=q.device)


def _call(fn):
    """fn(q, k, v, ratio, weight, bias, **rest) with the differentiable tensors passed by name."""
    return lambda q, k, v, weight, bias, ratio, **rest: fn(q, k, v, ratio, weight, bias, **rest)


def _run_kernel(inputs: dict, *, grads=True, impl="kernel", scale=None) -> tuple[torch.Tensor, dict]:
    diff, rest = _split(inputs)
    return helpers.forward_backward(_call(ops.compressed_attention), diff, _grad_out(inputs) if grads else None,
                                    **rest, impl=impl, scale=scale)


def _check_against_reference(inputs: dict, *, scale=None, label: str = "") -> tuple[torch.Tensor, dict]:
    out, grads = _run_kernel(inputs, scale=scale)
    diff, rest = _split(inputs)
    dtype = inputs["q"].dtype
    grad_out = _grad_out(inputs)
    ref, ref_grads = helpers.forward_backward(_call(reference.compressed_attention_ref), diff, grad_out,
                                              dtype=helpers.oracle_dtype(dtype), **rest, scale=scale)
    lowp, lowp_grads = None, {}
    if dtype in helpers.LOW_PRECISION:
        lowp, lowp_grads = helpers.forward_backward(_call(helpers.compressed_attention_lowp), diff, grad_out, **rest,
                                                    scale=scale)
    assert out.dtype == dtype and out.shape == inputs["q"].shape, f"{label}out is {out.dtype} {tuple(out.shape)}"
    helpers.assert_matches(f"{label}out", out, ref, ref_lowp=lowp)
    assert set(grads) == set(ref_grads), f"{label}gradients {sorted(grads)} != reference {sorted(ref_grads)}"
    for name in grads:
        assert grads[name].dtype == diff[name].dtype, f"{label}grad {name} is {grads[name].dtype}"
        helpers.assert_matches(f"{label}grad {name}", grads[name], ref_grads[name], kind="grad",
                               ref_lowp=lowp_grads.get(name), precision=dtype)
    return out, grads


# ----------------------------------------------------------------------------------------------------------
# Values and gradients of q, k, v, weight and bias against the reference
# ----------------------------------------------------------------------------------------------------------

# (ratio, Nk): divisible and not, Nk < ratio, a single key.
RATIO_LENGTHS = [(1, 37), (2, 36), (2, 37), (3, 36), (3, 37), (4, 38), (4, 3), (3, 1)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("layout", [False, True], ids=["dense", "layout"])
@pytest.mark.parametrize("ratio, Nk", RATIO_LENGTHS)
def test_ratio_lengths(device, ratio, Nk, mask, layout):
    helpers.require_device(device, OP)
    inputs = _inputs(device, Nk=Nk, ratio=ratio, mask=mask, layout=layout, seed=ratio * 100 + Nk)
    _check_against_reference(inputs, label=f"ratio={ratio} Nk={Nk} mask={mask} layout={layout}: ")


HEAD_DIM_BLOCK = [(16, 32), (32, 16), (64, 64), (128, 16)]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("D, block_size", HEAD_DIM_BLOCK)
def test_head_dims(device, D, block_size):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=1, H=2, Nq=70, Nk=100, D=D, ratio=3, mask=True, layout=True, block_size=block_size,
                     seed=D)
    _check_against_reference(inputs, scale=0.3)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", helpers.LOW_PRECISION, ids=str)
def test_low_precision(device, dtype):
    helpers.require_device(device, OP)
    for ratio in (1, 3):
        inputs = _inputs(device, dtype, B=2, H=2, Nq=48, Nk=64, D=32, ratio=ratio, mask=True, seed=7 + ratio)
        _check_against_reference(inputs, label=f"ratio={ratio}: ")


def test_fp64_cpu():  # fp64 is CPU-only
    _check_against_reference(_inputs("cpu", torch.float64, Nk=50, ratio=4, mask=True, layout=True, seed=8))


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_strided(device):
    """k and v as attention modules produce them: (B, N, H, D) storage seen as (B, H, N, D)."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=3, Nq=33, Nk=41, D=32, ratio=2, mask=True, seed=9)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not inputs["k"].is_contiguous()
    _check_against_reference(inputs)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_padding_empties_positions(device):
    """A compressed position whose inputs are all padding is masked; a batch row with no kept key gives zero
    output and zero gradients, never NaN."""
    helpers.require_device(device, OP)
    B, H, Nq, Nk, D, ratio = 3, 2, 24, 13, 16, 3
    inputs = _inputs(device, B=B, H=H, Nq=Nq, Nk=Nk, D=D, ratio=ratio, seed=10)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[0, 3:6] = False  # compressed position 1 of row 0: all of its inputs padded
    mask[0, 12] = False   # position 4 of row 0: its only real input (12) padded, 13 and 14 are past Nk
    mask[1, 0:2] = False  # position 0 of row 1 keeps input 2: still visible
    mask[2] = False       # row 2: nothing visible
    inputs["key_padding_mask"] = mask.to(device)
    compressed = ops.compress_key_padding_mask(inputs["key_padding_mask"], ratio).cpu()
    expected = torch.ones(B, 5, dtype=torch.bool)
    expected[0, 1] = expected[0, 4] = False
    expected[2] = False
    assert torch.equal(compressed, expected), f"compressed mask {compressed} != {expected}"
    assert torch.equal(compressed, reference.compressed_key_padding_mask_ref(mask, ratio))
    out, grads = _check_against_reference(inputs)
    assert torch.equal(out[2], torch.zeros_like(out[2])), "a batch row with no kept key must give zeros"
    for name in ("q", "k", "v"):
        assert torch.equal(grads[name][2], torch.zeros_like(grads[name][2])), f"grad {name} of the empty row"

    # Masked compressed positions are invisible: changing the keys that feed only them changes nothing.
    changed = dict(inputs)
    k = inputs["k"].detach().clone()
    k[0, :, 3:6] += 5.0
    changed["k"] = k
    out_changed, _ = _run_kernel(changed, grads=False)
    assert torch.equal(out_changed[0], out[0]), "keys of a masked compressed position leaked into the output"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_empty_layout_rows(device):
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=1, H=2, Nq=48, Nk=90, D=16, ratio=3, layout=True, seed=11)
    inputs["layout"][:, 1] = False  # query block 1 sees no compressed key in any head
    out, grads = _check_against_reference(inputs)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32])), "an empty layout row must be zero"
    assert torch.equal(grads["q"][:, :, 16:32], torch.zeros_like(grads["q"][:, :, 16:32]))


PARTIAL_GRADS = [("q",), ("k",), ("v",), ("weight",), ("bias",), ("weight", "bias"), ("k", "weight")]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("wanted", PARTIAL_GRADS, ids="+".join)
def test_partial_grads(device, wanted):
    helpers.require_device(device, OP)
    inputs = _inputs(device, Nk=50, ratio=3, mask=True, seed=12)
    for name in DIFF:
        inputs[name] = inputs[name].detach().requires_grad_(name in wanted)
    _, grads = _check_against_reference(inputs, label=f"only {wanted}: ")
    assert set(grads) == set(wanted), f"gradients {sorted(grads)} for wanted {wanted}"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_no_bias(device):
    helpers.require_device(device, OP)
    _check_against_reference(_inputs(device, Nk=45, ratio=4, bias=False, mask=True, seed=13))


# ----------------------------------------------------------------------------------------------------------
# The compression kernel on its own
# ----------------------------------------------------------------------------------------------------------


def _kv_compress_lowp(k, v, weight, bias, ratio):
    """The reference's convolution computed in k's dtype."""
    out = []
    batch, heads, seq, dim = k.shape
    pad = (-seq) % ratio
    for x in (k, v):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).permute(0, 1, 3, 2).reshape(batch, heads * dim, -1)
        y = torch.nn.functional.conv1d(x, weight.to(k.dtype), bias.to(k.dtype), stride=ratio, groups=heads)
        out.append(y.reshape(batch, heads, dim, -1).permute(0, 1, 3, 2))
    return tuple(out)


KV_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
             (torch.float16, torch.float16)]


# fp64 is CPU-only: the CUDA kernels run fp32, fp16 and bf16 (test_fp64_rejected_cuda).
@pytest.mark.parametrize("device, dtype, weight_dtype",
                         helpers.per_device(cpu=KV_DTYPES, cuda=[d for d in KV_DTYPES if d[0] != torch.float64]))
def test_kv_compress(device, dtype, weight_dtype):
    helpers.require_device(device, OP)
    B, H, Nk, D = 2, 3, 29, 32
    for ratio in (1, 2, 3, 4, 7, 40):
        k, v = (helpers.randn(B, Nk, H, D, seed=s, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
                for s in (1, 2))
        weight = helpers.randn(H * D, D, ratio, seed=3, dtype=weight_dtype, device=device, scale=0.2,
                               requires_grad=True)
        bias = helpers.randn(H * D, seed=4, dtype=weight_dtype, device=device, requires_grad=True)
        tensors = dict(k=k, v=v, weight=weight, bias=bias)
        nc = -(-Nk // ratio)
        grad = helpers.randn(2, B, H, nc, D, seed=5, dtype=dtype, device=device)

        def run(fn, **t):
            kc, vc = fn(t["k"], t["v"], t["weight"], t["bias"], ratio)
            return torch.stack([kc.to(dtype), vc.to(dtype)])

        out, grads = helpers.forward_backward(lambda **t: run(lambda *a: ops.kv_compress(*a, impl="kernel"), **t),
                                              tensors, grad)
        ref, ref_grads = helpers.forward_backward(lambda **t: run(reference.kv_compress_ref, **t), tensors, grad,
                                                  dtype=helpers.oracle_dtype(dtype))
        assert out.shape == (2, B, H, nc, D) and out.dtype == dtype
        lowp, lowp_grads = None, {}
        if dtype in helpers.LOW_PRECISION:
            lowp, lowp_grads = helpers.forward_backward(
                lambda **t: run(_kv_compress_lowp, **t), tensors, grad)
        helpers.assert_matches(f"ratio={ratio} kc, vc", out, ref, ref_lowp=lowp)
        for name, g in grads.items():
            assert g.dtype == tensors[name].dtype, f"grad {name} is {g.dtype}, input {tensors[name].dtype}"
            helpers.assert_matches(f"ratio={ratio} grad {name}", g, ref_grads[name], kind="grad",
                                   ref_lowp=lowp_grads.get(name), precision=dtype)


# ----------------------------------------------------------------------------------------------------------
# Memory, determinism, gradcheck, opcheck, torch.compile, impl choice
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_saves_no_logits(device):
    """Nothing autograd keeps is as large as the Nq x Nc logits of one head."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=1, H=2, Nq=512, Nk=384, D=16, ratio=3, mask=True, seed=14)
    diff, rest = _split(inputs)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _call(ops.compressed_attention)(**diff, **rest, impl="kernel")
    out.sum().backward()
    logits_one_head = 512 * 128
    assert saved, "autograd saved nothing: the op is not differentiable?"
    largest = max(saved, key=lambda s: s[1])
    assert largest[1] < logits_one_head, f"a saved tensor of shape {largest[0]} is as large as the logits"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_determinism(device):
    """Repeated runs are bitwise equal; on the CPU also with a different number of threads."""
    helpers.require_device(device, OP)
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads, default_threads, 1] if device == "cpu" else [1, 1]
    inputs = _inputs(device, B=3, H=2, Nq=64, Nk=200, D=32, ratio=3, mask=True, seed=15)
    runs = []
    for threads in thread_counts:
        with helpers.num_threads(threads):
            runs.append((threads, _run_kernel(inputs)))
    (t0, (out0, grads0)), rest = runs[0], runs[1:]
    for threads, (out, grads) in rest:
        assert torch.equal(out, out0), f"out differs between runs ({t0} and {threads} threads)"
        for name in DIFF:
            assert torch.equal(grads[name], grads0[name]), \
                f"grad {name} differs between runs ({t0} and {threads} threads)"


@pytest.mark.parametrize("ratio, layout", [(3, False), (2, True)], ids=["dense", "layout"])
def test_gradcheck_fp64_cpu(ratio, layout):  # fp64 is CPU-only
    inputs = _inputs("cpu", torch.float64, B=2, H=2, Nq=17, Nk=22, D=16, ratio=ratio, mask=True, layout=layout,
                     seed=16)
    diff, rest = _split(inputs)

    def fn(q, k, v, weight, bias):
        return ops.compressed_attention(q, k, v, ratio, weight, bias, **{n: rest[n] for n in rest if n != "ratio"},
                                        impl="kernel")

    with helpers.num_threads(1):
        assert torch.autograd.gradcheck(fn, tuple(diff[n] for n in DIFF), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck(device):
    helpers.require_device(device, OP)
    op = torch.ops.af2_ext.kv_compress_forward.default
    samples = []
    for B, H, Nk, D, ratio, bias, grad in ((2, 2, 37, 16, 3, True, True), (1, 3, 5, 32, 7, False, True),
                                           (2, 1, 40, 16, 4, True, False)):
        k, v = (helpers.randn(B, H, Nk, D, seed=s, device=device, requires_grad=grad) for s in (1, 2))
        weight = helpers.randn(H * D, D, ratio, seed=3, device=device, scale=0.2, requires_grad=grad)
        b = helpers.randn(H * D, seed=4, device=device, requires_grad=grad) if bias else None
        samples.append((k, v, weight, b, ratio))
    helpers.assert_opcheck(op, samples)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_torch_compile(device):
    helpers.require_device(device, OP)
    torch._dynamo.reset()
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=50, D=16, ratio=3, mask=True, seed=17)
    diff, rest = _split(inputs)

    def attention(q, k, v, weight, bias):
        return ops.compressed_attention(q, k, v, 3, weight, bias, key_padding_mask=rest["key_padding_mask"],
                                        impl="kernel")

    compiled = torch.compile(attention, fullgraph=True)
    grad_out = _grad_out(inputs)
    eager_out, eager_grads = helpers.forward_backward(attention, diff, grad_out)
    out, grads = helpers.forward_backward(compiled, diff, grad_out)
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
    for name in DIFF:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-6, rtol=1e-6,
                                   msg=lambda m, name=name: f"compiled grad {name}: {m}")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_impl_choice(device):
    helpers.require_device(device, OP)
    inputs = _inputs(device, Nk=40, ratio=2, mask=True, seed=18)
    kernel, kernel_grads = _run_kernel(inputs, impl="kernel")
    ref, ref_grads = _run_kernel(inputs, impl="reference")
    helpers.assert_matches("impl=reference vs kernel", kernel, ref)
    for name in DIFF:
        helpers.assert_matches(f"grad {name}", kernel_grads[name], ref_grads[name], kind="grad")
    with ops.use_impl("reference"):
        default_ref, _ = _run_kernel(inputs, impl=None, grads=False)
    assert torch.equal(default_ref, ref), "use_impl('reference') did not run the reference"


# ----------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ----------------------------------------------------------------------------------------------------------


def _set(**changes):
    def mutate(inputs, other):
        for name, change in changes.items():
            inputs[name] = change(inputs, other)

    return mutate


BAD_INPUTS = {
    "ratio_0": (_set(ratio=lambda i, o: 0), r"ratio must be >= 1, got 0"),
    "ratio_float": (_set(ratio=lambda i, o: 3.0), r"ratio must be an int"),
    "ratio_bool": (_set(ratio=lambda i, o: True), r"ratio must be an int"),
    "weight_missing": (_set(weight=lambda i, o: None), r"weight must be a torch.Tensor when ratio > 1"),
    "weight_shape": (_set(weight=lambda i, o: i["weight"][:, :, :2]), r"weight must be \(H\*D=32, D=16, ratio=3\)"),
    "weight_heads": (_set(weight=lambda i, o: i["weight"][:16]), r"weight must be \(H\*D=32, D=16, ratio=3\)"),
    "weight_dtype": (_set(weight=lambda i, o: i["weight"].to(torch.int32)), r"weight must be a floating tensor"),
    "weight_device": (_set(weight=lambda i, o: i["weight"].to(o)), r"weight must be on k's device"),
    "bias_shape": (_set(bias=lambda i, o: i["bias"][:-1]), r"bias must be \(H\*D=32,\)"),
    "bias_rank": (_set(bias=lambda i, o: i["bias"][None]), r"bias must be \(H\*D=32,\)"),
    "bias_dtype": (_set(bias=lambda i, o: i["bias"].to(torch.int64)), r"bias must be a floating tensor"),
    "bias_device": (_set(bias=lambda i, o: i["bias"].to(o)), r"bias must be on k's device"),
    "weight_with_ratio_1": (_set(ratio=lambda i, o: 1, weight=lambda i, o: i["weight"][:, :, :1]),
                            r"weight and bias must be None when ratio == 1"),
    "mask_shape": (_set(key_padding_mask=lambda i, o: i["key_padding_mask"][:, :-1]),
                   r"key_padding_mask must be \(B=2, Nk=37\)"),
    "mask_dtype": (_set(key_padding_mask=lambda i, o: i["key_padding_mask"].int()), r"key_padding_mask must be bool"),
    "layout_uncompressed": (_set(layout=lambda i, o: torch.ones(2, 3, 3, dtype=torch.bool, device=i["q"].device)),
                            r"layout must be \(1 or H=2, ceil\(Nq/block_size\)=3, ceil\(Nc/block_size\)=1\)"),
    "layout_dtype": (_set(layout=lambda i, o: torch.ones(2, 3, 1, device=i["q"].device)),
                     r"layout must be a bool tensor"),
    "layout_device": (_set(layout=lambda i, o: torch.ones(2, 3, 1, dtype=torch.bool, device=o)),
                      r"layout must be on q's device"),
    "block_size": (_set(block_size=lambda i, o: 24), r"block_size must be 16, 32, 64 or 128, got 24"),
    "k_dtype": (_set(k=lambda i, o: i["k"].double(), v=lambda i, o: i["v"].double()), r"k and v must have q's dtype"),
    "k_heads": (_set(k=lambda i, o: i["k"][:, :1], v=lambda i, o: i["v"][:, :1]), r"k must be \(B=2, H=2, Nk, D=16\)"),
    "head_dim": (_set(q=lambda i, o: i["q"][..., :8], k=lambda i, o: i["k"][..., :8], v=lambda i, o: i["v"][..., :8]),
                 r"head dim D \(q.size\(-1\)\) must be 16, 32, 64 or 128, got 8"),
    "k_not_tensor": (_set(k=lambda i, o: i["k"].tolist()), r"k must be a torch.Tensor"),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(device, case):
    helpers.require_device(device, OP)
    mutate, match = BAD_INPUTS[case]
    inputs = _inputs(device, B=2, H=2, Nq=40, Nk=37, D=16, ratio=3, mask=True, seed=19, requires_grad=False)
    mutate(inputs, helpers.other_device(device))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.compressed_attention(**inputs, impl="kernel")


BAD_OP_INPUTS = {
    "grad_shape": (lambda a: a.update(grad_kc=a["grad_kc"][:, :, :-1]), r"grad_kc and grad_vc must be \(B, H, Nc, D\)"),
    "grad_dtype": (lambda a: a.update(grad_vc=a["grad_vc"].double()), r"grad_kc and grad_vc must have k's dtype"),
    "weight_shape": (lambda a: a.update(weight=a["weight"][:, :8]), r"weight must be \(H\*D=32, D=16, ratio=3\)"),
    "ratio": (lambda a: a.update(ratio=0), r"ratio must be >= 1, got 0"),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("case", list(BAD_OP_INPUTS))
def test_bad_op_input(device, case):
    """The C++ binding checks what the Python wrapper would; a direct torch.ops call gets the same errors."""
    helpers.require_device(device, OP)
    mutate, match = BAD_OP_INPUTS[case]
    k, v = (helpers.randn(2, 2, 37, 16, seed=s, device=device) for s in (1, 2))
    args = dict(grad_kc=helpers.randn(2, 2, 13, 16, seed=3, device=device),
                grad_vc=helpers.randn(2, 2, 13, 16, seed=4, device=device), k=k, v=v,
                weight=helpers.randn(32, 16, 3, seed=5, device=device), bias=None, ratio=3)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.af2_ext.kv_compress_backward(*args.values(), [True, True, True, False])


def test_fp64_rejected_cuda():
    helpers.require_device("cuda", OP)
    k = helpers.randn(1, 1, 8, 16, seed=1, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match=r"k must be float32, float16 or bfloat16 on CUDA"):
        torch.ops.af2_ext.kv_compress_forward(k, k, helpers.randn(16, 16, 2, seed=2, device="cuda"), None, 2)


def test_attention_dropout_runs_the_reference_with_a_warning():
    """The kernels have no attention-probability dropout: dropout_p > 0 runs the reference (warned once per op),
    impl="kernel" refuses, and the dropout really drops (about p of the probability mass, rescaled)."""
    inputs = _inputs("cpu", Nk=40, ratio=2, seed=20, requires_grad=False)
    diff, rest = _split(inputs)
    ops._warned.discard(("kv_compress_forward", "dropout"))
    with pytest.warns(RuntimeWarning, match="no attention-probability dropout"):
        torch.manual_seed(0)
        dropped = _call(ops.compressed_attention)(**diff, **rest, dropout_p=0.5)
    torch.manual_seed(0)
    expected = _call(reference.compressed_attention_ref)(**diff, **rest, dropout_p=0.5)
    assert torch.equal(dropped, expected), "dropout_p > 0 must run the reference with the same RNG stream"
    plain = _call(ops.compressed_attention)(**diff, **rest)
    assert (dropped - plain).abs().max() > 0.1, "dropout had no effect"
    with pytest.raises(RuntimeError, match="no attention dropout"):
        _call(ops.compressed_attention)(**diff, **rest, dropout_p=0.1, impl="kernel")
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
            _call(ops.compressed_attention)(**diff, **rest, dropout_p=bad)
    layout = torch.ones(1, 3, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="no attention dropout"):
        ops.block_sparse_attention(diff["q"], diff["q"], diff["q"], layout, dropout_p=0.1, impl="kernel")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_double_backward_refused(device):
    """create_graph=True through the compression kernels raises naming the op (it used to give silent zeros)."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=1, H=1, Nq=20, Nk=21, D=16, ratio=3, seed=60)
    diff, rest = _split(inputs)
    out = _call(ops.compressed_attention)(**diff, **rest, impl="kernel")
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(out.square().sum(), diff["weight"], create_graph=True)


# ----------------------------------------------------------------------------------------------------------
# Non-finite values: a NaN in the weight, bias, k or v before compression reaches exactly what it touches (kernel =
# reference); a compressed position whose inputs are all padding is masked, whatever they hold
# ----------------------------------------------------------------------------------------------------------

NAN = float("nan")


def _edited(inputs: dict, name: str, index, value) -> dict:
    new = dict(inputs)
    t = inputs[name].detach().clone()
    t[index] = value
    new[name] = t.requires_grad_(inputs[name].requires_grad)
    return new


def _heads(B, H, Nq, D, *cells) -> torch.Tensor:
    """(B, H, Nq, D) bool: True in the (b, h) cells given."""
    where = torch.zeros(B, H, Nq, D, dtype=torch.bool)
    for b, h in cells:
        where[b, h] = True
    return where


# name -> (tensor, index, expected non-finite (b, h) of the output). Nk = 37, ratio 3: the last window holds one
# key and two zero-padding positions, so tap 1 of the weight multiplies padding there (0 * NaN is NaN, as conv1d).
NONFINITE_COMPRESSED = {
    "nan_weight": ("weight", (0 * 16 + 2, 5, 1), [(0, 0), (1, 0)]),
    "nan_conv_bias": ("bias", 1 * 16 + 3, [(0, 1), (1, 1)]),
    "nan_k": ("k", (1, 1, 0, 4), [(1, 1)]),  # key 0 is never padded
    "nan_v": ("v", (1, 0, 0, 4), [(1, 0)]),
}


def _assert_nonfinite_pattern(name, got, ref):
    bad, want = ~torch.isfinite(got).cpu(), ~torch.isfinite(ref).cpu()
    wrong = bad != want
    assert not wrong.any(), (f"{name}: non-finite at {int(bad.sum())} places, the reference at {int(want.sum())}; "
                             f"first difference at {tuple(wrong.nonzero()[0].tolist())}")


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(NONFINITE_COMPRESSED))
def test_nonfinite_before_compression(device, dtype, case):
    """kc, vc, the output and every gradient are non-finite exactly where the reference's are; where finite, the
    values match it (fp32). The compression kernels used to be followed by attention kernels that dropped a NaN key
    (its row came out finite)."""
    helpers.require_device(device, OP)
    base = _inputs(device, dtype, B=2, H=2, Nq=40, Nk=37, D=16, ratio=3, mask=True, seed=70)
    name, index, cells = NONFINITE_COMPRESSED[case]
    inputs = _edited(base, name, index, NAN)
    diff, rest = _split(inputs)
    kc, vc = ops.kv_compress(inputs["k"], inputs["v"], inputs["weight"], inputs["bias"], 3, impl="kernel")
    ref_kc, ref_vc = reference.kv_compress_ref(*(inputs[n].detach().to(helpers.oracle_dtype(dtype))
                                                 for n in ("k", "v", "weight", "bias")), 3)
    _assert_nonfinite_pattern(f"[{case}] kc", kc, ref_kc)
    _assert_nonfinite_pattern(f"[{case}] vc", vc, ref_vc)
    out, grads = _run_kernel(inputs)
    ref, ref_grads = helpers.forward_backward(_call(reference.compressed_attention_ref), diff, _grad_out(inputs),
                                              dtype=helpers.oracle_dtype(dtype), **rest)
    expect = _heads(2, 2, 40, 16, *cells)
    _assert_nonfinite_pattern(f"[{case}] out (expected)", out, expect.float().masked_fill(expect, NAN))
    for label, got, want in [("out", out, ref), *((f"grad {n}", grads[n], ref_grads[n]) for n in grads)]:
        _assert_nonfinite_pattern(f"[{case}] {label}", got, want)
        if dtype not in helpers.LOW_PRECISION:
            finite = torch.isfinite(got)
            helpers.assert_matches(f"[{case}] {label} where finite", torch.where(finite, got, 0),
                                   torch.where(finite, want.to(got.device), 0).to(got.dtype),
                                   kind="out" if label == "out" else "grad")


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_padded_window_content_does_not_matter(device, dtype):
    """NaN / inf in k and v at padded keys whose whole compression window is padding (window 3 of batch row 0, and
    the last, partial window of batch row 1): the compressed position is masked, and the output and the gradients
    of q, k, v and the convolution bias equal the clean run's bit for bit. (The weight gradient is not compared: the
    convolution's gradient multiplies those inputs by the masked position's zero gradient.)"""
    helpers.require_device(device, OP)
    base = _inputs(device, dtype, B=2, H=2, Nq=40, Nk=37, D=16, ratio=3, mask=True, seed=71)
    kpm = base["key_padding_mask"].clone()
    kpm[0, 9:12] = False
    kpm[1, 36] = False
    base["key_padding_mask"] = kpm
    base["weight"] = base["weight"].detach()  # no weight gradient (see above)
    inputs = dict(base)
    for name, value in (("k", NAN), ("v", float("inf"))):
        t = base[name].detach().clone()
        t[0, :, 9:12] = value
        t[1, :, 36] = -value
        inputs[name] = t.requires_grad_()
    out, grads = _run_kernel(inputs)
    clean_out, clean_grads = _run_kernel(base)
    assert torch.equal(out, clean_out), f"out changed by up to {helpers.max_abs_err(out, clean_out):.3g}"
    assert set(grads) == {"q", "k", "v", "bias"}
    for name in grads:
        assert torch.equal(grads[name], clean_grads[name]), f"grad {name} changed"
    diff, rest = _split(inputs)
    ref, _ = helpers.forward_backward(_call(reference.compressed_attention_ref), diff, None, **rest)
    clean_diff, _ = _split(base)
    clean_ref, _ = helpers.forward_backward(_call(reference.compressed_attention_ref), clean_diff, None, **rest)
    assert torch.equal(ref, clean_ref), "the reference's output changed"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_padded_inputs_never_reach_the_compression(device):
    """A padded input inside a partly kept window (and one in a fully padded window) holding NaN / inf changes
    nothing: the output and every gradient, the convolution's weight included, equal the run with it zeroed."""
    helpers.require_device(device, OP)
    inputs = _inputs(device, B=2, H=2, Nq=20, Nk=24, D=16, ratio=3, seed=61)
    kpm = torch.ones(2, 24, dtype=torch.bool, device=device)
    kpm[0, 4] = False          # inside the kept window 3..5
    kpm[1, 18:21] = False      # the whole window 18..20
    inputs["key_padding_mask"] = kpm
    clean = {name: (t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t)
             for name, t in inputs.items()}
    poisoned = {name: (t.detach().clone() if isinstance(t, torch.Tensor) and t.requires_grad else t)
                for name, t in inputs.items()}
    for name, value in (("k", float("nan")), ("v", float("inf"))):
        poisoned[name][0, :, 4] = value
        poisoned[name][1, :, 18:21] = value
        clean[name].data[0, :, 4] = 0.0
        clean[name].data[1, :, 18:21] = 0.0
    for t in poisoned.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.requires_grad_()
    for impl in ("kernel", "reference"):
        out, grads = _run_kernel(poisoned, impl=impl)
        want, want_grads = _run_kernel(clean, impl=impl)
        assert torch.equal(out, want), f"{impl}: the padded inputs changed the output"
        for name in grads:
            g, w = grads[name], want_grads[name]
            if name in ("k", "v"):  # the padded rows get no gradient at all
                assert torch.equal(g[0, :, 4], torch.zeros_like(g[0, :, 4])), f"{impl}: grad {name} at padding"
                g, w = g.clone(), w.clone()
                g[0, :, 4] = w[0, :, 4] = 0
                g[1, :, 18:21] = w[1, :, 18:21] = 0
            assert torch.equal(g, w), f"{impl}: grad {name} differs from the run with the padding zeroed"


def test_kv_compress_bf16_odd_row_stride():
    """bf16 k, v whose rows are an odd number of elements apart (the CPU bf16 kernel reads rows in 32-bit pairs:
    such inputs are copied): the same bits as the contiguous run."""
    B, H, Nk, D, ratio = 2, 1, 30, 32, 3
    weight = helpers.randn(H * D, D, ratio, seed=3, scale=0.2)
    bias = helpers.randn(H * D, seed=4)
    k, v = (helpers.randn(B, H, Nk, D, seed=s, dtype=torch.bfloat16) for s in (1, 2))
    wide = [torch.full((B, H, Nk, D + 1), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    views = []
    for storage, t in zip(wide, (k, v)):
        view = storage[..., :D]
        view.copy_(t)
        assert view.stride(2) % 2 == 1
        views.append(view)
    got = ops.kv_compress(*views, weight, bias, ratio, impl="kernel")
    want = ops.kv_compress(k, v, weight, bias, ratio, impl="kernel")
    for name, a, b in zip(("kc", "vc"), got, want):
        assert torch.equal(a, b), f"{name} differs by up to {helpers.max_abs_err(a, b):.3g}"


@pytest.mark.slow
def test_kv_compress_bf16_below_avx512_bf16():
    """The bf16 cases of test_kv_compress with the CPU kernels lowered to AVX-512 without bf16 dot products
    (AF2_EXT_CPU_ISA=avx512: the fp32 kernel on fp32 copies), in a child process (the ISA is read once)."""
    env = {**os.environ, "AF2_EXT_CPU_ISA": "avx512", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{os.path.abspath(__file__)}::test_kv_compress", "-k", "bfloat16 and cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
