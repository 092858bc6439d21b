"""Matmul FLOPs of an ``Alphafold2(trunk="evoformer")`` training step, for ``python -m af2_ext.bench model_scan
--trunk evoformer`` (2 per multiply-add; LayerNorms, softmax and elementwise work not counted).

Per block (AF2 supplementary Algorithm 6), batch 1, S MSA rows of n residues, MSA width c_m, pair width c_z,
H heads of width c (the model's ``heads`` and ``dim_head`` for the MSA and the triangle attention), the
multiplicative updates' width c_z (``c_hidden_mul = pair_dim``), the outer product mean's 32, transitions x4:

- MSA row attention with pair bias: q, k, v, gate, output projections (5 x 2*S*n*c_m*H*c), the bias
  (2*n*n*c_z*H), QK^T and PV over S rows of n (2 x 2*S*n*n*H*c);
- MSA column attention: the same projections, QK^T and PV over n columns of S;
- MSA transition: 2 x 2*S*n*c_m*4c_m;
- outer product mean: a and b (2 x 2*S*n*c_m*32), the outer products summed over S (2*n*n*S*32*32), the count
  of kept rows per pair (2*n*n*S), the output (2*n*n*32*32*c_z);
- each triangle multiplicative update: a, b and their gates (4 x 2*n*n*c_z*c_z), the output gate
  (2*n*n*c_z*c_z), the triangle product (2*n*n*n*c_z), the output (2*n*n*c_z*c_z);
- each triangle attention: q, k, v, gate, output (5 x 2*n*n*c_z*H*c), the bias (2*n*n*c_z*H), QK^T and PV
  over n rows of n (2 x 2*n*n*n*H*c);
- pair transition: 2 x 2*n*n*c_z*4c_z;

and once the pair embedding's two projections (2 x 2*n*c_m*c_z) and the head, 2*n*n*c_z*37. Backward 2 x forward. ``recompute``: the trunk's forward once more when a reversible
trunk recomputes; with ``chunked`` the outer product mean, the multiplicative updates and the transitions run under
checkpoint (one more forward of theirs), when n exceeds the chunk (64 rows).
"""
from __future__ import annotations

DISTOGRAM_BUCKETS = 37
OPM_HIDDEN = 32
TRANSITION_N = 4
CHUNK_ROWS = 64  # af2_ext.model.EVOFORMER_CHUNK_ROWS


def evoformer_flops(*, n: int, msa_rows: int, c_m: int, c_z: int, heads: int, dim_head: int, depth: int,
                    reversible: bool = False, recompute: bool = False, attention: bool = True,
                    chunked: bool = True) -> dict:
    """``forward``, ``backward``, ``recompute``, ``total`` and ``parts`` (forward, per kind) of one step."""
    S, inner, core = msa_rows, heads * dim_head, 1.0 if attention else 0.0
    pair, msa = n * n, msa_rows * n

    def linear(tokens: int, fan_in: int, fan_out: int) -> float:
        return 2.0 * tokens * fan_in * fan_out

    def attn(sequences: int, length: int) -> float:  # QK^T and PV over all heads
        return core * 2 * 2.0 * sequences * length * length * inner

    proj_m = 4 * linear(msa, c_m, inner) + linear(msa, inner, c_m)
    proj_z = 4 * linear(pair, c_z, inner) + linear(pair, inner, c_z)
    block = {
        "msa_row_attn": proj_m + linear(pair, c_z, heads) + attn(S, n),
        "msa_col_attn": proj_m + attn(n, S),
        "msa_transition": 2 * linear(msa, c_m, TRANSITION_N * c_m),
        "outer_product_mean": 2 * linear(msa, c_m, OPM_HIDDEN) + 2.0 * pair * S * (OPM_HIDDEN ** 2 + 1)
        + linear(pair, OPM_HIDDEN ** 2, c_z),
        "tri_mul": 2 * (6 * linear(pair, c_z, c_z) + 2.0 * pair * n * c_z),
        "tri_attn": 2 * (proj_z + linear(pair, c_z, heads) + attn(n, n)),
        "pair_transition": 2 * linear(pair, c_z, TRANSITION_N * c_z),
    }
    parts = {k: v * depth for k, v in block.items()}
    parts["embed"] = 2 * linear(n, c_m, c_z)
    parts["head"] = linear(pair, c_z, DISTOGRAM_BUCKETS)
    forward = sum(parts.values())
    again = 0.0
    if chunked and n > CHUNK_ROWS:
        again = sum(parts[k] for k in ("msa_transition", "outer_product_mean", "tri_mul", "pair_transition"))
    out = {"forward": forward, "backward": 2 * forward,
           "recompute": (forward - parts["head"] - parts["embed"] if recompute else 0.0) + again}
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    out["parts"] = parts
    return out
