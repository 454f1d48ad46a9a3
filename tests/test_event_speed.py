"""The OBS event's fast paths (issue 21, item 3) against float64 references, no timing.

EmpiricalFisherInverse's primal blocks now keep F_b itself, take diag(F^-1) from a factor in scratch
memory (column norms of L^-1), and solve the joint OBS system by one Cholesky of F_b with the pruned
coordinates last (the Schur complement); work is deferred to the first call. These tests check each
path against explicit float64 inverses and the brute-force constrained optimum (the KKT system), at 1
and 2 threads and for the block sizes of the issue (192-512), and that every reuse (kept F_b, deferred
work, a factor in another order) gives what a fresh, uncached object gives.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from engine.dispatch_count import DispatchCount
from pruning.fisher_inverse import EmpiricalFisherInverse
from pruning.obs import group_obs_statistic, group_obs_update, obs_update

DAMP = 1e-5


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gradients(m: int, d: int, *, seed: int, rank: int = 24) -> torch.Tensor:
    """float32 rows sharing a low-rank structure, as real gradients do: F is ill-conditioned at
    lambda = 1e-5 (condition numbers ~1e5-1e6), which is what float64 is there for."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen, dtype=torch.float64)
    coef = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    noise = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return ((coef @ basis) * 0.05 / rank**0.5 + 5e-4 * noise).float()


def fisher_blocks(G: torch.Tensor, c: int | None, damp: float = DAMP) -> list[torch.Tensor]:
    """F_b = lambda I + G_b^T G_b / m in float64 from the same float32 numbers, the last block short."""
    G = G.double()
    m, d = G.shape
    c = d if c is None else c
    return [damp * torch.eye(G[:, s:s + c].shape[1], dtype=torch.float64) + G[:, s:s + c].T @ G[:, s:s + c] / m
            for s in range(0, d, c)]


def kkt(F: torch.Tensor, w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """argmin 1/2 dw^T F dw subject to w_Q + dw_Q = 0, one block, by the float64 KKT system."""
    idx = Q.nonzero().flatten()
    d, k = w.numel(), idx.numel()
    E = torch.zeros(d, k, dtype=torch.float64)
    E[idx, torch.arange(k)] = 1.0
    system = torch.cat([torch.cat([F, E], 1), torch.cat([E.T, torch.zeros(k, k, dtype=torch.float64)], 1)])
    return torch.linalg.solve(system, torch.cat([torch.zeros(d, dtype=torch.float64), -w[idx]]))[:d]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def pruned_set(d: int, *, seed: int, fraction: float = 0.5) -> torch.Tensor:
    return torch.rand(d, generator=torch.Generator().manual_seed(seed)) < fraction


# (m, c, form): primal blocks of the sizes (c <= m) and dual ones (c > m); d = 3 blocks and a
# short last one, so both batches (full blocks, the tail) are exercised.
SIZES = [
    pytest.param(256, 192, "primal", id="primal-192"),
    pytest.param(384, 320, "primal", id="primal-320"),
    pytest.param(576, 512, "primal", id="primal-512"),
    pytest.param(192, 512, "dual", id="dual-512"),
    pytest.param(256, 320, "dual", id="dual-320"),
]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("m,c,form", SIZES)
def test_diag_mul_and_joint_update_match_float64_references(m, c, form, n_threads):
    d = 3 * c + c // 3
    G = gradients(m, d, seed=c + m)
    w = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Q = pruned_set(d, seed=3)
    with threads(n_threads):
        inv = EmpiricalFisherInverse(G, block_size=c, damp=DAMP)
        assert inv.form == form and inv.n_blocks == 4
        diag = inv.diag().double()
        Fv = inv.mul(v)
        w_joint = obs_update(weight=w, fisher_inverse=inv, prune=Q, joint=True)
        after = inv.mul(v)  # a primal factor now in the joint solve's order
    blocks = fisher_blocks(G, c)
    inverses = [torch.linalg.inv(F) for F in blocks]
    explicit = torch.cat([X.diagonal() for X in inverses])
    assert float(((diag - explicit).abs() / explicit).max()) < 1e-6  # the bound (float32 output)
    bounds = torch.tensor_split(torch.arange(d), [c, 2 * c, 3 * c])
    expect = torch.cat([X @ v[i] for X, i in zip(inverses, bounds)])
    assert rel(Fv, expect) < 1e-8 and rel(after, expect) < 1e-8
    dw = torch.cat([kkt(F, w[i], Q[i]) for F, i in zip(blocks, bounds)])
    assert rel(w_joint - w, dw) < 1e-7
    assert bool((w_joint[Q] == 0).all())


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("g,block", [(192, 384), (192, None),
                                     pytest.param(512, 1024, marks=pytest.mark.slow),   # 4-8 s each
                                     pytest.param(512, None, marks=pytest.mark.slow)])
def test_group_statistic_and_joint_update_for_large_groups(g, block, n_threads):
    """Groups of 192 and 512 weights, primal blocks of two groups (m > c) and whole-layer dual blocks
    (m = 256 < d): the group statistic against [F^-1]_QQ from the explicit inverse, and the group
    joint update against the KKT optimum, at 1 and 2 threads (where batched LU once crashed)."""
    m = 256 if block is None else block + 16
    d = 4 * g
    G = gradients(m, d, seed=g)
    w = torch.randn(d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    groups = torch.tensor([True, False, False, True])
    with threads(n_threads):
        inv = EmpiricalFisherInverse(G, block_size=block, damp=DAMP)
        stat = group_obs_statistic(weight=w, fisher_inverse=inv, group_size=g)
        w_new = group_obs_update(weight=w, fisher_inverse=inv, group_size=g, prune=groups, joint=True)
    blocks = fisher_blocks(G, block)
    F = torch.block_diag(*blocks)
    Finv = torch.block_diag(*[torch.linalg.inv(X) for X in blocks])
    expect = torch.stack([w[q:q + g] @ torch.linalg.solve(Finv[q:q + g, q:q + g], w[q:q + g])
                          for q in range(0, d, g)])
    torch.testing.assert_close(stat, expect, rtol=1e-6, atol=0)
    Q = groups.repeat_interleave(g)
    assert rel(w_new - w, kkt(F, w, Q)) < 1e-7


# -- reuse: every cached or deferred path against a fresh object ----------------------------------
@pytest.mark.parametrize("c", [48, 40])  # d = 4 blocks of 48, or 4 of 40 and a short one of 32
def test_deferred_and_kept_paths_give_the_fresh_results(c):
    m, d = 64, 192
    G = gradients(m, d, seed=5)
    w = torch.randn(d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v = torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Q1, Q2 = pruned_set(d, seed=8), pruned_set(d, seed=9, fraction=0.8)
    fresh = lambda: EmpiricalFisherInverse(G, block_size=c, damp=DAMP)  # noqa: E731
    assert fresh().form == "primal"
    ref_diag, ref_mul = fresh().diag(), fresh().mul(v)
    ref_group = fresh().group_solve(w, group_size=8)
    kept = fresh()  # the solver's kept inverse: diag first (F_b stays), then the joint solve
    kept.diag()
    s_kept = kept.solve_pruned(w, Q1)
    deferred = fresh()  # a rebuilt inverse: the joint solve first (F_b formed in its order from G)
    s_deferred = deferred.solve_pruned(w, Q1)
    torch.testing.assert_close(s_deferred, s_kept, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(deferred.mul(s_deferred), kept.mul(s_kept), rtol=1e-9, atol=1e-12)
    # after a joint solve the factor is in that solve's order; every other product undoes it
    torch.testing.assert_close(deferred.diag(), ref_diag, rtol=1e-9, atol=0)
    torch.testing.assert_close(kept.mul(v), ref_mul, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(deferred.group_solve(w, group_size=8), ref_group, rtol=1e-9, atol=1e-12)
    # a second joint solve (the kept buffer holds a factor now: F_b again from G) = a fresh one's
    torch.testing.assert_close(kept.solve_pruned(w, Q2), fresh().solve_pruned(w, Q2), rtol=1e-9, atol=1e-12)
    # the summed update's path (diag, then F^-1 s on a factor made in place of F_b) = fresh products
    summed = fresh()
    h = summed.diag()
    s = torch.where(Q1, w / h, torch.zeros((), dtype=w.dtype))
    torch.testing.assert_close(summed.mul(s), fresh().mul(s), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(summed.fisher_diag(), fresh().fisher_diag(), rtol=0, atol=0)


def test_joint_solve_sets_of_any_size_including_none_and_all():
    m, c, d = 40, 16, 64
    G = gradients(m, d, seed=10)
    w = torch.randn(d, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    blocks = fisher_blocks(G, c)
    bounds = torch.arange(d).view(-1, c)
    Q = torch.zeros(d, dtype=torch.bool)
    Q[16:32] = True                # block 1: all of it
    Q[32] = True                   # block 2: one weight
    Q[48:63] = True                # block 3: all but one; block 0: none
    inv = EmpiricalFisherInverse(G, block_size=c, damp=DAMP)
    w_new = obs_update(weight=w, fisher_inverse=inv, prune=Q, joint=True)
    dw = torch.cat([kkt(F, w[i], Q[i]) if bool(Q[i].any()) else torch.zeros(c, dtype=torch.float64)
                    for F, i in zip(blocks, bounds)])
    assert rel(w_new - w, dw) < 1e-7
    assert torch.equal(w_new[:16], w[:16])  # nothing pruned in block 0: nothing moves


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("c,form", [(96, "primal"), (160, "primal"), (160, "dual")])  # primal: below and above
def test_the_joint_move_from_F_RR_is_the_kkt_optimum_on_every_path(c, form, n_threads, monkeypatch):  # _REDUCED_FROM
    """pruned_mul (u = F^-1 s; the move is -u) against the KKT optimum and against mul(solve_pruned),
    with F_b kept (diag first), deferred (nothing formed yet: F_b from G) and a factor already held (the
    batched path), for blocks with nothing, one weight, all but one and all of it pruned. Primal blocks of
    c >= _REDUCED_FROM take F_RR per block; dual blocks take M_R = lambda m I + G_R G_R^T on every path."""
    from pruning import fisher_inverse
    m, d = (c + 32 if form == "primal" else c // 2), 4 * c + c // 2
    G = gradients(m, d, seed=c)
    w = torch.randn(d, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    v = torch.randn(d, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    Q = pruned_set(d, seed=16, fraction=0.4)
    Q[:c] = False                   # block 0: nothing
    Q[c:2 * c] = True               # block 1: all of it
    Q[2 * c:3 * c] = False          # block 2: one weight
    Q[2 * c + 5] = True
    Q[3 * c:4 * c] = True           # block 3: all but one; the tail: 40 %
    Q[3 * c + 7] = False
    reduced = []
    original = fisher_inverse._BlockBatch._primal_reduced_pruned_mul
    monkeypatch.setattr(fisher_inverse._BlockBatch, "_primal_reduced_pruned_mul",
                        lambda self, t, p: reduced.append(1) or original(self, t, p))
    fresh = lambda: EmpiricalFisherInverse(G, block_size=c, damp=DAMP)  # noqa: E731
    with threads(n_threads):
        kept = fresh()
        kept.diag()
        u_kept = kept.pruned_mul(w, Q)
        u_deferred = fresh().pruned_mul(w, Q)
        held = fresh()
        held.mul(v)  # a factor in the original order: the batched joint solve
        u_held = held.pruned_mul(w, Q)
        ref = fresh()
        u_ref = ref.mul(ref.solve_pruned(w, Q))
        after = kept.mul(v)  # F_b is still what is kept
    # kept and deferred: their full blocks, one batch per thread (side by side, ``_PARALLEL_FROM``)
    assert kept.form == form
    assert len(reduced) == (2 * n_threads if c >= fisher_inverse._REDUCED_FROM and form == "primal" else 0)
    bounds = torch.tensor_split(torch.arange(d), list(range(c, d, c)))
    blocks = fisher_blocks(G, c)
    dw = torch.cat([kkt(F, w[i], Q[i]) if bool(Q[i].any()) else torch.zeros(i.numel(), dtype=torch.float64)
                    for F, i in zip(blocks, bounds)])
    for u in (u_kept, u_deferred, u_held, u_ref):
        assert rel(-u, dw) < 1e-7
        # the pruned coordinates go to 0 (mul(solve_pruned) of a dual block rounds through 1 / lambda)
        assert torch.equal(u[Q], w[Q]) or rel(u[Q], w[Q]) < 1e-10
    diff = (u_kept != u_deferred).nonzero()
    assert torch.equal(u_kept[:4 * c], u_deferred[:4 * c]), diff  # F_b kept or formed again: the same bits
    assert bool((u_kept[:c] == 0).all())  # nothing pruned in block 0: nothing moves
    expect = torch.cat([torch.linalg.solve(F, v[i]) for F, i in zip(blocks, bounds)])
    assert rel(after, expect) < 1e-8


@pytest.mark.parametrize("m,c", [(192, 160), (96, 160)])  # primal, dual
def test_side_by_side_batches_give_a_one_thread_runs_bits_and_restore_the_thread_count(m, c):
    """With 2 CPU threads the full blocks run as 2 batches of 1 thread each: the same numbers as the whole
    object on 1 thread, the caller's thread count back afterwards, and the peak planned for both at once."""
    d = 5 * c + 40
    G = gradients(m, d, seed=17)
    w = torch.randn(d, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    Q = pruned_set(d, seed=19)
    results = {}
    for n in (1, 2):
        with threads(n):
            inv = EmpiricalFisherInverse(G, block_size=c, damp=DAMP)
            results[n] = (inv.diag(), inv.pruned_mul(w, Q), inv.mul(w), inv.failed())
            assert torch.get_num_threads() == n
        assert len(inv._parts) == n + 1  # the full blocks' batches and the short last block
        if n == 2:
            kept = [part.kept_bytes for _, _, part in inv._parts]
            assert inv.peak_memory_bytes() == sum(kept) + sum(p.peak_bytes - k for k, (_, _, p) in zip(kept, inv._parts))
    for one, two in zip(results[1], results[2]):
        assert torch.equal(one, two)


def test_no_host_reads_inside_the_inverse():
    """The event's one host read is the solver's, at its end: none inside diag, the joint solve or
    F^-1 v, primal or dual, deferred or kept."""
    G = gradients(32, 120, seed=12)
    w = torch.randn(120, dtype=torch.float64)
    Q = pruned_set(120, seed=13)
    for block in (24, 60, None):  # primal, dual, whole-layer dual
        for first_diag in (True, False):
            with DispatchCount() as count:
                inv = EmpiricalFisherInverse(G, block_size=block, damp=DAMP)
                if first_diag:
                    inv.diag()
                inv.mul(inv.solve_pruned(w, Q))
                inv.pruned_mul(w, Q)
                inv.diag()
                inv.failed()
            assert count.host_reads == 0, (block, first_diag, count.reads())


@pytest.mark.parametrize("block,chunk", [(40, None), (40, 40 * 40 * 8), (40, 64 * 40 * 8 // 4)])
def test_peak_memory_is_planned_at_construction_and_covers_every_pass(block, chunk):
    """The primal work is deferred, but the solver reads the peak at construction: the plan (kept
    buffers + the largest pass: G's staging, or two c x c scratch buffers per chunk of blocks) must
    already be what every later pass stays within."""
    m, d = 64, 170  # 4 blocks of 40 and one of 10
    G = gradients(m, d, seed=14)
    kwargs = {} if chunk is None else {"max_chunk_bytes": chunk}
    inv = EmpiricalFisherInverse(G, block_size=block, damp=DAMP, **kwargs)
    kept = (4 * 40 * 40 + 10 * 10 + 2 * d) * 8
    assert inv.kept_memory_bytes() == kept
    planned = inv.peak_memory_bytes()
    assert planned > kept
    w = torch.randn(d, dtype=torch.float64)
    inv.mul(inv.solve_pruned(w, pruned_set(d, seed=15)))
    inv.diag()
    inv.solve_pruned(w, pruned_set(d, seed=16))  # from G again, in a new order
    inv.group_solve(w, group_size=10)
    assert inv.peak_memory_bytes() == planned
    if chunk is not None and chunk < 40 * 40 * 8 * 2:  # one block per chunk: two scratch blocks at most
        assert planned - kept <= max((2 * 8 + 1) * 40 * 40, m * 40 * (8 + 4))
