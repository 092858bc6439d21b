"""Tests for af2_ext.blocks: each module against the same math written directly with
torch.nn.functional.scaled_dot_product_attention and explicit reshapes (so a wrong rearrange cannot hide
behind the kernel-vs-reference comparison, which shares the module code)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import helpers
from af2_ext.blocks import AxialAttention, CrossAttention, FeedForward, MSARowAttention, SelfAttention

DIM, HEADS, DIM_HEAD = 32, 2, 16


def _sdpa(q, k, v, keep=None):
    """(b, h, n, d) attention with a (b, m) key keep mask; rows with no kept key give zeros."""
    mask = None if keep is None else keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if keep is not None:
        out = out.masked_fill(~keep.any(-1)[:, None, None, None], 0.0)
    return out


def _heads(t):
    return rearrange(t, "b n (h d) -> b h n d", h=HEADS)


def _self_attention(module: SelfAttention, x, keep):
    q, k, v = module.to_qkv(x).chunk(3, dim=-1)
    out = _sdpa(_heads(q), _heads(k), _heads(v), keep)
    return module.to_out(rearrange(out, "b h n d -> b n (h d)"))


def test_axial_attention_is_rows_plus_columns():
    torch.manual_seed(0)
    module = AxialAttention(DIM, HEADS, DIM_HEAD, block_size=16).eval()
    b, n = 2, 9
    x = helpers.randn(b, n * n, DIM, seed=1)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, -3:] = False
    pair_keep = (keep[:, :, None] & keep[:, None, :]).reshape(b, n * n)
    with torch.no_grad():
        got = module(x, seq_len=n, mask=pair_keep)
        grid = module.norm(x).reshape(b, n, n, DIM)
        rows = torch.stack([_self_attention(module.attn_rows, grid[:, i], (keep[:, i:i + 1] & keep))
                            for i in range(n)], dim=1)  # row i attends along j
        cols = torch.stack([_self_attention(module.attn_cols, grid[:, :, j], (keep & keep[:, j:j + 1]))
                            for j in range(n)], dim=2)  # column j attends along i
    expected = (rows + cols).reshape(b, n * n, DIM)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_msa_row_attention_stays_in_rows():
    torch.manual_seed(0)
    module = MSARowAttention(DIM, HEADS, DIM_HEAD, block_size=16).eval()
    b, rows, cols = 2, 3, 11
    m = helpers.randn(b, rows * cols, DIM, seed=2)
    keep = torch.rand(b, rows, cols, generator=helpers.generator(3)) < 0.8
    with torch.no_grad():
        got = module(m, msa_shape=(rows, cols), msa_mask=keep.reshape(b, -1))
        normed = module.norm(m).reshape(b, rows, cols, DIM)
        expected = torch.stack([_self_attention(module, normed[:, r], keep[:, r]) for r in range(rows)], dim=1)
    torch.testing.assert_close(got, expected.reshape(b, rows * cols, DIM), atol=2e-5, rtol=2e-5)


def test_cross_attention_compresses_keys_and_values():
    for ratio in (1, 3):
        torch.manual_seed(ratio)
        module = CrossAttention(DIM, HEADS, DIM_HEAD, ratio=ratio, context_mask_key="msa_mask").eval()
        x, context = helpers.randn(2, 13, DIM, seed=4), helpers.randn(2, 17, DIM, seed=5)
        keep = torch.rand(2, 17, generator=helpers.generator(6)) < 0.7
        with torch.no_grad():
            got = module(x, context, msa_mask=keep)
            q = _heads(module.to_q(module.norm(x)))
            k, v = module.to_kv(module.norm_context(context)).chunk(2, dim=-1)  # [b, m, h*d]
            if ratio > 1:  # padded positions are zeroed before the compression (the seed let them leak in)
                pad = (-17) % ratio
                k, v = (module.compress(F.pad(t.masked_fill(~keep[..., None], 0.0), (0, 0, 0, pad)).transpose(1, 2))
                        .transpose(1, 2) for t in (k, v))
                keep = F.pad(keep, (0, pad)).reshape(2, -1, ratio).any(-1)
            out = _sdpa(q, _heads(k), _heads(v), keep)
            expected = module.to_out(rearrange(out, "b h n d -> b n (h d)"))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_feed_forward_is_geglu():
    torch.manual_seed(0)
    module = FeedForward(DIM, mult=4).eval()
    x = helpers.randn(2, 5, DIM, seed=7)
    with torch.no_grad():
        hidden, gate = module.proj_in(module.norm(x)).chunk(2, dim=-1)
        expected = module.proj_out(hidden * F.gelu(gate))
        torch.testing.assert_close(module(x), expected)
    assert module.proj_in.out_features == 2 * 4 * DIM


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_feed_forward_chunks_are_the_same_function(device):
    """Chunked (no autograd: one chunk's hidden at a time; autograd: each chunk recomputed in the backward) and
    whole feed-forwards give the same output and gradients, with a chunk that does not divide the tokens."""
    helpers.require_device(device)
    torch.manual_seed(0)
    whole = FeedForward(32).to(device)
    chunked = FeedForward(32, chunk_size=7).to(device)
    chunked.load_state_dict(whole.state_dict())
    x = helpers.randn(2, 30, 32, seed=1, device=device, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), rtol=0, atol=0)
    grad_out = helpers.randn(2, 30, 32, seed=2, device=device)
    got = torch.autograd.grad(chunked(x), [x, *chunked.parameters()], grad_out)
    want = torch.autograd.grad(whole(x), [x, *whole.parameters()], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_feed_forward_chunked_training_saves_only_its_input():
    """With autograd, a chunked feed-forward keeps no hidden layer for the backward: the tensors saved by the
    graph are the input chunks, not the 8x-wide hidden activations the whole feed-forward saves."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, requires_grad=True)

    def saved_elements(ff):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            ff(x).sum().backward()
        return sum(total)

    whole, chunked = saved_elements(FeedForward(16)), saved_elements(FeedForward(16, chunk_size=16))
    assert whole >= 64 * 16 * 8, whole  # the hidden layer, at least
    assert chunked < 64 * 16 * 3, chunked  # inputs (and views of them) only


def test_feed_forward_rejects_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        FeedForward(16, chunk_size=0)
