"""Tests for af2_ext.Alphafold2: the seed's usage, kernel vs reference (same parameters), the seed defects we
fix (one test each), input errors, torch.compile."""
from __future__ import annotations

import pytest
import torch

import helpers
from af2_ext import Alphafold2

SMALL = dict(dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64)


def _batch(device, *, b=2, n=20, rows=3, cols=18, msa=True, embedds=False, pad=True, seed=0, num_embedds=24):
    g = helpers.generator(seed)
    seq = torch.randint(0, 21, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    batch = dict(seq=seq, mask=mask)
    if msa:
        batch["msa"] = torch.randint(0, 21, (b, rows, cols), generator=g)
        batch["msa_mask"] = torch.ones(b, rows, cols, dtype=torch.bool)
    if embedds:
        batch["embedds"] = torch.randn(b, n, num_embedds, generator=g)
    if pad:  # a shorter second protein and a shorter alignment
        mask[1, n - 5:] = False
        if msa:
            batch["msa_mask"][1, :, cols - 4:] = False
    return {k: v.to(device) for k, v in batch.items()}


def _forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch)
    weights = helpers.randn(*logits.shape, seed=77, device=logits.device, dtype=logits.dtype)
    (logits * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


CONFIGS = {
    "dense": dict(),
    "sparse_tuple": dict(sparse_self_attn=(True, False)),
    "ratio2": dict(cross_attn_compress_ratio=2),
    "ratio3_reversible": dict(cross_attn_compress_ratio=3, reversible=True),
    "ratio4_row_msa": dict(cross_attn_compress_ratio=4, inter_msa_self_attn=False),
    "reversible_row_msa": dict(reversible=True, inter_msa_self_attn=False),
    "reversible_no_msa": dict(reversible=True, _batch=dict(msa=False)),
    "no_msa": dict(_batch=dict(msa=False)),
    "embedds": dict(num_embedds=24, _batch=dict(msa=False, embedds=True)),
    "reversible_sparse_embedds": dict(reversible=True, sparse_self_attn=True, num_embedds=24, inter_msa_self_attn=False,
                                      _batch=dict(msa=False, embedds=True)),
    "no_padding": dict(_batch=dict(pad=False)),
    "relative_positions": dict(relative_positions=4, reversible=True, sparse_self_attn=True),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_matches_reference(device, name):
    helpers.require_device(device, "kv_compress_forward")
    config = dict(CONFIGS[name])
    batch_kw = config.pop("_batch", {})
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, **config).to(device)
    batch = _batch(device, **batch_kw)
    logits, grads = _forward_backward(model.set_impl("kernel"), batch)
    ref_logits, ref_grads = _forward_backward(model.set_impl("reference"), batch)
    assert logits.shape == (2, 20, 20, 37)
    helpers.assert_finite("logits", logits)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-5)
    # The reversible trunk returns zeros where autograd returns None: parameters that only reach the discarded
    # MSA output of the last layer.
    assert set(ref_grads) <= set(grads), sorted(set(ref_grads) - set(grads))
    for pname in set(grads) - set(ref_grads):
        assert not grads[pname].any(), f"grad {pname}: nonzero where ordinary autograd has none"
    assert len(ref_grads) > 20, f"only {len(ref_grads)} parameters got gradients"
    for pname in ref_grads:
        torch.testing.assert_close(grads[pname], ref_grads[pname], atol=5e-5, rtol=5e-4,
                                   msg=lambda m, p=pname: f"grad {p}: {m}")


def test_bf16_by_the_tolerance_rule_cpu():
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, cross_attn_compress_ratio=2)
    batch = _batch("cpu")
    ref32, _ = _forward_backward(model.set_impl("reference"), batch)
    model = model.to(torch.bfloat16)
    ref16, _ = _forward_backward(model.set_impl("reference"), batch)
    got, _ = _forward_backward(model.set_impl("kernel"), batch)
    helpers.assert_matches("bf16 logits", got.float(), ref32, ref_lowp=ref16.float(), precision=torch.bfloat16)


def test_seed_readme_example_cpu():
    """The seed README's usage, with alphafold2_pytorch replaced by af2_ext and no .cuda()."""
    from af2_ext.utils import MDScaling, center_distogram_torch

    model = Alphafold2(dim=256, depth=2, heads=8, dim_head=64, reversible=False)
    seq = torch.randint(0, 21, (1, 128))
    msa = torch.randint(0, 21, (1, 5, 64))
    mask = torch.ones_like(seq).bool()
    msa_mask = torch.ones_like(msa).bool()
    with torch.no_grad():
        distogram = model(seq, msa, mask=mask, msa_mask=msa_mask)
    assert distogram.shape == (1, 128, 128, 37)
    helpers.assert_finite("distogram", distogram)
    torch.testing.assert_close(distogram, distogram.transpose(1, 2))  # symmetrised

    from af2_ext import utils

    utils._WARNED.discard("center_distogram_logits")
    with pytest.warns(RuntimeWarning, match="taken as logits"):  # the README passes logits
        distances, weights = center_distogram_torch(distogram)
    coords_3d, _ = MDScaling(distances, weights=weights, iters=200, fix_mirror=0)
    assert distances.shape == weights.shape == (1, 128, 128) and coords_3d.shape == (3, 128)  # the seed's (3, N) at fix_mirror=0
    helpers.assert_finite("coords", coords_3d)


# ----------------------------------------------------------------------------------------------------------
# The seed's defects, fixed: one test each
# ----------------------------------------------------------------------------------------------------------


def test_pair_mask_is_and_not_or():
    """Logits between kept residues do not depend on padded residues (the seed's OR mask let a padded
    residue's row through)."""
    torch.manual_seed(0)
    model = Alphafold2(**SMALL).eval()
    batch = _batch("cpu", pad=True)
    changed = dict(batch, seq=batch["seq"].clone())
    changed["seq"][1, -5:] = (changed["seq"][1, -5:] + 7) % 21
    with torch.no_grad():
        a, b = model(**batch), model(**changed)
    torch.testing.assert_close(a[1, :15, :15], b[1, :15, :15], atol=1e-5, rtol=1e-5)
    assert (a[1, 15:] - b[1, 15:]).abs().max() > 1e-3, "padded residues' own logits should change"


def test_compression_applies_when_divisible():
    """MSA length 18 is divisible by ratio 3: the compression still runs (the seed skipped it)."""
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, cross_attn_compress_ratio=3).eval()
    batch = _batch("cpu", cols=18, pad=False)
    with torch.no_grad():
        before = model(**batch)
        model.layers[0][2].fn.compress.weight.mul_(2.0)
        after = model(**batch)
    assert (before - after).abs().max() > 1e-4, "the compression weights had no effect"


@pytest.mark.parametrize("inter", [True, False])
def test_inter_msa_self_attention_spans_rows(inter):
    """inter_msa_self_attn=True: an MSA token attends to other rows and to its own row (never only to itself);
    False: only within its row."""
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, inter_msa_self_attn=inter).eval()
    msa_attn = model.layers[0][1].fn
    rows, cols = 3, 18
    m = helpers.randn(1, rows * cols, 32, seed=1)
    context = dict(seq_len=20, mask=None, msa_mask=None, msa_shape=(rows, cols))
    changed = m.clone()
    changed[:, cols:2 * cols] = helpers.randn(1, cols, 32, seed=2)  # row 1 only (a constant shift would be
    # normalised away by the pre-norm)
    with torch.no_grad():
        a, b = msa_attn(m, **context), msa_attn(changed, **context)
    row0_changed = (a[:, :cols] - b[:, :cols]).abs().max().item()
    if inter:
        assert row0_changed > 1e-4, "row 0 did not see row 1"
    else:
        assert row0_changed == 0.0, "row 0 saw row 1 with inter_msa_self_attn=False"
    # and a token does not only see itself: changing its neighbours in its own row changes it
    changed = m.clone()
    changed[:, 1:cols] = helpers.randn(1, cols - 1, 32, seed=3)
    with torch.no_grad():
        assert (msa_attn(changed, **context)[:, 0] - a[:, 0]).abs().max() > 1e-4


def test_sparse_tuple_is_per_layer():
    model = Alphafold2(dim=32, depth=4, heads=2, dim_head=16, max_seq_len=512, sparse_self_attn=(True, False) * 2)
    flags = [(layer[0].fn.attn_rows.sparse, layer[1].fn.sparse) for layer in model.layers]
    assert flags == [(True, True), (False, False), (True, True), (False, False)], flags
    layout = model.layers[0][0].fn.attn_rows.layout(512, torch.device("cpu"))
    assert layout.shape == (2, 32, 32) and not bool(layout.all()), "the sparse layout is dense"
    with pytest.raises(ValueError, match="sparse_self_attn must be a bool or a tuple of 4 bools"):
        Alphafold2(dim=32, depth=4, heads=2, dim_head=16, sparse_self_attn=(True, False))


def test_reversible_recompute_keeps_msa_rows():
    """Reversible with row-wise MSA attention: the recompute sees the MSA row structure, so gradients equal
    those of ordinary autograd on the same parameters (the seed's recompute attended across rows)."""
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, reversible=True, inter_msa_self_attn=False, ff_dropout=0.2)
    batch = _batch("cpu")
    torch.manual_seed(5)
    _, grads = _forward_backward(model.set_impl("kernel"), batch)
    torch.manual_seed(5)
    _, ref = _forward_backward(model.set_impl("reference"), batch)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=5e-5, rtol=5e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_cross_attention_normalises_context_with_its_own_norm():
    torch.manual_seed(0)
    model = Alphafold2(**SMALL).eval()
    batch = _batch("cpu", pad=False)
    cross = model.layers[0][2].fn
    with torch.no_grad():
        before = model(**batch)
        cross.norm_context.weight.mul_(3.0)
        after = model(**batch)
    assert (before - after).abs().max() > 1e-4, "norm_context is not used"


def test_reversible_without_msa():
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, reversible=True)
    logits, grads = _forward_backward(model, _batch("cpu", msa=False))
    assert logits.shape == (2, 20, 20, 37) and grads


# ----------------------------------------------------------------------------------------------------------
# Input errors, torch.compile
# ----------------------------------------------------------------------------------------------------------

BAD = {
    "too_long": (dict(seq=torch.zeros(1, 65, dtype=torch.long)), r"seq length must be in \[1, max_seq_len=64\]"),
    "token": (dict(seq=torch.full((1, 8), 21)), r"seq token ids must be in \[0, num_tokens=21\)"),
    "msa_rows": (dict(seq=torch.zeros(1, 8, dtype=torch.long), msa=torch.zeros(1, 21, 8, dtype=torch.long)),
                 r"msa must have 1 to 20 rows"),
    "msa_token": (dict(seq=torch.zeros(1, 8, dtype=torch.long), msa=torch.full((1, 2, 8), 30)),
                  r"msa token ids must be in \[0, num_tokens=21\)"),
    "mask_shape": (dict(seq=torch.zeros(1, 8, dtype=torch.long), mask=torch.ones(1, 7, dtype=torch.bool)),
                   r"mask must be bool \(b, n\) = \(1, 8\)"),
    "mask_dtype": (dict(seq=torch.zeros(1, 8, dtype=torch.long), mask=torch.ones(1, 8)), r"mask must be bool"),
    "msa_mask_shape": (dict(seq=torch.zeros(1, 8, dtype=torch.long), msa=torch.zeros(1, 2, 8, dtype=torch.long),
                            msa_mask=torch.ones(1, 2, 7, dtype=torch.bool)), r"msa_mask must be bool with msa's shape"),
    "float_seq": (dict(seq=torch.zeros(1, 8)), r"seq must be an integer tensor"),
    "both": (dict(seq=torch.zeros(1, 8, dtype=torch.long), msa=torch.zeros(1, 2, 8, dtype=torch.long),
                  embedds=torch.zeros(1, 8, 1280)), r"pass msa or embedds, not both"),
    "sparse_msa_too_long": (dict(seq=torch.zeros(1, 8, dtype=torch.long), msa=torch.zeros(1, 9, 8, dtype=torch.long)),
                            r"needs rows \* columns <= max_seq_len=64, got 72", dict(sparse_self_attn=True)),
    "embedds_shape": (dict(seq=torch.zeros(1, 8, dtype=torch.long), embedds=torch.zeros(1, 8, 10)),
                      r"embedds must be float \(b, n, num_embedds\) = \(1, 8, 1280\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case):
    kwargs, match, *options = BAD[case]
    model = Alphafold2(**{**SMALL, "depth": 1, **(options[0] if options else {})})
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"dim_head must be one of"):
        Alphafold2(dim=32, dim_head=48)
    with pytest.raises(ValueError, match=r"cross_attn_compress_ratio must be an int >= 1"):
        Alphafold2(dim=32, dim_head=16, cross_attn_compress_ratio=0)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        Alphafold2(dim=32, dim_head=16, impl="fast")
    with pytest.raises(ValueError, match=r"relative_positions must be an int >= 0"):
        Alphafold2(dim=32, dim_head=16, relative_positions=-1)
    # Refused when the model is built, not at its first forward.
    with pytest.raises(ValueError, match=r"block_size must be one of \(16, 32, 64, 128\).*got 48"):
        Alphafold2(dim=32, dim_head=16, block_size=48)
    with pytest.raises(ValueError, match=r"sparse_block_size must be one of .*got 8"):
        Alphafold2(dim=32, dim_head=16, sparse_self_attn=True, sparse_block_size=8)


def test_relative_positions_embed_the_clipped_offset():
    """Off (0) is the seed's model with the same initial parameters; on, each pair (i, j) gets the embedding of
    clamp(j - i, -R, R) (checked at the embedding's input), and that embedding reaches the logits."""
    torch.manual_seed(0)
    seed_model = Alphafold2(**SMALL)
    torch.manual_seed(0)
    off = Alphafold2(**SMALL, relative_positions=0)
    assert off.rel_pos_emb is None
    assert seed_model.state_dict().keys() == off.state_dict().keys()
    for (name, p), q in zip(seed_model.state_dict().items(), off.state_dict().values()):
        assert torch.equal(p, q), name
    model = Alphafold2(**SMALL, relative_positions=3)
    seen = {}
    model.rel_pos_emb.register_forward_hook(lambda module, args, out: seen.update(offsets=args[0]))
    model(seq=torch.randint(0, 21, (1, 9)))
    expected = (torch.arange(9)[None, :] - torch.arange(9)[:, None]).clamp(-3, 3) + 3
    assert torch.equal(seen["offsets"], expected)
    seq = torch.randint(0, 21, (1, 9))
    with torch.no_grad():
        base = model(seq=seq)
        model.rel_pos_emb.weight[6] += torch.randn(SMALL["dim"])  # offset j - i >= 3 (not a constant: LayerNorm)
        changed = (model(seq=seq) - base).abs().amax(-1) > 1e-4
    assert changed.any(), "the relative position embedding does not reach the logits"


@pytest.mark.parametrize("reversible", [False, True], ids=["sequential", "reversible"])
def test_forward_traces_as_one_graph(reversible):
    torch._dynamo.reset()
    model = Alphafold2(**SMALL, reversible=reversible, cross_attn_compress_ratio=2).eval()
    batch = _batch("cpu")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


def test_torch_compile_forward():
    """torch.compile of the forward runs and matches eager (the input checks read token ranges: a documented
    graph break)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Alphafold2(**SMALL, cross_attn_compress_ratio=2).eval()
    batch = _batch("cpu")
    with torch.no_grad():
        eager = model(**batch)
        compiled = torch.compile(model)(**batch)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Non-finite inputs: a NaN in a real residue's embedding reaches the whole distogram of its protein under the kernels
# as under the reference (the kernels used to drop it); one in a padded residue changes nothing for the real ones
# ----------------------------------------------------------------------------------------------------------

NONFINITE_CONFIGS = ["embedds", "reversible_sparse_embedds"]


def _embedds_model(device, name):
    config = dict(CONFIGS[name])
    batch = _batch(device, **config.pop("_batch"))
    torch.manual_seed(0)
    return Alphafold2(**SMALL, **config).to(device).eval(), batch


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name", NONFINITE_CONFIGS)
def test_nan_embedding_poisons_its_protein(device, impl, name):
    helpers.require_device(device, "kv_compress_forward")
    model, batch = _embedds_model(device, name)
    model.set_impl(impl)
    with torch.no_grad():
        clean = model(**batch)
        batch["embedds"][0, 3, 5] = float("nan")  # residue 3 of protein 0 is real
        logits = model(**batch)
    assert torch.isnan(logits[0]).all(), f"{int(torch.isfinite(logits[0]).sum())} finite logits of protein 0"
    assert torch.equal(logits[1], clean[1]), "protein 1 changed"


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("name", NONFINITE_CONFIGS)
def test_nan_in_a_padded_residue_changes_nothing_real(device, impl, name):
    helpers.require_device(device, "kv_compress_forward")
    model, batch = _embedds_model(device, name)
    model.set_impl(impl)
    mask = batch["mask"]
    assert not mask[1, -2], "residue n - 2 of protein 1 is padding"
    with torch.no_grad():
        clean = model(**batch)
        batch["embedds"][1, -2] = float("nan")
        logits = model(**batch)
    real = (mask[:, :, None] & mask[:, None, :])  # [b, i, j]
    helpers.assert_finite("logits of real residue pairs", logits[real])
    torch.testing.assert_close(logits[real], clean[real], atol=0, rtol=0)


@pytest.mark.parametrize("reversible", [False, True])
def test_ff_chunk_size_is_the_same_function(reversible):
    """Feed-forwards run in chunks (chunk 37 does not divide the 400 pair tokens) give the model the same logits
    and gradients as whole ones, in the reversible trunk (chunks recomputed inside the coupling's recompute) and
    the sequential one (chunks recomputed by checkpointing)."""
    torch.manual_seed(0)
    whole = Alphafold2(**SMALL, reversible=reversible, ff_chunk_size=None)
    chunked = Alphafold2(**SMALL, reversible=reversible, ff_chunk_size=37)
    chunked.load_state_dict(whole.state_dict())
    batch = _batch("cpu")
    logits, grads = _forward_backward(chunked, batch)
    ref_logits, ref = _forward_backward(whole, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=5e-5, rtol=5e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_ff_chunk_size_auto_chunks_both_trunks():
    from af2_ext.blocks import FeedForward
    from af2_ext.model import FF_CHUNK_SIZE

    def chunk_sizes(model):
        return {m.chunk_size for m in model.modules() if isinstance(m, FeedForward)}

    assert chunk_sizes(Alphafold2(**SMALL, reversible=True)) == {FF_CHUNK_SIZE}
    assert chunk_sizes(Alphafold2(**SMALL)) == {FF_CHUNK_SIZE}
    assert chunk_sizes(Alphafold2(**SMALL, ff_chunk_size=None)) == {None}
    assert chunk_sizes(Alphafold2(**SMALL, reversible=True, ff_chunk_size=None)) == {None}
    assert chunk_sizes(Alphafold2(**SMALL, ff_chunk_size=128)) == {128}
    for bad in (0, -1, True, "big", 1.5):
        with pytest.raises(ValueError, match="ff_chunk_size"):
            Alphafold2(**SMALL, ff_chunk_size=bad)
