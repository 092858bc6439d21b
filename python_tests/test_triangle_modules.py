"""af2_ext.triangle: TriangleAttention (AF2 Alg. 13 / 14) and MSARowAttentionWithPairBias (Alg. 7) against a
plain-PyTorch fp64 transcription of the algorithms written here, with the modules' own (random) weights.

The oracle writes Algorithm 14 as the supplement does (attention along columns, bias b_ki), not as the module's
transpose, and masks with -inf logits, a row with no visible key giving zero before the gate: the modules'
documented semantics.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call

import helpers
from af2_ext import ops
from af2_ext.triangle import MSARowAttentionWithPairBias, TriangleAttention

OP = "block_sparse_attention_forward"  # the kernel triangle_attention runs on
B, N, S = 2, 37, 3  # N not a multiple of the block size
C_Z, C_M, C_HIDDEN, HEADS, BLOCK = 8, 12, 16, 2, 16
EMPTY_ROW = 3  # the row (starting) / column (ending) whose keys are all masked, in batch element 0
EMPTY_MSA_ROW = 1  # the MSA row whose residues are all masked, in batch element 0


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from a normal (fan-in scaled weights): the AF2 init zeroes the output and opens
    every gate, which would make the comparisons trivial."""
    g = helpers.generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=g)
    return module


def triangle(starting: bool, device="cpu", seed: int = 0, **kwargs) -> TriangleAttention:
    module = TriangleAttention(C_Z, C_HIDDEN, HEADS, starting, block_size=BLOCK, **kwargs)
    return randomise_(module, seed).to(device)


def msa_row(device="cpu", seed: int = 0, **kwargs) -> MSARowAttentionWithPairBias:
    module = MSARowAttentionWithPairBias(C_M, C_Z, C_HIDDEN, HEADS, block_size=BLOCK, **kwargs)
    return randomise_(module, seed).to(device)


def keep_mask(*shape: int, seed: int, device="cpu") -> torch.Tensor:
    """bool keep mask, about 70 % kept, key 0 always kept."""
    mask = torch.rand(*shape, generator=helpers.generator(seed)) < 0.7
    mask[..., 0] = True
    return mask.to(device)


# ----------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of the kept entries; a row keeping nothing is all zero (finite gradients)."""
    empty = ~keep.any(-1, keepdim=True)
    logits = logits.masked_fill(~keep, -torch.inf).masked_fill(empty, 0.0)
    return torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)


def projections(mha, x: torch.Tensor, heads: int):
    """q, k, v, sigmoid gate, each (..., h, d), from OpenFold-named weights."""
    def heads_of(linear: torch.nn.Linear) -> torch.Tensor:
        y = torch.einsum("...c,ec->...e", x, linear.weight)
        y = y if linear.bias is None else y + linear.bias
        return rearrange(y, "... (h d) -> ... h d", h=heads)  # [..., h, d]

    q, k, v = (heads_of(linear) for linear in (mha.linear_q, mha.linear_k, mha.linear_v))
    return q, k, v, torch.sigmoid(heads_of(mha.linear_g))


def output(mha, gate: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...e,ce->...c", rearrange(gate * o, "... h d -> ... (h d)"), mha.linear_o.weight) + \
        mha.linear_o.bias


def triangle_oracle(module: TriangleAttention, z: torch.Tensor, mask) -> torch.Tensor:
    """Algorithm 13 (starting) or 14 (ending) as the supplement writes them; mask (B, N, N) or None."""
    x = F.layer_norm(z, (module.c_z,), module.layer_norm.weight, module.layer_norm.bias, module.layer_norm.eps)
    q, k, v, gate = projections(module.mha, x, module.heads)  # [b, i, j, h, d]
    b = torch.einsum("bijc,hc->bijh", x, module.linear.weight)  # [b, i, j, h]
    scale = module.c_hidden ** -0.5
    mask = torch.ones(z.shape[:3], dtype=torch.bool, device=z.device) if mask is None else mask
    if module.starting:  # a_ijk = q_ij . k_ik + b_jk; row i keeps key k where mask[i, k]
        logits = torch.einsum("bijhd,bikhd->bihjk", q, k) * scale + rearrange(b, "b j k h -> b 1 h j k")
        probs = masked_softmax(logits, rearrange(mask, "b i k -> b i 1 1 k"))
        o = torch.einsum("bihjk,bikhd->bijhd", probs, v)
    else:  # a_ijk = q_ij . k_kj + b_ki; column j keeps key k where mask[k, j]
        logits = torch.einsum("bijhd,bkjhd->bjhik", q, k) * scale + rearrange(b, "b k i h -> b 1 h i k")
        probs = masked_softmax(logits, rearrange(mask, "b k j -> b j 1 1 k"))
        o = torch.einsum("bjhik,bkjhd->bijhd", probs, v)
    return output(module.mha, gate, o)


def msa_row_oracle(module: MSARowAttentionWithPairBias, m: torch.Tensor, z: torch.Tensor, msa_mask) -> torch.Tensor:
    """Algorithm 7: a_sik = q_si . k_sk + b_ik; row s keeps residue k where msa_mask[s, k]."""
    ln_m, ln_z = module.layer_norm_m, module.layer_norm_z
    x = F.layer_norm(m, (module.c_m,), ln_m.weight, ln_m.bias, ln_m.eps)
    q, k, v, gate = projections(module.mha, x, module.heads)  # [b, s, i, h, d]
    b = torch.einsum("bikc,hc->bikh", F.layer_norm(z, (module.c_z,), ln_z.weight, ln_z.bias, ln_z.eps),
                     module.linear_z.weight)  # [b, i, k, h]
    logits = torch.einsum("bsihd,bskhd->bshik", q, k) * module.c_hidden ** -0.5 + rearrange(b, "b i k h -> b 1 h i k")
    msa_mask = torch.ones(m.shape[:3], dtype=torch.bool, device=m.device) if msa_mask is None else msa_mask
    probs = masked_softmax(logits, rearrange(msa_mask, "b s k -> b s 1 1 k"))
    return output(module.mha, gate, torch.einsum("bshik,bskhd->bsihd", probs, v))


# ----------------------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------------------


def call(module: torch.nn.Module, **inputs) -> torch.Tensor:
    return module(**inputs)


def run(fn, module: torch.nn.Module, inputs: dict, grad_out: torch.Tensor):
    """fn(module, **inputs) forward and backward on fresh leaves; (out, {input or parameter name: grad})."""
    leaves = {name: t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for name, t in inputs.items()}
    module.zero_grad(set_to_none=True)
    out = fn(module, **leaves)
    out.backward(grad_out.to(out.dtype))
    grads = {name: t.grad for name, t in leaves.items() if t is not None and t.is_floating_point()}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    for name, g in grads.items():
        assert g is not None, f"{name}.grad is None after backward"
    return out.detach(), grads


def fp64(inputs: dict) -> dict:
    return {name: t.double() if t is not None and t.is_floating_point() else t for name, t in inputs.items()}


def assert_same_run(got: tuple, ref: tuple) -> None:
    out, grads = got
    ref_out, ref_grads = ref
    helpers.assert_matches("out", out, ref_out)
    assert grads.keys() == ref_grads.keys(), f"gradients of {sorted(grads)} != {sorted(ref_grads)}"
    for name in grads:
        helpers.assert_matches(f"grad of {name}", grads[name], ref_grads[name], kind="grad")


def pair_inputs(device, masked: bool, starting: bool) -> dict:
    z = helpers.randn(B, N, N, C_Z, seed=10, device=device)
    mask = None
    if masked:
        mask = keep_mask(B, N, N, seed=11, device=device)
        if starting:
            mask[0, EMPTY_ROW, :] = False  # row i = EMPTY_ROW sees no key
        else:
            mask[0, :, EMPTY_ROW] = False  # column j = EMPTY_ROW sees no key
    return {"z": z, "mask": mask}


def msa_inputs(device, masked: bool) -> dict:
    msa_mask = None
    if masked:
        msa_mask = keep_mask(B, S, N, seed=22, device=device)
        msa_mask[0, EMPTY_MSA_ROW] = False
    return {"m": helpers.randn(B, S, N, C_M, seed=20, device=device),
            "z": helpers.randn(B, N, N, C_Z, seed=21, device=device), "msa_mask": msa_mask}


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_triangle_attention_matches_algorithm(device, starting, masked):
    helpers.require_device(device, OP)
    module = triangle(starting, device, impl="kernel")
    inputs = pair_inputs(device, masked, starting)
    grad_out = helpers.randn(B, N, N, C_Z, seed=12, device=device)
    got = run(call, module, inputs, grad_out)
    oracle = copy.deepcopy(module).double()
    ref = run(triangle_oracle, oracle, fp64(inputs), grad_out)
    assert_same_run(got, ref)
    if masked:  # no visible key: zero attention, so the update is exactly the output projection's bias
        empty = got[0][0, EMPTY_ROW] if starting else got[0][0, :, EMPTY_ROW]  # [n, c]
        expected = module.mha.linear_o.bias.detach().expand_as(empty)
        assert torch.equal(empty, expected), f"the fully masked row's update is not linear_o.bias: {empty[:2]}"


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_msa_row_attention_matches_algorithm(device, masked):
    helpers.require_device(device, OP)
    module = msa_row(device, impl="kernel")
    inputs = msa_inputs(device, masked)
    grad_out = helpers.randn(B, S, N, C_M, seed=23, device=device)
    got = run(call, module, inputs, grad_out)
    oracle = copy.deepcopy(module).double()
    ref = run(msa_row_oracle, oracle, fp64(inputs), grad_out)
    assert_same_run(got, ref)
    if masked:
        empty = got[0][0, EMPTY_MSA_ROW]  # [n, c_m]
        assert torch.equal(empty, module.mha.linear_o.bias.detach().expand_as(empty)), \
            "the fully masked MSA row's update is not linear_o.bias"


@pytest.mark.parametrize("kind", ["starting", "ending", "msa_row"])
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_kernel_matches_reference(device, kind):
    helpers.require_device(device, OP)
    inputs, grad_out = make_inputs(kind, device)
    got = run(call, make_module(kind, device, impl="kernel"), inputs, grad_out)  # the same random weights
    ref = run(call, make_module(kind, device, impl="reference"), inputs, grad_out)
    assert_same_run(got, ref)


def make_module(kind: str, device="cpu", **kwargs) -> torch.nn.Module:
    return msa_row(device, **kwargs) if kind == "msa_row" else triangle(kind == "starting", device, **kwargs)


def make_inputs(kind: str, device="cpu") -> tuple:
    """(inputs, grad_out), masked, for ``kind``."""
    if kind == "msa_row":
        return msa_inputs(device, True), helpers.randn(B, S, N, C_M, seed=30, device=device)
    return pair_inputs(device, True, kind == "starting"), helpers.randn(B, N, N, C_Z, seed=30, device=device)


def fresh_layout(num_blocks: int) -> torch.Tensor:
    """A new layout tensor per call (dense but for one left-out block): the op's index cache has never seen it."""
    layout = torch.ones(HEADS, num_blocks, num_blocks, dtype=torch.bool)
    layout[:, 0, -1] = False
    return layout


@pytest.mark.parametrize("kind", ["starting", "ending", "msa_row"])
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_recompute_gives_the_same_gradients(device, kind):
    """recompute=True (the default: the projections recomputed in the backward around the kept kernel output) gives
    the outputs and gradients of recompute=False, bitwise; the first call runs on a layout the op's index cache has
    not seen (its forward converts the layout, the recompute finds it cached)."""
    helpers.require_device(device, OP)
    inputs, grad_out = make_inputs(kind, device)
    got = run(call, make_module(kind, device, impl="kernel", layout_fn=fresh_layout), inputs, grad_out)
    ref = run(call, make_module(kind, device, impl="kernel", layout_fn=fresh_layout, recompute=False), inputs,
              grad_out)
    assert torch.equal(got[0], ref[0]), "recompute changed the output"
    for name in ref[1]:
        assert torch.equal(got[1][name], ref[1][name]), f"recompute changed the gradient of {name}"


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["starting", "ending", "msa_row"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_recompute_reruns_the_projections_not_the_attention(kind, impl):
    """With the kernel, the backward recomputes the LayerNorms and projections (they are not held from the
    forward) but not the attention (its output and log-sum-exp are kept). The reference attention is not
    checkpointed: its backward recomputes nothing."""
    inputs, grad_out = make_inputs(kind)
    counts = {}
    for recompute in (True, False):
        module = make_module(kind, impl=impl, recompute=recompute)
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None
                  for k, v in inputs.items()}
        out = module(**leaves)
        with _OpCounter() as counter:
            out.backward(grad_out)
        counts[recompute] = counter.counts
    with_recompute, without = counts[True], counts[False]
    assert with_recompute.get(OP, 0) == 0 and without.get(OP, 0) == 0, "the backward ran the attention forward"
    if impl == "kernel":
        assert with_recompute.get("native_layer_norm", 0) >= 1 and without.get("native_layer_norm", 0) == 0, \
            (with_recompute, without)
        recomputed_mm = with_recompute.get("mm", 0) + with_recompute.get("addmm", 0)
        assert recomputed_mm > without.get("mm", 0) + without.get("addmm", 0), (with_recompute, without)
    else:
        assert with_recompute == without, "the reference attention was checkpointed"


def test_recompute_graph_is_differentiated_once():
    """A recompute graph's kept attention output serves one backward; recompute=False allows retain_graph."""
    inputs, grad_out = make_inputs("starting")
    for recompute in (True, False):
        z = inputs["z"].detach().clone().requires_grad_()
        out = make_module("starting", impl="kernel", recompute=recompute)(z, inputs["mask"])
        out.backward(grad_out, retain_graph=True)
        if recompute:
            with pytest.raises(RuntimeError, match="backward an extra time"):
                out.backward(grad_out)
        else:
            out.backward(grad_out)


@pytest.mark.parametrize("kind", ["starting", "ending", "msa_row"])
def test_gradcheck_fp64(kind):
    """fp64 gradcheck on the CPU kernel, through the inputs and every parameter, with a fully masked row
    (recompute=False: gradcheck differentiates the graph more than once)."""
    n = 5
    if kind == "msa_row":
        module = randomise_(MSARowAttentionWithPairBias(4, 3, 16, 2, block_size=16, impl="kernel",
                                                        recompute=False), 1).double()
        mask = keep_mask(1, 2, n, seed=41)
        mask[0, 1] = False
        inputs = (helpers.randn(1, 2, n, 4, seed=42, dtype=torch.float64, requires_grad=True),
                  helpers.randn(1, n, n, 3, seed=43, dtype=torch.float64, requires_grad=True))
    else:
        module = randomise_(TriangleAttention(4, 16, 2, kind == "starting", block_size=16, impl="kernel",
                                              recompute=False), 1).double()
        mask = keep_mask(1, n, n, seed=41)
        mask[0, 1] = False
        inputs = (helpers.randn(1, n, n, 4, seed=42, dtype=torch.float64, requires_grad=True),)
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def fn(*args):
        return functional_call(module, dict(zip(names, args[len(inputs):])), (*args[:len(inputs)], mask))

    assert torch.autograd.gradcheck(fn, (*inputs, *params), fast_mode=True)


@pytest.mark.parametrize("kind", ["starting", "ending", "msa_row"])
def test_projections_reach_the_op_without_copies(kind, monkeypatch):
    """q, k, v are views of the projections that the op can read in place (its B and N dimensions merge)."""
    seen = []
    real = ops.triangle_attention

    def spy(q, k, v, bias, mask=None, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, bias, mask, **kwargs)

    monkeypatch.setattr(ops, "triangle_attention", spy)
    if kind == "msa_row":
        msa_row()(**msa_inputs("cpu", True))
    else:
        triangle(kind == "starting")(**pair_inputs("cpu", True, kind == "starting"))
    assert len(seen) == 1, f"the op ran {len(seen)} times"
    for name, t in zip("qkv", seen[0]):
        b, n, h, q, d = t.shape
        assert t._base is not None, f"{name} is not a view of its projection"
        assert t.reshape(b * n, h, q, d).data_ptr() == t.data_ptr() and t.stride(0) == n * t.stride(1), \
            f"{name} {tuple(t.shape)} with strides {t.stride()} would be copied by the op"


def test_alphafold_init():
    """AF2's init: the output projection zero ('final'), gates weight 0 / bias 1 ('gating'): a fresh module's
    update is exactly zero."""
    for module in (TriangleAttention(C_Z, C_HIDDEN, HEADS, False, block_size=BLOCK),
                   MSARowAttentionWithPairBias(C_M, C_Z, C_HIDDEN, HEADS, block_size=BLOCK)):
        mha = module.mha
        assert not mha.linear_o.weight.any() and not mha.linear_o.bias.any(), "linear_o is not zero-initialised"
        assert not mha.linear_g.weight.any() and bool((mha.linear_g.bias == 1).all()), \
            "linear_g is not weight 0 / bias 1"
        if isinstance(module, TriangleAttention):
            out = module(helpers.randn(1, 5, 5, C_Z, seed=50))
        else:
            out = module(helpers.randn(1, 2, 5, C_M, seed=51), helpers.randn(1, 5, 5, C_Z, seed=52))
        assert out.abs().max().item() == 0.0, "a freshly initialised module's update is not zero"


@pytest.mark.parametrize("kwargs, match", [
    (dict(c_hidden=24), "c_hidden"),
    (dict(heads=0), "heads"),
    (dict(c_z=0), "c_z"),
    (dict(block_size=48), "block_size"),
    (dict(impl="fast"), "impl"),
])
def test_bad_config(kwargs, match):
    config = dict(c_z=C_Z, c_hidden=C_HIDDEN, heads=HEADS) | kwargs
    with pytest.raises(ValueError, match=match):
        TriangleAttention(**config)
    msa_config = dict(c_m=C_M, c_z=C_Z, c_hidden=C_HIDDEN, heads=HEADS) | kwargs
    with pytest.raises(ValueError, match=match):
        MSARowAttentionWithPairBias(**msa_config)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(5, 5, C_Z),), ValueError, r"^z must be \(B, N, N, c_z=8\)"),
    ((torch.randn(1, 5, 4, C_Z),), ValueError, "^z must be .* two equal N"),
    ((torch.randn(1, 5, 5, C_Z + 1),), ValueError, "^z must be"),
    ((torch.zeros(1, 5, 5, C_Z, dtype=torch.long),), TypeError, "^z must be a floating tensor"),
    (([[0.0]],), TypeError, "^z must be a torch.Tensor"),
    ((torch.randn(1, 5, 5, C_Z), torch.ones(1, 5, 5)), TypeError, r"^mask must be bool .*mask\.bool\(\)"),
    ((torch.randn(1, 5, 5, C_Z), torch.ones(1, 5, 4, dtype=torch.bool)), ValueError,
     r"^mask must be \(B=1, N=5, N=5\)"),
    ((torch.randn(1, 5, 5, C_Z), torch.ones(1, 5, 5, dtype=torch.bool, device="meta")), ValueError,
     "^mask must be on"),
])
def test_triangle_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        TriangleAttention(C_Z, C_HIDDEN, HEADS, block_size=BLOCK)(*args)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 5, C_M), torch.randn(1, 5, 5, C_Z)), ValueError, r"^m must be \(B, S, N, c_m=12\)"),
    ((torch.randn(1, 2, 5, C_M), torch.randn(1, 4, 4, C_Z)), ValueError, r"^z must be \(B=1, N=5, N=5, c_z=8\)"),
    ((torch.randn(1, 2, 5, C_M), torch.randn(2, 5, 5, C_Z)), ValueError, "^z must be .* to match m"),
    ((torch.randn(1, 2, 5, C_M), torch.randn(1, 5, 5, C_Z + 1)), ValueError, "^z must be"),
    ((torch.randn(1, 2, 5, C_M), torch.randn(1, 5, 5, C_Z), torch.ones(1, 2, 5)), TypeError,
     "^msa_mask must be bool"),
    ((torch.randn(1, 2, 5, C_M), torch.randn(1, 5, 5, C_Z), torch.ones(1, 5, 5, dtype=torch.bool)), ValueError,
     r"^msa_mask must be \(B=1, S=2, N=5\)"),
])
def test_msa_row_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        MSARowAttentionWithPairBias(C_M, C_Z, C_HIDDEN, HEADS, block_size=BLOCK)(*args)


def test_no_recompute_inside_a_reversible_backward():
    """A reversible backward recomputes a coupling and differentiates it at once: the module does not checkpoint
    there (the backward would recompute the projections a second time), and its gradients are unchanged."""
    from af2_ext.reversible import Coupling, ReversibleCouplings

    class Update(torch.nn.Module):  # halves[1] += attention(halves[0])
        def __init__(self, recompute: bool):
            super().__init__()
            self.attention = make_module("starting", impl="kernel", recompute=recompute)

        def forward(self, z):
            return self.attention(z)

    inputs, grad_out = make_inputs("starting")
    counts, grads = {}, {}
    for recompute in (True, False):
        sequence = ReversibleCouplings([Coupling(Update(recompute), 1, [0])], 2)
        z = inputs["z"].detach().clone().requires_grad_()
        _, out = sequence(z, z.detach().clone())
        with _OpCounter() as counter:
            out.backward(grad_out)
        counts[recompute], grads[recompute] = counter.counts, z.grad
    assert counts[True].get("native_layer_norm") == counts[False].get("native_layer_norm"), counts
    assert torch.equal(grads[True], grads[False])
