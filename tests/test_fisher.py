"""EmpiricalFisherInverse against an explicit float64 inverse of F = lambda I + G^T G / m per block."""
from __future__ import annotations

import pytest
import torch

from pruning.fisher_inverse import DiagonalFisher, EmpiricalFisherInverse


def explicit_blocks(G: torch.Tensor, block: int | None, damp: float) -> list[torch.Tensor]:
    """F_b^-1 for each block, by torch.linalg.inv in float64 (the last block unpadded)."""
    G = G.double()
    m, d = G.shape
    c = d if block is None else block
    out = []
    for s in range(0, d, c):
        Gb = G[:, s:s + c]
        F = damp * torch.eye(Gb.shape[1], dtype=torch.float64) + Gb.T @ Gb / m
        out.append(torch.linalg.inv(F))
    return out


def gradients(m: int, d: int, *, seed: int, rank: int | None = None, scale: float = 0.1) -> torch.Tensor:
    """Random gradients; with ``rank`` they share a low-rank structure (as real gradients do), which
    makes F ill-conditioned at small lambda."""
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(m, d, generator=gen, dtype=torch.float64) * scale
    basis = torch.randn(rank, d, generator=gen, dtype=torch.float64)
    coef = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    return (coef @ basis) * scale / rank**0.5 + 1e-3 * scale * torch.randn(m, d, generator=gen, dtype=torch.float64)


# (m, d, block, max_chunk_bytes, expected form): primal, dual, a short last block in both forms,
# a whole-layer block, and chunked staging (row chunks for the primal Gram, column chunks for a
# dual block wider than the budget, several blocks per chunk).
CASES = [
    pytest.param(40, 90, 10, None, "primal", id="primal"),
    pytest.param(40, 95, 10, None, "primal", id="primal-short-last-block"),
    pytest.param(6, 60, 20, None, "dual", id="dual"),
    pytest.param(6, 67, 20, None, "dual", id="dual-short-last-block"),
    pytest.param(6, 64, 20, None, "dual", id="dual-blocks-primal-last-block"),  # last block 4 <= m
    pytest.param(8, 123, None, None, "dual", id="whole-layer"),
    pytest.param(30, 95, 10, 30 * 10 * 8 // 3, "primal", id="primal-row-chunks"),
    pytest.param(6, 67, None, 6 * 8 * 9, "dual", id="whole-layer-column-chunks"),
    pytest.param(5, 97, 20, 5 * 20 * 8 * 2, "dual", id="dual-two-blocks-per-chunk"),
    pytest.param(12, 12, 12, None, "primal", id="c-equals-m"),
    # m > 64: the Gram's lower triangle is built recursively (odd halves included)
    pytest.param(80, 230, 100, None, "dual", id="dual-recursive-gram"),
    pytest.param(67, 150, None, 67 * 8 * 40, "dual", id="whole-layer-recursive-gram-column-chunks"),
]


@pytest.mark.parametrize("m,d,block,chunk,form", CASES)
@pytest.mark.parametrize("damp", [1e-2, 1e-5])
def test_diag_and_mul_match_explicit_inverse(m, d, block, chunk, form, damp):
    G = gradients(m, d, seed=m * 1000 + d)
    kwargs = {} if chunk is None else {"max_chunk_bytes": chunk}
    inv = EmpiricalFisherInverse(G, block_size=block, damp=damp, **kwargs)
    assert inv.form == form
    ref = explicit_blocks(G, block, damp)
    ref_diag = torch.cat([b.diagonal() for b in ref])
    torch.testing.assert_close(inv.diag(), ref_diag, rtol=1e-9, atol=0)

    full = torch.block_diag(*ref)
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(inv.mul(v), full @ v, rtol=1e-8, atol=1e-8 * (full @ v).abs().max().item())
    V = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = inv.mul(V)
    assert out.shape == (3, d)
    torch.testing.assert_close(out, V @ full.T, rtol=1e-8, atol=1e-8 * (V @ full.T).abs().max().item())


def test_short_last_block_is_its_own_block():
    """The short last block's inverse is the inverse of its own Fisher (no coupling to the
    previous block, nothing from padding), whichever form it takes."""
    for m, d, c in [(40, 95, 10), (6, 67, 20), (6, 64, 20)]:
        G = gradients(m, d, seed=3)
        inv = EmpiricalFisherInverse(G, block_size=c, damp=1e-3)
        tail = d - (d // c) * c
        Gt = G[:, -tail:]
        F = 1e-3 * torch.eye(tail, dtype=torch.float64) + Gt.T @ Gt / m
        torch.testing.assert_close(inv.diag()[-tail:], torch.linalg.inv(F).diagonal(), rtol=1e-9, atol=0)


def test_float32_gradients_are_accurate_on_ill_conditioned_fisher():
    """Low-rank gradients and lambda = 1e-5: 1 - ||z||^2 cancels; float64 inside keeps the error at
    float32 output rounding (the public float32 rank-1 updates are ~1e-3 off here)."""
    G = gradients(64, 300, seed=4, rank=8, scale=1e-2).float()
    inv = EmpiricalFisherInverse(G, block_size=100, damp=1e-5)
    ref = torch.cat([b.diagonal() for b in explicit_blocks(G, 100, 1e-5)])
    got = inv.diag()
    assert got.dtype == torch.float32
    rel = ((got.double() - ref).abs() / ref).max().item()
    assert rel <= 1e-6, rel


@pytest.mark.parametrize("m,d,block", [(40, 95, 10), (6, 67, 20), (8, 123, None)])
def test_bounds_hold(m, d, block):
    G = gradients(m, d, seed=5, rank=3, scale=3.0)
    damp = 1e-6
    inv = EmpiricalFisherInverse(G, block_size=block, damp=damp)
    fqq = damp + G.square().mean(0)
    torch.testing.assert_close(inv.fisher_diag(), fqq, rtol=1e-12, atol=0)
    h = inv.diag()
    assert bool((h >= 1.0 / fqq).all())
    assert bool((h <= 1.0 / damp).all())
    # zero gradient columns: diag exactly 1/lambda (decoupled coordinates, as for pruned weights)
    G2 = G.clone()
    G2[:, 7] = 0
    assert EmpiricalFisherInverse(G2, block_size=block, damp=damp).diag()[7].item() == pytest.approx(1 / damp, rel=1e-12)


def test_all_layers_at_once_is_one_block_over_the_concatenation():
    """Several layers' gradients concatenated, block_size=None: one block spanning all of them,
    which couples weights across layers (unlike per-layer blocks)."""
    ga, gb = gradients(10, 30, seed=6), gradients(10, 45, seed=7)
    G = torch.cat([ga, gb], dim=1)
    joint = EmpiricalFisherInverse(G, block_size=None, damp=1e-3)
    assert joint.n_blocks == 1 and joint.form == "dual"
    ref = explicit_blocks(G, None, 1e-3)[0]
    torch.testing.assert_close(joint.diag(), ref.diagonal(), rtol=1e-9, atol=0)
    per_layer = torch.cat([EmpiricalFisherInverse(g, damp=1e-3).diag() for g in (ga, gb)])
    assert not torch.allclose(joint.diag(), per_layer)


@pytest.mark.parametrize("m,d,block,g", [
    (40, 96, 12, 4),     # primal, g <= c <= m
    (6, 64, 16, 4),      # dual, g <= m
    (6, 64, 32, 16),     # dual, g > m (Woodbury on the group)
    (5, 60, None, 12),   # whole layer, g > m
    (6, 68, 16, 4),      # dual blocks and a short primal last block of one group
    (6, 72, 32, 8),      # dual blocks, g > m, a short dual last block
])
def test_group_solve_matches_explicit(m, d, block, g):
    G = gradients(m, d, seed=8)
    w = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    inv = EmpiricalFisherInverse(G, block_size=block, damp=1e-3, max_chunk_bytes=m * 8 * g * 2)
    full = torch.block_diag(*explicit_blocks(G, block, 1e-3))
    u = inv.group_solve(w, group_size=g)
    expect = torch.cat([torch.linalg.solve(full[s:s + g, s:s + g], w[s:s + g]) for s in range(0, d, g)])
    torch.testing.assert_close(u, expect, rtol=1e-7, atol=1e-9 * expect.abs().max().item())


def test_group_solve_rejects_groups_that_straddle_blocks():
    inv = EmpiricalFisherInverse(gradients(6, 60, seed=10), block_size=20, damp=1e-3)
    with pytest.raises(ValueError, match="aligned"):
        inv.group_solve(torch.zeros(60, dtype=torch.float64), group_size=8)


def test_peak_memory_is_reported_and_bounded_by_the_chunk_budget():
    G = gradients(16, 4000, seed=11).float()
    big = EmpiricalFisherInverse(G, block_size=500, damp=1e-5)
    small = EmpiricalFisherInverse(G, block_size=500, damp=1e-5, max_chunk_bytes=16 * 500 * 8)
    kept = 8 * 16 * 16 * 8 + 2 * 4000 * 8  # 8 dual factors of m x m + diag + F_qq, float64
    assert small.kept_memory_bytes() == kept == big.kept_memory_bytes()
    # staging on top of what is kept: the chunk of G (m x c float64 per block) and its square
    assert small.peak_memory_bytes() == kept + 2 * 16 * 500 * 8
    assert big.peak_memory_bytes() == kept + 2 * 8 * 16 * 500 * 8
    torch.testing.assert_close(small.diag(), big.diag(), rtol=0, atol=0)
    # with a short last block (its own batch): factors of both batches are kept; the peak is the
    # larger batch's staging on top of everything kept
    tail = EmpiricalFisherInverse(G[:, :3700], block_size=500, damp=1e-5)
    kept_tail = 7 * 16 * 16 * 8 + 16 * 16 * 8 + 2 * 3700 * 8
    assert tail.kept_memory_bytes() == kept_tail and tail.n_blocks == 8
    assert tail.peak_memory_bytes() == kept_tail + 2 * 7 * 16 * 500 * 8


def test_does_not_copy_or_modify_gradients_and_keeps_dtype():
    G = gradients(6, 50, seed=12).float()
    before = G.clone()
    inv = EmpiricalFisherInverse(G, block_size=20, damp=1e-4)
    inv.mul(torch.ones(50))
    assert torch.equal(G, before)
    assert inv.diag().dtype == torch.float32 and inv.mul(torch.ones(50, dtype=torch.float64)).dtype == torch.float64
    # the products work in place on a staging buffer, never on the caller's vector
    G64 = gradients(6, 60, seed=12)
    v = torch.randn(60, dtype=torch.float64)
    v0 = v.clone()
    EmpiricalFisherInverse(G64, block_size=20, damp=1e-4).mul(v)
    assert torch.equal(v, v0)


def test_column_slice_of_a_larger_gradient_matrix():
    """The trainer passes G[:, layer columns] (a strided view); no copy is needed and results match."""
    G = gradients(6, 100, seed=13)
    view = G[:, 30:77]
    assert not view.is_contiguous()
    a = EmpiricalFisherInverse(view, block_size=20, damp=1e-4).diag()
    b = EmpiricalFisherInverse(view.contiguous(), block_size=20, damp=1e-4).diag()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invalid_arguments():
    G = gradients(4, 10, seed=14)
    with pytest.raises(ValueError):
        EmpiricalFisherInverse(G, damp=0.0)
    with pytest.raises(ValueError):
        EmpiricalFisherInverse(G[0], damp=1e-3)
    with pytest.raises(ValueError):
        EmpiricalFisherInverse(G, block_size=0)
    with pytest.raises(ValueError):
        EmpiricalFisherInverse(G, damp=1e-3).mul(torch.ones(11, dtype=torch.float64))


def test_diagonal_fisher_baseline():
    G = gradients(7, 33, seed=15)
    diag = DiagonalFisher(G, damp=1e-3)
    fqq = 1e-3 + G.square().mean(0)
    torch.testing.assert_close(diag.fisher_diag(), fqq, rtol=1e-12, atol=0)
    torch.testing.assert_close(diag.diag(), 1 / fqq, rtol=1e-12, atol=0)
    v = torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(diag.mul(v), v / fqq, rtol=1e-12, atol=0)
