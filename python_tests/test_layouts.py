"""Tests for af2_ext.layouts; expected patterns are hand-derived from DeepSpeed's sparsity_config.py semantics."""

import numpy as np
import pytest
import torch

import helpers
from af2_ext import layouts


def _t(rows):
    """Nested 0/1 lists -> [1, nq, nk] bool layout."""
    return torch.tensor(rows, dtype=torch.bool).unsqueeze(0)


def _assert_layout_equal(actual, expected):
    assert actual.dtype == torch.bool, f"dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"\nactual\n{actual.int()}\nexpected\n{expected.int()}"


BUILDERS = {
    "dense": lambda nq, nk, h, seed: layouts.dense(nq, nk, num_heads=h),
    "local": lambda nq, nk, h, seed: layouts.local(nq, nk, window=3, num_heads=h),
    "bigbird": lambda nq, nk, h, seed: layouts.bigbird(nq, nk, num_random=2, num_heads=h, seed=seed),
    "fixed": lambda nq, nk, h, seed: layouts.fixed(nq, nk, num_different_global_patterns=2, num_heads=h),
    "variable": lambda nq, nk, h, seed: layouts.variable(nq, nk, num_random_blocks=2, num_heads=h, seed=seed),
}


# ----------------------------------------------------------------------------------------------------------
# Shapes, dtype, determinism
# ----------------------------------------------------------------------------------------------------------


def test_num_blocks():
    assert layouts.num_blocks(64, 16) == 4
    assert layouts.num_blocks(65, 16) == 5
    assert layouts.num_blocks(1, 16) == 1


def test_numpy_integers_are_ints():
    """Sizes go through af2_ext._checks.check_int: numpy integers count as ints (bools never do)."""
    assert layouts.num_blocks(np.int64(65), np.int32(16)) == 5
    _assert_layout_equal(layouts.local(np.int64(4), window=np.int64(3)), layouts.local(4, window=3))
    _assert_layout_equal(layouts.bigbird(4, num_random=1, seed=np.int64(7)), layouts.bigbird(4, num_random=1, seed=7))
    with pytest.raises(TypeError, match="num_heads must be a positive int"):
        layouts.dense(2, num_heads=np.bool_(True))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("nq, nk", [(6, 6), (5, 9), (9, 4)])
def test_builder_shape_and_dtype(name, nq, nk):
    layout = BUILDERS[name](nq, nk, 3, 0)
    assert layout.dtype == torch.bool
    assert layout.shape == (3, nq, nk)
    assert layout.any(dim=-1).all(), "every query block must see at least one key block"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_num_k_blocks_defaults_to_num_q_blocks(name):
    assert torch.equal(BUILDERS[name](7, None, 2, 0), BUILDERS[name](7, 7, 2, 0))


@pytest.mark.parametrize("name", ["bigbird", "variable"])
def test_random_parts_deterministic_given_seed_and_vary_with_seed(name):
    first = BUILDERS[name](16, 16, 4, 123)
    assert torch.equal(first, BUILDERS[name](16, 16, 4, 123))
    assert not torch.equal(first, BUILDERS[name](16, 16, 4, 124))


@pytest.mark.parametrize("name", ["bigbird", "variable"])
def test_builders_leave_global_rng_alone(name):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    BUILDERS[name](16, 16, 2, 5)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------------------------------------
# Known patterns
# ----------------------------------------------------------------------------------------------------------


def test_dense_is_all_true():
    layout = layouts.dense(3, 5, num_heads=2)
    assert layout.all()
    assert layouts.density(layout) == 1.0


def test_local_band():
    expected = _t([
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ])
    _assert_layout_equal(layouts.local(5, window=3), expected)
    # window // 2 is the half-width: an even window behaves like the next odd one.
    _assert_layout_equal(layouts.local(5, window=2), expected)
    _assert_layout_equal(layouts.local(4, window=1, num_heads=2), torch.eye(4, dtype=torch.bool).expand(2, 4, 4))


def test_local_non_square_follows_scaled_diagonal():
    # Query block i is centred on key block i * 8 // 4 = 2i.
    _assert_layout_equal(layouts.local(4, 8, window=3), _t([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ]))
    # Query block i is centred on key block i * 2 // 4 = i // 2.
    _assert_layout_equal(layouts.local(4, 2, window=1), _t([[1, 0], [1, 0], [0, 1], [0, 1]]))


def test_bigbird_without_random_is_window_plus_global():
    _assert_layout_equal(layouts.bigbird(6, window=3, num_global=1, num_random=0), _t([
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
        [1, 0, 0, 0, 1, 1],
    ]))


def test_bigbird_random_blocks_added_among_unset():
    n, window, num_global, num_random = 12, 3, 2, 3
    base = layouts.bigbird(n, window=window, num_global=num_global, num_random=0)
    layout = layouts.bigbird(n, window=window, num_global=num_global, num_random=num_random, num_heads=4, seed=1)
    assert (layout >= base).all(), "random blocks must only add to window + global"
    assert layout[:, :num_global, :].all() and layout[:, :, :num_global].all(), "global rows/cols must be dense"
    added = (layout & ~base).sum(dim=-1)  # [h, n]
    free = (~base).sum(dim=-1).expand_as(added)
    assert torch.equal(added, torch.minimum(free, torch.full_like(free, num_random)))
    assert not all(torch.equal(layout[0], layout[h]) for h in range(1, 4)), "heads must differ"


def test_bigbird_num_random_clamped_to_available():
    assert layouts.bigbird(5, num_random=100, num_heads=2).all()


def test_fixed_short_last_window_with_horizontal_global():
    # 7 blocks, windows {0..3}, {4..6}; global block is the last of a window (3) and, for the short
    # window, min(4 + 3, 7 - 1) = 6.
    _assert_layout_equal(layouts.fixed(7, horizontal_global_attention=True), _t([
        [1, 1, 1, 1, 0, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ]))


def test_fixed_different_global_patterns_per_head():
    # Pattern p uses offset 4 - (1 + p) within each window: head 0 -> {3, 7}, head 1 -> {2, 6}, head 2 -> p=0.
    block = [1, 1, 1, 1, 0, 0, 0, 0]
    local = [block] * 4 + [block[::-1]] * 4
    head0 = [[v | (j in (3, 7)) for j, v in enumerate(row)] for row in local]
    head1 = [[v | (j in (2, 6)) for j, v in enumerate(row)] for row in local]
    expected = torch.tensor([head0, head1, head0], dtype=torch.bool)
    _assert_layout_equal(layouts.fixed(8, num_different_global_patterns=2, num_heads=3), expected)


def test_fixed_global_run_pulled_back_in_short_window():
    # Window 4, two global blocks at offsets {2, 3}; short window {4, 5}: start = min(4 + 2, 6 - 2) = 4.
    _assert_layout_equal(layouts.fixed(6, num_local_blocks=4, num_global_blocks=2), _t([
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ]))


def test_variable_windows_last_size_repeats():
    # Windows of 2, 3, then 3 again: {0, 1}, {2, 3, 4}, {5, 6, 7}; block 0 global (vertical only).
    _assert_layout_equal(layouts.variable(8, local_window_blocks=(2, 3)), _t([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 0, 0, 1, 1, 1],
    ]))


def test_variable_global_ranges_with_horizontal():
    # Global range [1, 3) seen by all queries and, horizontally, seeing all keys; index 9 is out of range.
    _assert_layout_equal(
        layouts.variable(6, local_window_blocks=(3,), global_block_indices=(1, 9), global_block_end_indices=(3, 12),
                         horizontal_global_attention=True),
        _t([
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1],
        ]))


def test_variable_random_blocks():
    n, num_random = 16, 3
    base = layouts.variable(n)
    layout = layouts.variable(n, num_random_blocks=num_random, num_heads=3, seed=7)
    assert (layout[0] >= base[0]).all(), "random blocks must only add to local + global"
    assert ((layout[0] & ~base[0]).sum(dim=-1) <= num_random).all()
    assert (layout[0] & ~base[0]).any(), "some random block should land outside local + global"
    # DeepSpeed's default different_layout_per_head=False: one layout for all heads.
    assert torch.equal(layout[1], layout[0]) and torch.equal(layout[2], layout[0])
    # Every key block can be drawn: the full row count equals num_random without local/global.
    random_only = layouts.variable(n, local_window_blocks=(1,), global_block_indices=(),
                                   num_random_blocks=num_random, seed=7)
    assert (random_only.sum(dim=-1) >= num_random).all() and (random_only.sum(dim=-1) <= num_random + 1).all()


def test_seed_default_matches_seed_config():
    # seq 256, block 16: 16 blocks, 256 // 16 // 4 = 4 random blocks per row.
    layout = layouts.seed_default(256, num_heads=2, seed=3)
    assert torch.equal(layout, layouts.variable(16, num_random_blocks=4, num_heads=2, seed=3))
    # Partial last block: 100 tokens -> 7 blocks, 100 // 16 // 4 = 1 random block.
    assert torch.equal(layouts.seed_default(100, seed=3), layouts.variable(7, num_random_blocks=1, seed=3))
    assert torch.equal(layouts.seed_default(48, block_size=8), layouts.variable(6, num_random_blocks=1))


def test_density():
    assert layouts.density(layouts.local(4, window=3)) == pytest.approx(10 / 16)
    assert layouts.density(layouts.local(4, window=1, num_heads=3)) == pytest.approx(4 / 16)
    assert layouts.density(layouts.fixed(7, horizontal_global_attention=True)) == pytest.approx(37 / 49)
    assert layouts.density(layouts.bigbird(6, num_random=0)) == pytest.approx(24 / 36)
    assert layouts.density(torch.zeros(2, 3, 3, dtype=torch.bool)) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Element masks
# ----------------------------------------------------------------------------------------------------------


def test_from_mask_small_example():
    mask = torch.tensor([
        [1, 0, 0],
        [0, 0, 0],
        [0, 0, 1],
    ], dtype=torch.bool)
    _assert_layout_equal(layouts.from_mask(mask, 2), _t([[1, 0], [0, 1]]))
    _assert_layout_equal(layouts.from_mask(mask.expand(3, 3, 3), 2), _t([[1, 0], [0, 1]]).expand(3, 2, 2))


def test_to_mask_small_example():
    mask = layouts.to_mask(_t([[1, 0], [0, 1]]), 2, 3, 4)
    expected = torch.tensor([
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
    ], dtype=torch.bool).unsqueeze(0)
    _assert_layout_equal(mask, expected)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_mask_round_trip(device):
    helpers.require_device(device)
    generator = torch.Generator().manual_seed(0)
    block_size, seq_q, seq_k = 8, 37, 29  # tails of 5 and 5 elements
    layout = (torch.rand(3, 5, 4, generator=generator) < 0.5).to(device)
    mask = layouts.to_mask(layout, block_size, seq_q, seq_k)
    assert mask.shape == (3, seq_q, seq_k) and mask.dtype == torch.bool and mask.device == layout.device
    _assert_layout_equal(layouts.from_mask(mask, block_size), layout)

    element_mask = (torch.rand(2, seq_q, seq_k, generator=generator) < 0.02).to(device)
    coarse = layouts.from_mask(element_mask, block_size)
    assert coarse.shape == (2, 5, 4)
    covering = layouts.to_mask(coarse, block_size, seq_q, seq_k)
    assert (covering >= element_mask).all(), "to_mask(from_mask(m)) must cover m"
    _assert_layout_equal(layouts.from_mask(covering, block_size), coarse)


# ----------------------------------------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------------------------------------

_LAYOUT = layouts.dense(2)

BAD_CALLS = [
    (lambda: layouts.num_blocks(0, 16), ValueError, "seq_len must be a positive int, got 0"),
    (lambda: layouts.num_blocks(16, 2.0), TypeError, "block_size must be a positive int"),
    (lambda: layouts.dense(0), ValueError, "num_q_blocks must be a positive int, got 0"),
    (lambda: layouts.dense(2, -1), ValueError, "num_k_blocks must be a positive int"),
    (lambda: layouts.dense(2, num_heads=True), TypeError, "num_heads must be a positive int"),
    (lambda: layouts.local(4, window=0), ValueError, "window must be a positive int, got 0"),
    (lambda: layouts.bigbird(4, num_global=5), ValueError, r"num_global must be <= num_k_blocks \(4\)"),
    (lambda: layouts.bigbird(4, num_random=-1), ValueError, "num_random must be an int >= 0"),
    (lambda: layouts.bigbird(4, seed="a"), TypeError, "seed must be an int >= 0"),
    (lambda: layouts.fixed(4, num_local_blocks=3, num_global_blocks=2), ValueError,
     "num_global_blocks must divide num_local_blocks"),
    (lambda: layouts.fixed(4, num_different_global_patterns=5), ValueError,
     r"num_different_global_patterns must be <= num_local_blocks // num_global_blocks \(4\)"),
    (lambda: layouts.fixed(4, horizontal_global_attention=1), TypeError,
     "horizontal_global_attention must be a bool"),
    (lambda: layouts.variable(4, local_window_blocks=()), ValueError,
     "local_window_blocks must be a non-empty sequence of positive ints"),
    (lambda: layouts.variable(4, local_window_blocks=(2, 0)), ValueError, "local_window_blocks must be"),
    (lambda: layouts.variable(4, global_block_indices=3), TypeError, "global_block_indices must be a sequence"),
    (lambda: layouts.variable(4, global_block_end_indices=()), ValueError,
     r"global_block_end_indices must have the length of global_block_indices \(1\)"),
    (lambda: layouts.variable(4, global_block_indices=(2,), global_block_end_indices=(2,)), ValueError,
     "global_block_end_indices must be > global_block_indices"),
    (lambda: layouts.variable(4, num_random_blocks=5), ValueError, r"num_random_blocks must be <= num_k_blocks"),
    (lambda: layouts.seed_default(0), ValueError, "seq_len must be a positive int"),
    (lambda: layouts.from_mask(torch.ones(4, 4), 2), TypeError,
     r"mask must be a bool tensor of shape \(Nq, Nk\) or \(H, Nq, Nk\), got torch.float32"),
    (lambda: layouts.from_mask(torch.ones(4, dtype=torch.bool), 2), TypeError, r"mask must be .* got .*\(4,\)"),
    (lambda: layouts.from_mask(torch.ones(4, 4, dtype=torch.bool), 0), ValueError, "block_size must be"),
    (lambda: layouts.to_mask(_LAYOUT.int(), 2, 4, 4), TypeError, "layout must be a bool tensor"),
    (lambda: layouts.to_mask(_LAYOUT, 2, 5, 4), ValueError, r"seq_len_q must span 2 blocks of 2 \(3..4\), got 5"),
    (lambda: layouts.to_mask(_LAYOUT, 2, 4, 2), ValueError, "seq_len_k must span 2 blocks"),
    (lambda: layouts.density(_LAYOUT[0]), TypeError, "layout must be a bool tensor of shape"),
    (lambda: layouts.density(torch.zeros(0, 2, 2, dtype=torch.bool)), ValueError, "layout must be non-empty"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
