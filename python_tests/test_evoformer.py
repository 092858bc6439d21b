"""af2_ext.evoformer: each block of the Evoformer (AF2 supplementary Algorithms 6, 8-12, 15) against a plain fp64
transcription of the algorithm written here with einsum, using the module's own weights re-drawn at random (the AF2
init zeroes every output layer and opens every gate, which would hide bugs); chunked against unchunked; masks
(padded residues and sequences change nothing at the kept ones); dropout; gradients; errors.

The oracles follow the supplement, with the documented semantics of the modules where they choose: masked keys
are absent (a row with none attends to nothing), the transitions' updates are masked (OpenFold), and the outer
product mean divides its output bias by the count too (DeepMind's and OpenFold's code).
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
from af2_ext.evoformer import (DropoutColumnwise, DropoutRowwise, EvoformerBlock, EvoformerStack, MSAColumnAttention,
                               MSATransition, OuterProductMean, PairTransition, TriangleMultiplicativeUpdate)

OP = "block_sparse_attention_forward"  # the kernel the attention modules run on
B, S, N = 2, 4, 21  # N spans two blocks of BLOCK
C_M, C_Z, C_ATT, HEADS, C_OPM, C_MUL, BLOCK = 16, 8, 16, 2, 4, 8, 16
N_REAL, S_REAL = N - 5, S - 1  # batch element 0: residues N_REAL.. and sequence S_REAL.. are padding
BLOCK_KWARGS = dict(c_hidden_msa_att=C_ATT, c_hidden_opm=C_OPM, c_hidden_mul=C_MUL, c_hidden_pair_att=C_ATT,
                    heads_msa=HEADS, heads_pair=HEADS, transition_n=2, block_size=BLOCK)


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from a normal (fan-in scaled weights)."""
    g = helpers.generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.5 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=g)
    return module


def masks(device="cpu", gaps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """msa_mask (B, S, N) and pair_mask (B, N, N) as a featuriser makes them: batch element 0 padded to N and S,
    pair_mask = seq_mask_i & seq_mask_j; with ``gaps``, about 20 % of the real MSA entries masked too (residue 0
    and sequence 0 kept)."""
    seq = torch.ones(B, N, dtype=torch.bool)
    seq[0, N_REAL:] = False
    rows = torch.ones(B, S, dtype=torch.bool)
    rows[0, S_REAL:] = False
    msa_mask = rows[:, :, None] & seq[:, None, :]
    if gaps:
        kept = torch.rand(B, S, N, generator=helpers.generator(5)) < 0.8
        kept[:, 0], kept[:, :, 0] = True, True
        msa_mask &= kept
    return msa_mask.to(device), (seq[:, :, None] & seq[:, None, :]).to(device)


def msa(device="cpu", seed: int = 1) -> torch.Tensor:
    return helpers.randn(B, S, N, C_M, seed=seed, device=device)


def pair(device="cpu", seed: int = 2) -> torch.Tensor:
    return helpers.randn(B, N, N, C_Z, seed=seed, device=device)


# ----------------------------------------------------------------------------------------------------------
# The oracle: the supplement's algorithms in fp64 einsum, reading the modules' weights
# ----------------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    y = torch.einsum("...c,ec->...e", x, lin.weight)
    return y if lin.bias is None else y + lin.bias


def keep_of(mask, shape, x: torch.Tensor) -> torch.Tensor:
    """The mask as 0/1 in x's dtype (all ones for None)."""
    return x.new_ones(shape) if mask is None else mask.to(x.dtype)


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim of the kept entries; a row keeping nothing is all zero."""
    empty = ~keep.any(-1, keepdim=True)
    logits = logits.masked_fill(~keep, -torch.inf).masked_fill(empty, 0.0)
    return torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)


def gated_heads(mha, x: torch.Tensor, heads: int):
    """q, k, v and the sigmoid gate, each (..., h, d)."""
    def split(lin):
        return rearrange(linear(x, lin), "... (h d) -> ... h d", h=heads)  # [..., h, d]
    return split(mha.linear_q), split(mha.linear_k), split(mha.linear_v), torch.sigmoid(split(mha.linear_g))


def gated_output(mha, gate: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return linear(rearrange(gate * o, "... h d -> ... (h d)"), mha.linear_o)


def msa_row_oracle(module, m, z, msa_mask):
    """Algorithm 7: a_sik = q_si . k_sk / sqrt(c) + b_ik, row s keeping residue k where msa_mask[s, k]."""
    q, k, v, gate = gated_heads(module.mha, layer_norm(m, module.layer_norm_m), module.heads)  # [b, s, i, h, d]
    bias = linear(layer_norm(z, module.layer_norm_z), module.linear_z)  # [b, i, k, h]
    logits = torch.einsum("bsihd,bskhd->bshik", q, k) * module.c_hidden ** -0.5 + \
        rearrange(bias, "b i k h -> b 1 h i k")
    keep = torch.ones(m.shape[:3], dtype=torch.bool, device=m.device) if msa_mask is None else msa_mask
    probs = masked_softmax(logits, rearrange(keep, "b s k -> b s 1 1 k"))
    return gated_output(module.mha, gate, torch.einsum("bshik,bskhd->bsihd", probs, v))


def msa_column_oracle(module: MSAColumnAttention, m, msa_mask):
    """Algorithm 8: a_sti = q_si . k_ti / sqrt(c), column i keeping sequence t where msa_mask[t, i]."""
    att = module._msa_att
    q, k, v, gate = gated_heads(att.mha, layer_norm(m, att.layer_norm_m), module.heads)  # [b, s, i, h, d]
    logits = torch.einsum("bsihd,btihd->bihst", q, k) * module.c_hidden ** -0.5
    keep = torch.ones(m.shape[:3], dtype=torch.bool, device=m.device) if msa_mask is None else msa_mask
    probs = masked_softmax(logits, rearrange(keep, "b t i -> b i 1 1 t"))
    return gated_output(att.mha, gate, torch.einsum("bihst,btihd->bsihd", probs, v))


def transition_oracle(module, x, mask):
    """Algorithms 9 and 15, the update zeroed where masked."""
    out = linear(torch.relu(linear(layer_norm(x, module.layer_norm), module.linear_1)), module.linear_2)
    return out * keep_of(mask, x.shape[:-1], x)[..., None]


def outer_product_mean_oracle(module: OuterProductMean, m, msa_mask):
    """Algorithm 10 over the kept sequences: z_ij = Linear(flatten(sum_s a_si (x) b_sj)) / (1e-3 + count_ij)."""
    x = layer_norm(m, module.layer_norm)
    keep = keep_of(msa_mask, m.shape[:3], m)  # [b, s, i]
    a = linear(x, module.linear_1) * keep[..., None]
    b = linear(x, module.linear_2) * keep[..., None]
    outer = rearrange(torch.einsum("bsic,bsjd->bijcd", a, b), "b i j c d -> b i j (c d)")
    return linear(outer, module.linear_out) / (1e-3 + torch.einsum("bsi,bsj->bij", keep, keep))[..., None]


def triangle_multiplication_oracle(module: TriangleMultiplicativeUpdate, z, mask):
    """Algorithms 11 (sum_k a_ik b_jk) and 12 (sum_k a_ki b_kj)."""
    x = layer_norm(z, module.layer_norm_in)
    keep = keep_of(mask, z.shape[:3], z)[..., None]
    a = torch.sigmoid(linear(x, module.linear_a_g)) * linear(x, module.linear_a_p) * keep
    b = torch.sigmoid(linear(x, module.linear_b_g)) * linear(x, module.linear_b_p) * keep
    g = torch.sigmoid(linear(x, module.linear_g))
    p = torch.einsum("bikc,bjkc->bijc" if module.outgoing else "bkic,bkjc->bijc", a, b)
    return g * linear(layer_norm(p, module.layer_norm_out), module.linear_z)


def triangle_attention_oracle(module, z, mask):
    """Algorithm 13 (row i attends along j, bias b_jk) or 14 (column j attends along i, bias b_ki)."""
    x = layer_norm(z, module.layer_norm)
    q, k, v, gate = gated_heads(module.mha, x, module.heads)  # [b, i, j, h, d]
    bias = linear(x, module.linear)  # [b, i, j, h]
    keep = torch.ones(z.shape[:3], dtype=torch.bool, device=z.device) if mask is None else mask
    scale = module.c_hidden ** -0.5
    if module.starting:
        logits = torch.einsum("bijhd,bikhd->bihjk", q, k) * scale + rearrange(bias, "b j k h -> b 1 h j k")
        probs = masked_softmax(logits, rearrange(keep, "b i k -> b i 1 1 k"))
        o = torch.einsum("bihjk,bikhd->bijhd", probs, v)
    else:
        logits = torch.einsum("bijhd,bkjhd->bjhik", q, k) * scale + rearrange(bias, "b k i h -> b 1 h i k")
        probs = masked_softmax(logits, rearrange(keep, "b k j -> b j 1 1 k"))
        o = torch.einsum("bjhik,bkjhd->bijhd", probs, v)
    return gated_output(module.mha, gate, o)


def block_oracle(block: EvoformerBlock, m, z, msa_mask, pair_mask):
    """Algorithm 6 without dropout (evaluation)."""
    m = m + msa_row_oracle(block.msa_att_row, m, z, msa_mask)
    m = m + msa_column_oracle(block.msa_att_col, m, msa_mask)
    m = m + transition_oracle(block.msa_transition, m, msa_mask)
    z = z + outer_product_mean_oracle(block.outer_product_mean, m, msa_mask)
    z = z + triangle_multiplication_oracle(block.tri_mul_out, z, pair_mask)
    z = z + triangle_multiplication_oracle(block.tri_mul_in, z, pair_mask)
    z = z + triangle_attention_oracle(block.tri_att_start, z, pair_mask)
    z = z + triangle_attention_oracle(block.tri_att_end, z, pair_mask)
    z = z + transition_oracle(block.pair_transition, z, pair_mask)
    return m, z


# ----------------------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------------------


def run(fn, module: torch.nn.Module, inputs: dict, grad_outs) -> tuple:
    """fn(module, **inputs) forward and backward on fresh leaves. Returns (outputs, {input or parameter name:
    grad}); outputs a tuple even for one."""
    leaves = {name: t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
              for name, t in inputs.items()}
    module.zero_grad(set_to_none=True)
    outs = fn(module, **leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_outs = grad_outs if isinstance(grad_outs, tuple) else (grad_outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grad_outs)])
    grads = {name: t.grad for name, t in leaves.items() if t is not None and t.is_floating_point()}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    for name, g in grads.items():
        assert g is not None, f"{name}.grad is None after backward"
    return tuple(o.detach() for o in outs), grads


def call(module, **inputs):
    return module(**inputs)


def fp64(inputs: dict) -> dict:
    return {name: t.double() if t is not None and t.is_floating_point() else t for name, t in inputs.items()}


def assert_same_run(got: tuple, ref: tuple) -> None:
    (outs, grads), (ref_outs, ref_grads) = got, ref
    for i, (out, ref_out) in enumerate(zip(outs, ref_outs)):
        helpers.assert_matches(f"output {i}", out, ref_out)
    assert grads.keys() == ref_grads.keys(), f"gradients of {sorted(grads)} != {sorted(ref_grads)}"
    for name in grads:
        helpers.assert_matches(f"grad of {name}", grads[name], ref_grads[name], kind="grad")


def against_oracle(module, oracle_fn, inputs: dict, grad_outs) -> None:
    """The module (fp32) and the oracle (fp64, the same weights) forward and backward, compared."""
    got = run(call, module, inputs, grad_outs)
    oracle = copy.deepcopy(module).double()
    ref = run(lambda mod, **kw: oracle_fn(mod, *kw.values()), oracle, fp64(inputs), grad_outs)
    assert_same_run(got, ref)


MODULES = {  # name -> (constructor, oracle, inputs(device, masked), output shape)
    "msa_column_attention": (lambda **kw: MSAColumnAttention(C_M, C_ATT, HEADS, block_size=BLOCK, **kw),
                             msa_column_oracle, lambda d, masked: {"m": msa(d), "msa_mask": masks(d)[0] if masked
                                                                    else None}, (B, S, N, C_M)),
    "msa_transition": (lambda **kw: MSATransition(C_M, 2, **kw), transition_oracle,
                       lambda d, masked: {"m": msa(d), "msa_mask": masks(d)[0] if masked else None}, (B, S, N, C_M)),
    "pair_transition": (lambda **kw: PairTransition(C_Z, 2, **kw), transition_oracle,
                        lambda d, masked: {"z": pair(d), "mask": masks(d)[1] if masked else None}, (B, N, N, C_Z)),
    "outer_product_mean": (lambda **kw: OuterProductMean(C_M, C_Z, C_OPM, **kw), outer_product_mean_oracle,
                           lambda d, masked: {"m": msa(d), "msa_mask": masks(d)[0] if masked else None},
                           (B, N, N, C_Z)),
    "tri_mul_outgoing": (lambda **kw: TriangleMultiplicativeUpdate(C_Z, C_MUL, True, **kw),
                         triangle_multiplication_oracle,
                         lambda d, masked: {"z": pair(d), "mask": masks(d)[1] if masked else None}, (B, N, N, C_Z)),
    "tri_mul_incoming": (lambda **kw: TriangleMultiplicativeUpdate(C_Z, C_MUL, False, **kw),
                         triangle_multiplication_oracle,
                         lambda d, masked: {"z": pair(d), "mask": masks(d)[1] if masked else None}, (B, N, N, C_Z)),
}
CHUNKED = [name for name in MODULES if name != "msa_column_attention"]


def make(name: str, device="cpu", seed: int = 0, **kwargs) -> torch.nn.Module:
    return randomise_(MODULES[name][0](**kwargs), seed).to(device)


# ----------------------------------------------------------------------------------------------------------
# Each block against its algorithm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_module_matches_algorithm(device, name, masked):
    helpers.require_device(device, OP)
    _, oracle_fn, inputs_of, shape = MODULES[name]
    module = make(name, device)
    inputs = inputs_of(device, masked)
    grad_out = helpers.randn(*shape, seed=9, device=device)
    against_oracle(module, oracle_fn, inputs, grad_out)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_block_matches_algorithm(device, masked):
    """The whole block (evaluation) against the composition of the oracles, with gradients to m, z and every
    parameter."""
    helpers.require_device(device, OP)
    block = randomise_(EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS), 3).to(device).eval()
    msa_mask, pair_mask = masks(device) if masked else (None, None)
    inputs = {"m": msa(device), "z": pair(device), "msa_mask": msa_mask, "pair_mask": pair_mask}
    grad_outs = (helpers.randn(B, S, N, C_M, seed=10, device=device), helpers.randn(B, N, N, C_Z, seed=11,
                                                                                     device=device))
    against_oracle(block, block_oracle, inputs, grad_outs)


def test_column_attention_reads_projections_in_place(monkeypatch):
    """q, k, v reach the op as views of the (B, N, S, H*D) projections, the columns merged into the batch."""
    seen = []
    real = ops.block_sparse_attention

    def spy(q, k, v, layout, **kwargs):
        seen.append((q, k, v, kwargs))
        return real(q, k, v, layout, **kwargs)

    monkeypatch.setattr(ops, "block_sparse_attention", spy)
    make("msa_column_attention")(msa(), masks()[0])
    assert len(seen) == 1, f"the op ran {len(seen)} times"
    *qkv, kwargs = seen[0]
    for name, t in zip("qkv", qkv):
        assert t.shape == (B * N, HEADS, S, C_ATT), f"{name} is {tuple(t.shape)}"
        assert t._base is not None and t._base.shape == (B, N, S, HEADS * C_ATT), \
            f"{name} is not a view of its (B, N, S, H*D) projection: strides {t.stride()}"
    assert kwargs.get("bias") is None, "column attention passed a bias to the op"


def test_alphafold_init():
    """AF2's init: every update's last layer zero, so a fresh block is the identity; gates weight 0 / bias 1."""
    block = EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS).eval()
    m, z = msa(), pair()
    m_out, z_out = block(m, z, *masks())
    assert torch.equal(m_out, m) and torch.equal(z_out, z), "a freshly initialised block changed m or z"
    for gate in (block.tri_mul_out.linear_a_g, block.tri_mul_in.linear_b_g, block.tri_mul_in.linear_g,
                 block.msa_att_col._msa_att.mha.linear_g):
        assert not gate.weight.any() and bool((gate.bias == 1).all()), "a gate is not weight 0 / bias 1"
    for lin in (block.outer_product_mean.linear_1, block.tri_mul_out.linear_a_p, block.msa_transition.linear_1):
        assert not lin.bias.any(), "a projection's bias is not zero"
        std = lin.weight.std().item() * lin.in_features ** 0.5
        expected = 2 ** 0.5 if lin is block.msa_transition.linear_1 else 1.0
        assert abs(std - expected) < 0.25 * expected, f"fan-in std {std:.3f}, expected {expected:.3f}"


def test_openfold_parameter_names():
    """OpenFold's state dict keys (its EvoformerBlock's, with the ``core.`` prefix stripped)."""
    names = set(dict(EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS).named_parameters()))
    expected = {
        "msa_att_col._msa_att.layer_norm_m.weight", "msa_att_col._msa_att.mha.linear_q.weight",
        "msa_att_col._msa_att.mha.linear_g.bias", "msa_att_col._msa_att.mha.linear_o.weight",
        "msa_transition.linear_1.weight", "msa_transition.linear_2.bias", "msa_transition.layer_norm.weight",
        "outer_product_mean.layer_norm.bias", "outer_product_mean.linear_1.weight",
        "outer_product_mean.linear_2.bias", "outer_product_mean.linear_out.weight",
        *(f"tri_mul_{d}.{p}" for d in ("out", "in") for p in (
            "linear_a_p.weight", "linear_a_g.bias", "linear_b_p.bias", "linear_b_g.weight", "linear_g.weight",
            "linear_z.bias", "layer_norm_in.weight", "layer_norm_out.bias")),
        "tri_att_start.linear.weight", "tri_att_end.mha.linear_v.weight", "pair_transition.linear_2.weight",
        "msa_att_row.linear_z.weight",
    }
    assert expected <= names, f"missing OpenFold names: {sorted(expected - names)}"


# ----------------------------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 6])
@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("device", helpers.DEVICES)
def test_chunked_matches_unchunked(device, name, chunk_size):
    """Values and gradients (checkpointed chunks) and the values without autograd (preallocated output)."""
    helpers.require_device(device, OP)
    whole = make(name, device)
    chunked = make(name, device, chunk_size=chunk_size)
    inputs = MODULES[name][2](device, True)
    grad_out = helpers.randn(*MODULES[name][3], seed=12, device=device)
    assert_same_run(run(call, chunked, inputs, grad_out), run(call, whole, inputs, grad_out))
    with torch.no_grad():
        helpers.assert_matches("no-grad output", chunked(**inputs), whole(**inputs))


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_block_chunked_matches_unchunked(device):
    """In training (dropout on): the same generator state gives the same masks, chunked or not."""
    helpers.require_device(device, OP)
    whole = randomise_(EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS), 4).to(device).train()
    chunked = randomise_(EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS, chunk_size=5), 4).to(device).train()
    msa_mask, pair_mask = masks(device)
    inputs = {"m": msa(device), "z": pair(device), "msa_mask": msa_mask, "pair_mask": pair_mask}
    grad_outs = (helpers.randn(B, S, N, C_M, seed=13, device=device), helpers.randn(B, N, N, C_Z, seed=14,
                                                                                     device=device))
    runs = []
    for block in (chunked, whole):
        torch.manual_seed(7)
        runs.append(run(call, block, inputs, grad_outs))
    assert_same_run(*runs)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while fn runs (what a checkpointed chunk
    saves inside is dropped by the checkpoint, so it is not counted)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("name", CHUNKED)
def test_chunking_bounds_saved_activations(name):
    """N = 40, chunks of 8 rows: autograd keeps the chunks' inputs (and the multiplicative update's normalised
    pair and b), not their N**2-sized intermediates."""
    n = 40
    msa_mask = torch.ones(1, S, n, dtype=torch.bool)
    inputs = {"msa_transition": (torch.randn(1, S, n, C_M, requires_grad=True), msa_mask),
              "outer_product_mean": (torch.randn(1, S, n, C_M, requires_grad=True), msa_mask)}
    x, mask = inputs.get(name, (torch.randn(1, n, n, C_Z, requires_grad=True), torch.ones(1, n, n, dtype=torch.bool)))
    whole = saved_bytes(lambda: MODULES[name][0]()(x, mask))
    chunked = saved_bytes(lambda: MODULES[name][0](chunk_size=8)(x, mask))
    assert chunked <= whole / 3, f"chunked saves {chunked} bytes, unchunked {whole}"
    if "transition" in name:
        assert chunked <= x.numel() * x.element_size() + mask.numel(), f"chunked saves {chunked} bytes"


def test_gradcheck_fp64():
    """fp64 gradcheck through the inputs and every parameter: column attention on the CPU kernel with a fully
    masked column, the chunked multiplicative update and outer product mean."""
    n, s = 5, 3
    mask = torch.rand(1, s, n, generator=helpers.generator(40)) < 0.7
    mask[0, :, 1] = False
    mask[0, 0] = True
    cases = [
        (MSAColumnAttention(4, 16, 2, block_size=16, impl="kernel"), (1, s, n, 4), mask),
        (TriangleMultiplicativeUpdate(3, 4, False, chunk_size=2), (1, n, n, 3), mask[0, :1, :, None] & mask[0, :1]),
        (OuterProductMean(4, 3, 2, chunk_size=2), (1, s, n, 4), mask),
    ]
    for i, (module, shape, case_mask) in enumerate(cases):
        module = randomise_(module, 41 + i).double()
        x = helpers.randn(*shape, seed=50 + i, dtype=torch.float64, requires_grad=True)
        names = [name for name, _ in module.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

        def fn(x, *args):
            return functional_call(module, dict(zip(names, args)), (x, case_mask))

        assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True), type(module).__name__


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------


def with_garbage(m: torch.Tensor, z: torch.Tensor, msa_mask, pair_mask, seed: int):
    """m and z with every masked entry replaced by large random values."""
    m_junk = helpers.randn(*m.shape, seed=seed, device=m.device, scale=1e3)
    z_junk = helpers.randn(*z.shape, seed=seed + 1, device=z.device, scale=1e3)
    return torch.where(msa_mask[..., None], m, m_junk), torch.where(pair_mask[..., None], z, z_junk)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_padding_changes_nothing_real(device):
    """Two blocks deep: kept entries are the same whatever the masked ones hold, and the same as the unpadded
    problem's (batch element 0 cropped to its real residues and sequences); nothing is NaN."""
    helpers.require_device(device, OP)
    stack = randomise_(EvoformerStack(2, C_M, C_Z, **BLOCK_KWARGS), 6).to(device).eval()
    msa_mask, pair_mask = masks(device)
    m, z = msa(device), pair(device)
    with torch.no_grad():
        m_out, z_out = stack(m, z, msa_mask, pair_mask)
        for seed in (20, 30):
            m_junk, z_junk = stack(*with_garbage(m, z, msa_mask, pair_mask, seed), msa_mask, pair_mask)
            helpers.assert_finite("m with garbage padding", m_junk)
            helpers.assert_finite("z with garbage padding", z_junk)
            helpers.assert_matches("m at kept entries", m_junk[msa_mask], m_out[msa_mask])
            helpers.assert_matches("z at kept pairs", z_junk[pair_mask], z_out[pair_mask])
        m_crop, z_crop = stack(m[:1, :S_REAL, :N_REAL], z[:1, :N_REAL, :N_REAL], msa_mask[:1, :S_REAL, :N_REAL],
                               pair_mask[:1, :N_REAL, :N_REAL])
    kept = msa_mask[:1, :S_REAL, :N_REAL]
    helpers.assert_matches("m cropped", m_crop[kept], m_out[:1, :S_REAL, :N_REAL][kept])
    helpers.assert_matches("z cropped", z_crop, z_out[:1, :N_REAL, :N_REAL])


def test_masked_updates():
    """The transitions leave masked entries unchanged; the outer product mean of a pair without a kept sequence
    is its output bias / eps; a fully masked column's column attention is linear_o's bias."""
    msa_mask, pair_mask = masks()
    m, z = msa(), pair()
    assert not make("msa_transition")(m, msa_mask)[~msa_mask].any(), "masked MSA entries got a transition update"
    assert not make("pair_transition")(z, pair_mask)[~pair_mask].any(), "masked pairs got a transition update"
    opm = make("outer_product_mean")
    out = opm(m, msa_mask)[0, N_REAL:, N_REAL:]  # [n, n, c_z]: padded residues, no sequence kept
    helpers.assert_matches("padded opm", out, (opm.linear_out.bias / opm.eps).detach().expand_as(out))
    col = make("msa_column_attention")
    out = col(m, msa_mask)[0, :, N_REAL:]  # [s, n, c_m]: padded columns
    assert torch.equal(out, col._msa_att.mha.linear_o.bias.detach().expand_as(out)), \
        "a fully masked column's update is not linear_o.bias"


# ----------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, shared_dim", [(DropoutRowwise, 1), (DropoutColumnwise, 2)])
def test_dropout_shares_its_mask(cls, shared_dim):
    x = torch.ones(2, 6, 7, 50, dtype=torch.float64)
    dropout = cls(0.25)
    assert dropout.eval()(x) is x, "dropout is not the identity in evaluation"
    torch.manual_seed(0)
    out = dropout.train()(x)
    assert set(out.unique().tolist()) <= {0.0, 1 / 0.75}, "kept entries are not scaled by 1 / (1 - p)"
    first = out.narrow(shared_dim, 0, 1)
    assert torch.equal(out, first.expand_as(out)), f"the mask is not shared along dimension {shared_dim}"
    other = 3 - shared_dim
    assert not torch.equal(out, out.narrow(other, 0, 1).expand_as(out)), \
        f"the mask is shared along dimension {other} too"
    dropped = (first == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.05, f"dropped {dropped:.3f} of the entries at p = 0.25"
    assert torch.equal(cls(0.0).train()(x), x) and not cls(1.0).train()(x).any()


def test_block_dropout():
    """Evaluation is deterministic; training draws the masks from the generator (the same seed, the same
    output) and applies the row-wise layers to the MSA row attention, the multiplicative updates and the
    starting-node attention, the column-wise one to the ending-node attention."""
    block = randomise_(EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS), 8)
    msa_mask, pair_mask = masks()
    m, z = msa(), pair()
    with torch.no_grad():
        block.eval()
        first, second = block(m, z, msa_mask, pair_mask), block(m, z, msa_mask, pair_mask)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "evaluation is not deterministic"
        block.train()
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(block(m, z, msa_mask, pair_mask))
        assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])), "training is not reproducible by seed"
        assert not any(torch.equal(a, b) for a, b in zip(outs[0], outs[2])), "training draws no dropout"
        assert not any(torch.equal(a, b) for a, b in zip(outs[0], first)), "training equals evaluation"

        calls = {}

        def record(name):
            return lambda mod, args, out: calls.setdefault(name, []).append(args[0])

        updates = {}
        for name in ("msa_att_row", "tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"):
            getattr(block, name).register_forward_hook(lambda mod, args, out, name=name: updates.update({name: out}))
        for name in ("msa_dropout_layer", "ps_dropout_row_layer", "ps_dropout_col_layer"):
            getattr(block, name).register_forward_hook(record(name))
        block(m, z, msa_mask, pair_mask)
    assert isinstance(block.msa_dropout_layer, DropoutRowwise) and block.msa_dropout_layer.p == 0.15
    assert isinstance(block.ps_dropout_row_layer, DropoutRowwise) and block.ps_dropout_row_layer.p == 0.25
    assert isinstance(block.ps_dropout_col_layer, DropoutColumnwise) and block.ps_dropout_col_layer.p == 0.25
    expected = {"msa_dropout_layer": ["msa_att_row"], "ps_dropout_col_layer": ["tri_att_end"],
                "ps_dropout_row_layer": ["tri_mul_out", "tri_mul_in", "tri_att_start"]}
    for layer, sources in expected.items():
        got = calls.get(layer, [])
        assert len(got) == len(sources) and all(t is updates[s] for t, s in zip(got, sources)), \
            f"{layer} is not applied to {sources}'s updates"


def test_gradients_reach_every_parameter():
    """Two blocks in training: every parameter gets a finite, non-zero gradient."""
    stack = randomise_(EvoformerStack(2, C_M, C_Z, **BLOCK_KWARGS), 9).train()
    msa_mask, pair_mask = masks()
    torch.manual_seed(0)
    m_out, z_out = stack(msa(), pair(), msa_mask, pair_mask)
    (m_out.square().mean() + z_out.square().mean()).backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        helpers.assert_finite(f"{name}.grad", p.grad)
        assert p.grad.abs().max() > 0, f"{name}'s gradient is zero"


def test_stack_is_its_blocks_in_sequence():
    stack = randomise_(EvoformerStack(2, C_M, C_Z, **BLOCK_KWARGS), 10).eval()
    assert len(stack.blocks) == 2 and all(isinstance(b, EvoformerBlock) for b in stack.blocks)
    msa_mask, pair_mask = masks()
    m, z = msa(), pair()
    with torch.no_grad():
        got = stack(m, z, msa_mask, pair_mask)
        for block in stack.blocks:
            m, z = block(m, z, msa_mask, pair_mask)
    assert torch.equal(got[0], m) and torch.equal(got[1], z)


# ----------------------------------------------------------------------------------------------------------
# Errors name the argument
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, error, match", [
    (lambda: MSAColumnAttention(C_M, 24, HEADS), ValueError, "c_hidden"),
    (lambda: MSAColumnAttention(C_M, C_ATT, 0), ValueError, "heads"),
    (lambda: MSAColumnAttention(C_M, C_ATT, HEADS, block_size=48), ValueError, "block_size"),
    (lambda: MSAColumnAttention(C_M, C_ATT, HEADS, impl="fast"), ValueError, "impl"),
    (lambda: MSATransition(0), ValueError, "^c_m"),
    (lambda: PairTransition(C_Z, n=0), ValueError, "^n must"),
    (lambda: PairTransition(C_Z, chunk_size=0), ValueError, "^chunk_size"),
    (lambda: MSATransition(C_M, chunk_size=True), TypeError, "^chunk_size"),
    (lambda: OuterProductMean(C_M, C_Z, 0), ValueError, "^c_hidden"),
    (lambda: OuterProductMean(C_M, C_Z, eps=0.0), ValueError, "^eps"),
    (lambda: TriangleMultiplicativeUpdate(C_Z, 2.5), TypeError, "^c_hidden"),
    (lambda: DropoutRowwise(1.5), ValueError, r"^p \(the dropout probability\)"),
    (lambda: EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS | {"pair_dropout": -0.1}), ValueError, "^p "),
    (lambda: EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS | {"c_hidden_pair_att": 12}), ValueError, "c_hidden"),
    (lambda: EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS, chunk_size=-1), ValueError, "^chunk_size"),
    (lambda: EvoformerStack(0, C_M, C_Z), ValueError, "^depth"),
])
def test_bad_config(build, error, match):
    with pytest.raises(error, match=match):
        build()


M5, Z5 = torch.randn(1, 2, 5, C_M), torch.randn(1, 5, 5, C_Z)
MASK5, PAIR5 = torch.ones(1, 2, 5, dtype=torch.bool), torch.ones(1, 5, 5, dtype=torch.bool)


@pytest.mark.parametrize("name, args, error, match", [
    ("msa_column_attention", (torch.randn(2, 5, C_M),), ValueError, r"^m must be \(B, S, N, c_m=16\)"),
    ("msa_column_attention", (M5, torch.ones(1, 2, 5)), TypeError, r"^msa_mask must be bool .*msa_mask\.bool\(\)"),
    ("msa_column_attention", (M5, torch.ones(1, 2, 4, dtype=torch.bool)), ValueError,
     r"^msa_mask must be \(B=1, S=2, N=5\)"),
    ("msa_transition", (torch.randn(1, 2, 5, C_M + 1),), ValueError, "^m must be"),
    ("msa_transition", (M5, PAIR5), ValueError, "^msa_mask must be"),
    ("outer_product_mean", (torch.zeros(1, 2, 5, C_M, dtype=torch.long),), TypeError, "^m must be a floating"),
    ("outer_product_mean", (M5, torch.ones(1, 2, 5, dtype=torch.bool, device="meta")), ValueError,
     "^msa_mask must be on"),
    ("pair_transition", (torch.randn(1, 5, 4, C_Z),), ValueError, "^z must be .* two equal N"),
    ("pair_transition", (Z5, MASK5), ValueError, r"^mask must be \(B=1, N=5, N=5\)"),
    ("tri_mul_outgoing", ([[0.0]],), TypeError, "^z must be a torch.Tensor"),
    ("tri_mul_incoming", (Z5, PAIR5.float()), TypeError, "^mask must be bool"),
])
def test_module_bad_inputs(name, args, error, match):
    with pytest.raises(error, match=match):
        MODULES[name][0]()(*args)


@pytest.mark.parametrize("args, error, match", [
    ((M5[0], Z5), ValueError, r"^m must be \(B, S, N, c_m=16\)"),
    ((M5, Z5[:, :4, :4]), ValueError, r"^z must be \(B=1, N=5, N=5, c_z=8\) to match m"),
    ((M5, Z5.double()), ValueError, "^z must have m's device and dtype"),
    ((M5, Z5, MASK5.float()), TypeError, "^msa_mask must be bool"),
    ((M5, Z5, MASK5, MASK5), ValueError, r"^pair_mask must be \(B=1, N=5, N=5\)"),
    ((M5, Z5, None, PAIR5.int()), TypeError, "^pair_mask must be bool"),
])
def test_block_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        EvoformerBlock(C_M, C_Z, **BLOCK_KWARGS)(*args)
