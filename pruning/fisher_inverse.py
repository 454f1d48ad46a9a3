"""Inverse of the damped empirical Fisher, block-diagonal, for the OBS step (WoodFisher).

From m gradient rows G (m x d; each row the mean mini-batch gradient of the flattened weights of
one layer, or of several layers concatenated) and a block size c, the weights are cut into
contiguous blocks of c coordinates and each block b gets the damped empirical Fisher

    F_b = lambda * I_c + (1/m) G_b^T G_b            (G_b = G[:, block b], m x c)

(Singh & Alistarh 2020, eq. for the empirical Fisher with dampening lambda = ``fisher_damp``).
OBS needs only diag(F^-1) and products F^-1 v, and both are computed here for *all* blocks in a few
batched tensor calls (tensors of shape [n_blocks, ., .]). A short last block (d not a multiple
of c) is its own batch of one block at its true width. (Zero-padding it to c would be exact as
well -- a padded coordinate has a zero gradient column, hence diag 1/lambda and no coupling --
but costs a whole block of work for a few weights.)

Two exact forms, chosen per instance:

* primal (c <= m): F_b is formed (c x c, its lower triangle: 5/8 of the full product's flops at
  c = 1000), factored F_b = L L^T (Cholesky) in scratch memory, diag(F_b^-1) taken from the column
  norms of L^-1 (triangular solves of half size, c^3/2 flops; no explicit inverse), and F_b itself
  kept. Time O(m c^2 + c^3) per block, memory O(c^2). The joint solve for a pruned set Q factors F_b
  once more, with the kept coordinates R first and Q last, P F_b P^T = L L^T: its trailing block is
  the Schur complement ([F_b^-1]_QQ)^-1 = F_QQ - F_QR F_RR^-1 F_RQ = L_QQ L_QQ^T, so that

      s_Q = L_QQ (L_QQ^T t_Q)          (two triangular products, no inverse formed),

  and that factor replaces F_b and serves F_b^-1 v afterwards (two triangular solves; any factor of
  a permutation of F_b does). The work is done when first needed: an object whose first call is
  ``solve_pruned`` (the solver rebuilds the inverses it could not keep between the statistic and the
  update) forms F_b straight in the solve's order and factors it once, nothing else.
  The OBS move itself, F^-1 s, needs no factor of F_b at all: it is -t_Q on Q and F_RR^-1 F_RQ t_Q on
  the kept set R (``pruned_mul``), which on the CPU is computed block by block from a factor of F_RR
  (|R|^3 / 3 flops) and one product with F_b, leaving F_b as it was.

* dual (c > m): the Woodbury identity with A = lambda I, U = G_b^T, C = (1/m) I, V = G_b gives

      F_b^-1 = (1/lambda) [ I - G_b^T (lambda m I_m + G_b G_b^T)^-1 G_b ].

  With M = lambda m I_m + G_b G_b^T = L L^T (m x m) and Z = L^-1 G_b (m x c):

      diag(F_b^-1)_j = (1 - ||Z[:, j]||^2) / lambda,      F_b^-1 v = (v - Z^T (Z v)) / lambda
                                                          = (v - G_b^T M^-1 (G_b v)) / lambda.

  Time O(m^2 c + m^3) per block, memory O(m c) transient and O(m^2) kept: a block can be a whole
  layer, or all prunable weights at once (d = total, block_size=None). The joint solve and move for a
  pruned set Q (kept set R) come from Woodbury's matrix of the kept columns alone,
  M_R = lambda m I_m + G_R G_R^T, and beta = M_R^-1 G_Q t_Q:

      ([F_b^-1]_QQ)^-1 t_Q = lambda (t_Q + G_Q^T beta),        F_RR^-1 F_RQ t_Q = G_R^T beta,

  one Gram and one m x m factor per block, no triangular solve against G_b.

Precision: everything past the input is done in float64 (``compute_dtype``). The dual form needs
it: 1 - ||z||^2 cancels when a coordinate is well determined by the gradients, and M has condition
number up to (lambda m + ||G_b||^2) / (lambda m), which float32 cannot carry at lambda = 1e-5.
The results are clamped into the bounds every SPD F satisfies,

    1 / F_qq  <=  [F^-1]_qq  <=  1 / lambda,

so round-off can never produce a negative or unbounded OBS denominator.

Memory: G is never copied whole. It is read in chunks of blocks (or, for a single block wider than
the budget, chunks of columns), each converted to float64 into one reused staging buffer of at most
``max_chunk_bytes`` (plus a scratch buffer of the same size while building); only the Cholesky
factors (n_blocks x k x k, k = c primal / m dual; a primal buffer holds F_b instead until a joint
solve or a product needs its factor) and two length-d vectors stay.
Both forms build only the lower triangle of each Gram matrix (all the Cholesky
reads). The primal form's factorisations, triangular inverses and permuted copies work on two scratch
buffers of at most max(max_chunk_bytes, one c x c block) each. ``peak_memory_bytes()`` reports the
largest sum of live buffers this object allocates (an analytic count of its own temporaries, the figure
the trainer logs; planned at construction, since the primal work is deferred to its first use).

Both forms keep a reference to G (no copy): the dual because F^-1 v needs G_b again, the primal
because its work is deferred; do not modify G in place while the inverse is in use.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Result = TypeVar("Result")

# Float64 staging buffer per batched call (bounds transient memory). On CPU, buffers above glibc's
# mmap threshold (32 MiB) are returned to the kernel on free and page-faulted back on every chunk:
# measured 1.4x slower for ResNet-20 blocks and 10x slower for a whole-layer F^-1 v at 128 MiB
# than at 8 MiB. The CUDA caching allocator reuses large buffers, and larger batches feed the GPU.
_CPU_CHUNK_BYTES = 8 * 2**20
_GPU_CHUNK_BYTES = 256 * 2**20


class EmpiricalFisherInverse:
    """Block-diagonal inverse of F = lambda I + (1/m) G^T G (see the module docstring).

    grads: G, shape (m, d), any float dtype and device. Rows are gradient samples.
    block_size: c, the width of a block of contiguous coordinates; ``None`` (or >= d) makes the
        whole vector one block (a whole layer, or all layers concatenated).
    damp: lambda > 0.
    compute_dtype: dtype of the factorisations and solves (float64 unless you know better).
    max_chunk_bytes: bound on one staging buffer of G in ``compute_dtype`` (default 8 MiB on
        CPU, 256 MiB on a GPU); at least one block (or one column group) is staged at a time.

    The d // c full blocks are one batch; a short last block (d % c weights) is a second batch of
    one block at its own width, primal or dual by its own size. (Zero-padding it to c would be
    exact too, but costs a full block of work for a sliver of weights, ~6 % of the ResNet-20 time.)

    Results (``diag``, ``mul``) come back in G's dtype (``diag``) or v's dtype (``mul``), on G's
    device.
    """

    @torch.no_grad()
    def __init__(
        self,
        grads: torch.Tensor,
        *,
        block_size: int | None = None,
        damp: float = 1e-5,
        compute_dtype: torch.dtype = torch.float64,
        max_chunk_bytes: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if grads.dim() != 2:
            raise ValueError(f"grads must be (m, d), got shape {tuple(grads.shape)}")
        m, d = grads.shape
        if m < 1 or d < 1:
            raise ValueError(f"grads must be non-empty, got shape {tuple(grads.shape)}")
        if not damp > 0:
            raise ValueError(f"damp (lambda) must be > 0, got {damp}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
        # Chunked loads slice columns; they need unit stride along d (any row stride is fine).
        grads = grads if grads.stride(-1) == 1 else grads.contiguous()
        self.m, self.d = m, d
        self.block_size = d if block_size is None else min(block_size, d)
        self.damp = float(damp)
        # G may stay in host memory (--offload-grads) while the algebra runs on the GPU: chunks of
        # it are staged to ``device`` as they are needed, and the object never holds a device copy.
        self.dtype = grads.dtype
        self.device = grads.device if device is None else torch.device(device)
        self._cdt = compute_dtype
        if max_chunk_bytes is None:
            max_chunk_bytes = _CPU_CHUNK_BYTES if self.device.type == "cpu" else _GPU_CHUNK_BYTES
        c = self.block_size
        n_full, tail = divmod(d, c)
        self.n_blocks = n_full + (1 if tail else 0)
        # On a CPU with several threads, the full blocks of c >= _PARALLEL_FROM are cut into one batch per
        # thread, each run on one thread, side by side (``_map``): one block's LAPACK/BLAS calls scale less
        # well over 2 threads than 2 blocks over 1 each (measured 1.15x faster for the ResNet-20 event's
        # inverse), and the page faults of the kept buffers overlap. Each batch's numbers are a 1-thread
        # run's, whatever the machine.
        self._workers = 1
        if self.device.type == "cpu" and c >= _PARALLEL_FROM:
            self._workers = max(1, min(torch.get_num_threads(), n_full))
        cuts = [n_full * i // self._workers * c for i in range(self._workers + 1)] if n_full else []
        spans = [(a, b, c) for a, b in zip(cuts[:-1], cuts[1:])] + ([(n_full * c, d, tail)] if tail else [])
        self._parts: list[tuple[int, int, _BlockBatch]] = []
        for a, b, width in spans:
            self._parts.append((a, b, _BlockBatch(grads[:, a:b], width=width, damp=self.damp,
                                                  compute_dtype=compute_dtype, device=self.device,
                                                  max_chunk_bytes=int(max_chunk_bytes))))
        # "primal" or "dual" of the full blocks (the short last block decides for itself)
        self.form = self._parts[0][2].form

    # ----------------------------------------------------------------------------------------
    # public API

    def diag(self) -> torch.Tensor:
        """diag(F^-1), length d, in G's dtype."""
        return torch.cat(self._map(lambda a, b, part: part.diag())).to(self.dtype)

    def fisher_diag(self) -> torch.Tensor:
        """F_qq = lambda + (1/m) sum_i G_iq^2, length d, in G's dtype (the diagonal-Fisher baseline)."""
        return torch.cat(self._map(lambda a, b, part: part.fisher_diag())).to(self.dtype)

    @torch.no_grad()
    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v for v of shape (d,) or a batch (k, d); same shape and dtype as v."""
        if v.shape[-1] != self.d or v.dim() not in (1, 2):
            raise ValueError(f"v must be ({self.d},) or (k, {self.d}), got {tuple(v.shape)}")
        V = v.reshape(-1, self.d).to(device=self.device, dtype=self._cdt)
        out = torch.cat(self._map(lambda a, b, part: part.mul(V[:, a:b])), dim=1)
        return out.reshape(v.shape).to(v.dtype)

    @torch.no_grad()
    def group_solve(self, w: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """u with u_Q = ([F^-1]_QQ)^-1 w_Q for every group Q of ``group_size`` contiguous coordinates.

        The group OBS quantities follow from u: statistic w_Q^T u_Q, update -F^-1 (u on the pruned
        groups, 0 elsewhere). Groups must tile blocks: ``block_size % group_size == 0`` and
        ``d % group_size == 0``. For g <= m the g x g sub-blocks of F^-1 are formed and solved;
        for g > m (dual form, large filters) Woodbury once more,
        ([F^-1]_QQ)^-1 = lambda [I + Z_Q^T (I_m - Z_Q Z_Q^T)^-1 Z_Q], so only m x m systems appear.
        Returns shape (d,), in w's dtype.
        """
        g = int(group_size)
        if g < 1 or self.block_size % g or self.d % g:
            raise ValueError(
                f"group_size {group_size} must divide block_size {self.block_size} and d {self.d} "
                "(blocks must be aligned to whole groups)")
        W = w.reshape(-1).to(device=self.device, dtype=self._cdt)
        return torch.cat(self._map(lambda a, b, part: part.group_solve(W[a:b], g))).to(w.dtype)

    @torch.no_grad()
    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """s with s_Q = ([F^-1]_QQ)^-1 t_Q in every block, Q = the block's coordinates where ``prune``
        is True, and s = 0 elsewhere: the joint OBS solve for removing the set Q at once (the update
        is then -F^-1 s). Exact for any Q; the cost per block is bounded by min(|Q|, c, m)^3:
        primal blocks (c <= m) factor F_b once with Q last (s_Q from the Schur complement, see the
        module docstring), dual blocks solve an m x m system (Woodbury), so a set of any size costs no
        more than one block's factorisation. Returns shape (d,), in t's dtype."""
        T, P = self._vector_and_set(t, prune)
        return torch.cat(self._map(lambda a, b, part: part.solve_pruned(T[a:b], P[a:b]))).to(t.dtype)

    @torch.no_grad()
    def pruned_mul(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """u = F^-1 s for s = ``solve_pruned(t, prune)``: the joint OBS move is -u (it takes t_Q to 0 and
        leaves every other coordinate at its constrained optimum). In closed form, per block,

            u_Q = t_Q,      u_R = -F_RR^-1 F_RQ t_Q      (R: the block's coordinates outside Q),

        the stationarity of 1/2 dw^T F dw on R with dw_Q = -t_Q. On the CPU, primal blocks of at least
        ``_REDUCED_FROM`` coordinates are solved so, one block at a time: a factor of F_RR only
        (|R|^3 / 3 flops, a 1/8 of F_b's at |R| = c/2) from the kept F_b, no permuted copy of F_b; dual blocks
        on every device from G and an m x m factor of M_R (module docstring); other primal blocks (and
        where a factor is held) as ``mul(solve_pruned(t, prune))``; batched calls without host reads
        except the CPU's per-block path. Returns shape (d,), in t's dtype."""
        T, P = self._vector_and_set(t, prune)
        return torch.cat(self._map(lambda a, b, part: part.pruned_mul(T[a:b], P[a:b]))).to(t.dtype)

    def group_pruned_mul(self, w: torch.Tensor, prune: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """The joint move for the union of the groups where ``prune`` (one bool per contiguous group of
        ``group_size`` coordinates): ``pruned_mul`` on their coordinates."""
        return self.pruned_mul(w, prune.reshape(-1).to(torch.bool).repeat_interleave(group_size))

    def _vector_and_set(self, t: torch.Tensor, prune: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (compute dtype) and the pruned set (bool), flat and on the device, after checking their sizes."""
        if t.numel() != self.d or prune.numel() != self.d:
            raise ValueError(f"t and prune must have {self.d} entries, got {t.numel()} and {prune.numel()}")
        return (t.reshape(-1).to(device=self.device, dtype=self._cdt),
                prune.reshape(-1).to(device=self.device, dtype=torch.bool))

    def failed(self) -> torch.Tensor:
        """A 0-dim bool tensor on the device: whether any Cholesky factorisation failed. Checking it
        is a host synchronisation, so the caller does it once per pruning step, not per block. (Asked
        before any other call, it forms what a first call would: a fresh object answers for its F.)"""
        self._map(lambda a, b, part: part.ensure())
        return torch.stack([part.failed for _, _, part in self._parts]).any()

    def peak_memory_bytes(self) -> int:
        """Largest sum of buffers held at once (all kept factors + one batch's staging), in bytes."""
        kept = [part.kept_bytes for _, _, part in self._parts]
        if self._workers > 1:  # the batches run side by side: every one's temporaries at once
            return int(sum(kept) + sum(part.peak_bytes - k for k, (_, _, part) in zip(kept, self._parts)))
        return int(max(sum(kept) - k + part.peak_bytes for k, (_, _, part) in zip(kept, self._parts)))

    def _map(self, fn: Callable[[int, int, _BlockBatch], Result]) -> list[Result]:
        """fn(a, b, part) for every batch, results in order: one after the other, or, with several CPU
        workers, side by side in that many threads of one intra-op thread each (the thread count of the
        caller is restored afterwards)."""
        if self._workers <= 1:
            return [fn(a, b, part) for a, b, part in self._parts]
        before = torch.get_num_threads()

        def run(item: tuple[int, int, _BlockBatch]) -> Result:
            torch.set_num_threads(1)  # per thread for OpenMP, and MKL's
            return fn(*item)
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=self._workers) as pool:
                return list(pool.map(run, self._parts))
        finally:
            torch.set_num_threads(before)

    def kept_memory_bytes(self) -> int:
        """Bytes kept between calls: Cholesky factors, diag(F^-1) and F_qq."""
        return int(sum(part.kept_bytes for _, _, part in self._parts))


class _BlockBatch:
    """n blocks of the same width c covering exactly the n*c columns of ``grads``, computed in
    batched calls; the primal or dual form by c <= m. Inputs and outputs in compute dtype.

    Primal state: one c x c buffer per block (``_factor``) holds either F_b itself (``_holds ==
    "gram"``, on and below the diagonal) or a Cholesky factor of F_b with its coordinates in the order ``_perm``
    (``"factor"``; None: the original order), or nothing yet (``"none"``). diag(F^-1) is computed
    with a factor that lives in scratch memory only, so F_b stays for the joint solve, which then
    factors F_b once, in its own order (the kept coordinates first); that factor also serves F^-1 v.
    Work is done on first use; an object whose first call is the joint solve forms F_b directly in
    that order and nothing else."""

    def __init__(self, grads: torch.Tensor, *, width: int, damp: float, compute_dtype: torch.dtype,
                 max_chunk_bytes: int, device: torch.device) -> None:
        m, d = grads.shape
        assert d % width == 0, (d, width)
        self._grads = grads
        self.m, self.d = m, d
        self.block_size = width
        self.n_blocks = d // width
        self.damp = damp
        self.form = "primal" if width <= m else "dual"
        self.device = device
        self.failed = torch.zeros((), dtype=torch.bool, device=device)
        self._cdt = compute_dtype
        self._item = torch.empty((), dtype=compute_dtype).element_size()
        self._max_chunk_bytes = max_chunk_bytes

        c, nb = self.block_size, self.n_blocks
        k = c if self.form == "primal" else m
        # Kept state: one Cholesky factor per block (primal: or F_b), diag(F^-1) and F_qq.
        self.kept_bytes = (nb * k * k + 2 * nb * c) * self._item
        self.peak_bytes = self.kept_bytes
        self._diag: torch.Tensor | None = None
        self._perm: torch.Tensor | None = None
        if self.form == "primal":
            # Allocated by the first pass; the plan is known now, so the peak is reported before any
            # work is done (the solver reads it at construction).
            self._holds = "none"
            self._factor = torch.empty(0, dtype=compute_dtype, device=self.device)
            self._fisher_diag = torch.empty(0, dtype=compute_dtype, device=self.device)
            self.peak_bytes = self.kept_bytes + self._primal_transient_bytes()
        else:
            self._holds = "factor"
            self._factor = torch.zeros(nb, k, k, dtype=compute_dtype, device=self.device)
            self._fisher_diag = torch.zeros(nb, c, dtype=compute_dtype, device=self.device)
            self._diag = self._clamped(self._build_dual())

    def _clamped(self, diag: torch.Tensor) -> torch.Tensor:
        # 1/F_qq <= [F^-1]_qq <= 1/lambda for every SPD F; clamp away round-off outside.
        return torch.maximum(diag, self._fisher_diag.reciprocal()).clamp_(max=1.0 / self.damp)

    def ensure(self) -> None:
        """Do what a first call of ``diag`` would (F_b, a factor, diag(F^-1)), unless work was done."""
        if self._holds == "none":
            self._primal_diag()

    def diag(self) -> torch.Tensor:
        if self._diag is None:
            self._primal_diag()
        assert self._diag is not None
        return self._diag.reshape(-1)

    def fisher_diag(self) -> torch.Tensor:
        self.ensure()
        return self._fisher_diag.reshape(-1)

    def mul(self, V: torch.Tensor) -> torch.Tensor:
        """F^-1 applied to the rows of V (k, d); returns (k, d)."""
        vb = self._to_blocks(V)  # [nb, c, k]
        if self.form == "primal":
            self._primal_factor()
            out = self._primal_mul(vb)
            self._note(vb, out)
        else:
            out = self._dual_mul(vb)
        return out.permute(2, 0, 1).reshape(V.shape[0], self.d)

    def group_solve(self, w: torch.Tensor, g: int) -> torch.Tensor:
        wb = w.reshape(self.n_blocks, self.block_size)
        u = torch.empty_like(wb)
        if self.form == "primal":
            self._primal_factor()
            self._primal_group_solve(wb, u, g)
        else:
            self._dual_group_solve(wb, u, g)
        return u.reshape(-1)

    # ----------------------------------------------------------------------------------------
    # construction

    def _block_step(self) -> int:
        """Blocks per chunk of the c x c passes (factor, triangular inverse, permuted copy)."""
        return max(1, self._max_chunk_bytes // (self.block_size ** 2 * self._item))

    def _primal_transient_bytes(self) -> int:
        """Largest set of temporaries of any primal pass on top of what is kept: the Gram's staging of G
        (with, for a permuted Gram, G's gathered columns in G's dtype), or two c x c scratch buffers per
        chunk of blocks (a factor and its triangular inverse, or the two gathers of a permuted F_b, with
        a c x c bool mask)."""
        chunks = list(self._row_chunks())
        staged = max((b1 - b0) * (r1 - r0) * self.block_size for b0, b1, r0, r1 in chunks)
        stage = staged * (self._item + self._grads.element_size())
        scratch = (2 * self._item + 1) * min(self._block_step(), self.n_blocks) * self.block_size ** 2
        return max(stage, scratch)

    def _scratch(self, count: int) -> list[torch.Tensor]:
        """``count`` flat buffers of one chunk of c x c blocks, each reused by every chunk of a pass."""
        n = min(self._block_step(), self.n_blocks) * self.block_size ** 2
        bufs = [torch.empty(n, dtype=self._cdt, device=self.device) for _ in range(count)]
        self._note(*bufs)
        return bufs

    def _chunk_views(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        c = self.block_size
        return flat[: n * c * c].view(n, c, c)

    def _primal_gram(self, perm: torch.Tensor | None = None) -> None:
        """K_b = F_b = lambda I + G_b^T G_b / m for all blocks, on and below the diagonal only (what
        every factorisation reads; above it the buffer is left as it was), with the coordinates of block
        b in the order perm[b] (None: the original order), accumulated over row chunks of G."""
        m, c, nb = self.m, self.block_size, self.n_blocks
        if self._factor.numel() == 0:
            self._factor = torch.empty(nb, c, c, dtype=self._cdt, device=self.device)
        K = self._factor
        chunks = list(self._row_chunks())
        stage = self._staging([(b1 - b0, r1 - r0, c) for b0, b1, r0, r1 in chunks])
        self._note(stage)
        for b0, b1, r0, r1 in chunks:
            if perm is None:
                X = self._load(b0, b1, r0, r1, 0, c, into=stage)  # [nbc, rows, c]
            else:
                X = self._load_permuted(b0, b1, r0, r1, perm[b0:b1], into=stage)
            _lower_gram_(K[b0:b1], X, alpha=1.0 / m, beta=0.0 if r0 == 0 else 1.0)
        del stage
        diagonal = K.diagonal(dim1=1, dim2=2)
        diagonal.add_(self.damp)
        # F_qq off the Gram's diagonal (the numbers the factorisation sees), in the original order
        fd = diagonal.clone()
        self._fisher_diag = fd if perm is None else torch.empty_like(fd).scatter_(1, perm, fd)
        self._holds, self._perm = "gram", perm

    def _primal_factor(self) -> None:
        """Make the kept buffer a factor (of F_b in the original order, unless one is there already)."""
        if self._holds == "factor":
            return
        if self._holds == "none":
            self._primal_gram()
        step = self._block_step()
        for b0 in range(0, self.n_blocks, step):
            self._cholesky_in_place(self._factor[b0:min(b0 + step, self.n_blocks)])
        self._holds = "factor"

    def _primal_diag(self) -> None:
        """diag(F^-1), in the original order. From F_b: factored in scratch memory (F_b stays kept); from
        a factor in the order ``_perm``: the same solve, then back to the original order."""
        if self._holds == "none":
            self._primal_gram()
        c, K, step = self.block_size, self._factor, self._block_step()
        S, T = self._scratch(2)
        eye = torch.eye(c, dtype=self._cdt, device=self.device)
        diag = torch.empty(self.n_blocks, c, dtype=self._cdt, device=self.device)
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            if self._holds == "gram":
                L = self._chunk_views(S, b1 - b0).copy_(K[b0:b1])
                self._cholesky_in_place(L)
            else:
                L = K[b0:b1]
            diag[b0:b1] = self._inverse_column_sq_norms(L, self._chunk_views(T, b1 - b0), eye)
        if self._perm is not None:  # entry j of block b is coordinate perm[b, j]
            diag = torch.empty_like(diag).scatter_(1, self._perm, diag)
        self._diag = self._clamped(diag)

    def _inverse_column_sq_norms(self, L: torch.Tensor, T: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
        """sum_i (L^-1)_ij^2 per column j: the diagonal of (L L^T)^-1 = L^-T L^-1 (reads L's lower
        triangle only). With L = [[A, 0], [B, C]] (halves), L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]:
        four triangular solves of half size (c^3 / 2 flops) instead of one against the whole identity
        (c^3; the explicit inverse, ``cholesky_inverse``, also forms L^-T L^-1 and was measured 1.6-5x
        slower on the CPU)."""
        n, c = L.shape[0], L.shape[-1]
        if c < 2 * _HALVES_FROM:
            # L^-1 written column-major (the layout LAPACK solves in: no copy): row j of Tt is column j
            Tt = T.view(-1)[: n * c * c].view(n, c, c)
            torch.linalg.solve_triangular(L, eye[:c, :c].expand(n, c, c), upper=False, out=Tt.mT)
            return Tt.mul_(Tt).sum(-1)
        h = c // 2
        A, B, C = L[:, :h, :h], L[:, h:, :h], L[:, h:, h:]
        # B A^-1, then C^-1 (B A^-1), written column-major into the scratch
        Y = T.view(-1)[: n * (c - h) * h].view(n, h, c - h).mT
        torch.linalg.solve_triangular(A, B, upper=False, left=False, out=Y)
        torch.linalg.solve_triangular(C, Y, upper=False, out=Y)  # in place
        low = Y.square().sum(-2)
        top = self._inverse_column_sq_norms(A, T, eye).add_(low)
        return torch.cat([top, self._inverse_column_sq_norms(C, T, eye)], dim=-1)

    def _build_dual(self) -> torch.Tensor:
        """M_b = lambda m I + G_b G_b^T, L = chol(M), Z = L^-1 G_b; returns diag = (1 - ||Z_:j||^2)/lambda."""
        m, c = self.m, self.block_size
        M = self._factor
        diag = torch.empty(self.n_blocks, c, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks())
        whole = all(c0 == 0 and c1 == c for _, _, c0, c1 in chunks)
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        sq = torch.empty_like(stage)
        self._note(stage, sq)
        if whole:
            # Each chunk holds whole blocks: one load per chunk serves M, L and Z.
            for b0, b1, _, _ in chunks:
                X = self._load(b0, b1, 0, m, 0, c, into=stage)
                Mc = M[b0:b1]
                _add_lower_gram_(Mc, X)
                Mc.diagonal(dim1=1, dim2=2).add_(self.damp * m)
                self._fisher_diag[b0:b1] = _column_sq_norms(X, into=sq)
                self._cholesky_in_place(Mc)
                torch.linalg.solve_triangular(Mc, X, upper=False, out=X)  # X <- Z, in place
                diag[b0:b1] = X.square_().sum(1).neg_().add_(1.0)  # Z is scratch: square in place
        else:
            # Blocks wider than the budget: accumulate M over column chunks, factor, then Z per chunk.
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                _add_lower_gram_(M[b0:b1], X)
                self._fisher_diag[b0:b1, c0:c1] = _column_sq_norms(X, into=sq)
            M.diagonal(dim1=1, dim2=2).add_(self.damp * m)
            self._cholesky_in_place(M)
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                torch.linalg.solve_triangular(M[b0:b1], X, upper=False, out=X)
                diag[b0:b1, c0:c1] = X.square_().sum(1).neg_().add_(1.0)
        del stage, sq
        self._fisher_diag.div_(m).add_(self.damp)
        return diag.div_(self.damp)

    def _cholesky_in_place(self, A: torch.Tensor) -> None:
        info = torch.empty(A.shape[:-2], dtype=torch.int32, device=A.device)
        # Factor the transposed view as U = L^T (upper=True): LAPACK is column-major, and A^T of a
        # row-major A is column-major, so no internal copy is made (measured ~1.3x faster than
        # cholesky_ex(A, out=A)). It reads A^T's upper triangle = A's lower one, the half we fill,
        # and leaves L in A's lower triangle (zeros above).
        At = A.mT
        torch.linalg.cholesky_ex(At, upper=True, out=(At, info))
        # Recorded, not checked here: reading it is a host synchronisation, which the OBS step does
        # once for all blocks (``EmpiricalFisherInverse.failed``).
        self.failed = self.failed | (info != 0).any()
        # Only the lower triangle is read afterwards (solve_triangular / cholesky_inverse with
        # upper=False), so the factor is left exactly as LAPACK returns it.

    # ----------------------------------------------------------------------------------------
    # products

    def _primal_mul(self, vb: torch.Tensor) -> torch.Tensor:
        """F^-1 v = P^T L^-T L^-1 P v per block (P: the factor's order ``_perm``); vb is [nb, c, k]."""
        if self._perm is None:
            return _cholesky_solve(self._factor, vb)
        index = self._perm.unsqueeze(-1).expand_as(vb)
        out = _cholesky_solve(self._factor, vb.gather(1, index))
        return torch.empty_like(out).scatter_(1, index, out)

    def _dual_mul(self, vb: torch.Tensor) -> torch.Tensor:
        """(v - G_b^T M^-1 (G_b v)) / lambda per block; vb is [nb, c, k] and is overwritten."""
        m, c, k = self.m, self.block_size, vb.shape[-1]
        U = torch.zeros(self.n_blocks, m, k, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks())
        whole = all(c0 == 0 and c1 == c for _, _, c0, c1 in chunks)
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        self._note(vb, U, U, stage)  # U and its solve
        if whole:
            for b0, b1, _, _ in chunks:
                X = self._load(b0, b1, 0, m, 0, c, into=stage)
                U[b0:b1] = _cholesky_solve(self._factor[b0:b1], torch.bmm(X, vb[b0:b1]))
                vb[b0:b1].baddbmm_(X.mT, U[b0:b1], alpha=-1.0)
        else:
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                U[b0:b1].baddbmm_(X, vb[b0:b1, c0:c1])
            U = _cholesky_solve(self._factor, U)
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                vb[b0:b1, c0:c1] -= torch.bmm(X.mT, U[b0:b1])
        return vb.div_(self.damp)

    # ----------------------------------------------------------------------------------------
    # joint OBS over a set of pruned coordinates

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(self.n_blocks, self.block_size)
        pb = prune.reshape(self.n_blocks, self.block_size)
        if self.form == "dual":
            return self._dual_pruned(tb, pb, move=False).reshape(-1)
        out = torch.zeros_like(tb)
        self._primal_solve_pruned(tb, pb, out)
        return out.reshape(-1)

    def pruned_mul(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        if self.form == "dual":
            c = self.block_size
            return self._dual_pruned(t.reshape(-1, c), prune.reshape(-1, c), move=True).reshape(-1)
        if (self.device.type == "cpu" and self.block_size >= _REDUCED_FROM
                and self._holds != "factor" and self._perm is None):  # F_b in the original order, or nothing yet
            return self._primal_reduced_pruned_mul(t, prune)
        return self.mul(self.solve_pruned(t, prune).unsqueeze(0)).reshape(-1)

    def _primal_reduced_pruned_mul(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """u_Q = t_Q, u_R = -F_RR^-1 (F x)_R with x = t on Q and 0 on R, block by block. F x comes from
        the lower triangle K of F_b as tril(K) x + tril(K)^T x - diag(K) x; F_RR is gathered from tril(K)
        (R in increasing order keeps it lower) and factored in scratch memory. F_b stays kept, unchanged.
        Host reads (|Q|, the indices of R) are free on the CPU, and blocks with nothing pruned cost nothing."""
        if self._holds == "none":
            self._primal_gram()
        c = self.block_size
        tb, pb = t.reshape(self.n_blocks, c), prune.reshape(self.n_blocks, c)
        zero = torch.zeros((), dtype=self._cdt, device=self.device)
        out = torch.where(pb, tb, zero)  # u_Q = t_Q; also x, the move's source, block by block
        A, B = self._scratch(2)
        info = torch.empty((), dtype=torch.int32, device=self.device)
        for b in range(self.n_blocks):
            R = (~pb[b]).nonzero().squeeze(1)
            n = R.numel()
            if n == c or n == 0:  # nothing pruned in this block, or all of it: u_R is empty or 0
                continue
            K = torch.tril(self._factor[b], out=A[: c * c].view(c, c))
            x = out[b]
            y = torch.mv(K, x).add_(torch.mv(K.mT, x)).sub_(K.diagonal() * x)
            rows = torch.index_select(K, 1, R, out=B[: c * n].view(c, n))
            F_RR = torch.index_select(rows, 0, R, out=A[: n * n].view(n, n))  # K is no longer needed
            Ft = F_RR.mT
            torch.linalg.cholesky_ex(Ft, upper=True, out=(Ft, info))  # L in F_RR's lower triangle
            self.failed = self.failed | (info != 0)
            out[b, R] = _cholesky_solve(F_RR, y[R].unsqueeze(-1)).squeeze(-1).neg_()
        return out.reshape(-1)

    def _primal_solve_pruned(self, tb: torch.Tensor, pb: torch.Tensor, out: torch.Tensor) -> None:
        """Per block, F_b is factored with the kept coordinates R first and the pruned set Q last,
        P F_b P^T = L L^T; then ([F^-1]_QQ)^-1 is the Schur complement L_QQ L_QQ^T and
        s_Q = L_QQ (L_QQ^T t_Q). Blocks of different |Q| stay one batch: t is zeroed outside Q and both
        products are masked to Q, which (Q being last) restricts them to L_QQ exactly. One c x c
        Cholesky per block and no inverse (the earlier form took two: F^-1 explicitly, then the
        bordered [F^-1]_QQ). F_b comes from the kept buffer (permuted in place) or, where nothing is
        kept, straight from G in that order; the factor then replaces it and serves F^-1 v."""
        c, step = self.block_size, self._block_step()
        # R first, Q last, each in increasing order (a stable sort of the 0/1 flags)
        perm = torch.argsort(pb.to(torch.uint8), dim=1, stable=True)
        q = pb.gather(1, perm).unsqueeze(-1)  # [nb, c, 1]: the flags in that order
        x = torch.where(q, tb.gather(1, perm).unsqueeze(-1), torch.zeros((), dtype=self._cdt, device=self.device))
        in_place = self._holds == "gram" and self._perm is None
        A, B = self._scratch(2) if in_place else (None, None)
        if not in_place:  # nothing kept, or a factor: F_b again from G, formed in the new order
            self._primal_gram(perm)
        K = self._factor
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            L, p = K[b0:b1], perm[b0:b1]
            if A is not None and B is not None:
                # P F P^T below the diagonal from the kept lower triangle: F[p_i, p_j] is K[p_i, p_j]
                # where p_i > p_j and K[p_j, p_i] elsewhere, i.e. (P K P^T)[i, j] or its transpose's
                n = b1 - b0
                PK = torch.gather(L, 1, p.unsqueeze(-1).expand(n, c, c), out=self._chunk_views(A, n))
                PKP = torch.gather(PK, 2, p.unsqueeze(1).expand(n, c, c), out=self._chunk_views(B, n))
                torch.where(p.unsqueeze(-1) > p.unsqueeze(1), PKP, PKP.mT, out=L)
            self._cholesky_in_place(L)  # lower triangle, zeros above
            z = torch.bmm(L.mT, x[b0:b1]).mul_(q[b0:b1])  # L_QQ^T t_Q
            out[b0:b1].scatter_(1, p, torch.bmm(L, z).mul_(q[b0:b1]).squeeze(-1))  # L_QQ z
        self._holds, self._perm = "factor", perm

    def _dual_pruned(self, tb: torch.Tensor, pb: torch.Tensor, *, move: bool) -> torch.Tensor:
        """The joint OBS solve (``move=False``: s) or move (``move=True``: u = F^-1 s) of dual blocks from G alone.
        With R the kept and Q the pruned coordinates of a block, M_R = lambda m I_m + G_R G_R^T (Woodbury's
        matrix of the kept columns only) and beta = M_R^-1 G_Q t_Q,

            ([F^-1]_QQ)^-1 t_Q = lambda (t_Q + G_Q^T beta),        F_RR^-1 F_RQ t_Q = G_R^T beta,

        the Schur complement F_QQ - F_QR F_RR^-1 F_RQ and the kept set's stationarity, each with F_RR^-1 by
        Woodbury; so s = lambda (t + G^T beta) on Q (0 on R), and u = t on Q, -G^T beta on R. M_R is formed from
        G's columns with Q's zeroed (fixed shapes, no host read) and factored here: the kept factor of M is not
        used, and no Z = L^-1 G_b is formed; one lower Gram per block (5/8 m^2 c multiply-adds at m = 400)
        against two triangular solves and a full Gram through Z_Q, and M_R is positive definite by
        construction (forming I - Z_Q Z_Q^T cancels where Q holds most of a block)."""
        m, nb = self.m, self.n_blocks
        x = torch.where(pb, tb, torch.zeros((), dtype=self._cdt, device=self.device))  # t on Q, 0 on R
        keep = (~pb).to(self._cdt)
        M_R = torch.zeros(nb, m, m, dtype=self._cdt, device=self.device)
        a = torch.zeros(nb, m, 1, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks())
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        self._note(stage, M_R)
        for b0, b1, c0, c1 in chunks:
            X = self._load(b0, b1, 0, m, c0, c1, into=stage)
            a[b0:b1].baddbmm_(X, x[b0:b1, c0:c1, None])  # G_Q t_Q
            _add_lower_gram_(M_R[b0:b1], X.mul_(keep[b0:b1, None, c0:c1]))  # G_R G_R^T
        M_R.diagonal(dim1=1, dim2=2).add_(self.damp * m)
        self._cholesky_in_place(M_R)
        beta = _cholesky_solve(M_R, a)
        out = x if move else torch.zeros_like(tb)
        for b0, b1, c0, c1 in chunks:
            X = self._load(b0, b1, 0, m, c0, c1, into=stage)
            y = torch.bmm(X.mT, beta[b0:b1]).squeeze(-1)  # G_b^T beta, [blocks, columns]
            q = pb[b0:b1, c0:c1]
            if move:
                out[b0:b1, c0:c1] = torch.where(q, x[b0:b1, c0:c1], y.neg_())
            else:
                out[b0:b1, c0:c1] = torch.where(q, y.add_(tb[b0:b1, c0:c1]).mul_(self.damp), out[b0:b1, c0:c1])
        return out

    # ----------------------------------------------------------------------------------------
    # group OBS

    def _spd_solve(self, A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """A^-1 rhs for a batch of SPD matrices (principal blocks of F^-1 and their Woodbury forms) by
        Cholesky: half the flops of a general solve, and no LU. Batched float64 LU (torch.linalg.solve)
        crashed on the pinned stack at 2 threads for 192x192 to 512x512 blocks (oneMKL DLASWP "Parameter 6
        was incorrect", then "Pivots given to lu_solve must all be greater or equal to 1"); a matrix that
        is not positive definite sets ``failed``, as the block factorisations do."""
        factor, info = torch.linalg.cholesky_ex(A)
        self.failed = self.failed | (info != 0).any()
        return _cholesky_solve(factor, rhs)

    def _primal_group_solve(self, wb: torch.Tensor, u: torch.Tensor, g: int) -> None:
        c = self.block_size
        step = max(1, self._max_chunk_bytes // (c * c * self._item))
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            inv = torch.cholesky_inverse(self._factor[b0:b1])  # [nbc, c, c]; reads the lower triangle
            if self._perm is not None:  # the factor's order back to the original one
                back = torch.argsort(self._perm[b0:b1], dim=1)
                inv = inv.gather(1, back.unsqueeze(-1).expand_as(inv)).gather(2, back.unsqueeze(1).expand_as(inv))
            q = c // g
            # The g x g diagonal sub-blocks [F^-1]_QQ: [nbc, q, g, q, g] -> diagonal over q.
            sub = inv.view(b1 - b0, q, g, q, g).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
            rhs = wb[b0:b1].view(b1 - b0, q, g, 1)
            u[b0:b1] = self._spd_solve(sub, rhs).view(b1 - b0, c)
            self._note(inv)
            del inv, sub

    def _dual_group_solve(self, wb: torch.Tensor, u: torch.Tensor, g: int) -> None:
        m, lam = self.m, self.damp
        eye_m = torch.eye(m, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks(align=g))
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        for b0, b1, c0, c1 in chunks:
            Z = self._load(b0, b1, 0, m, c0, c1, into=stage)
            torch.linalg.solve_triangular(self._factor[b0:b1], Z, upper=False, out=Z)
            nbc, q = b1 - b0, (c1 - c0) // g
            Zq = Z.view(nbc, m, q, g).permute(0, 2, 1, 3)  # [nbc, q, m, g]
            wq = wb[b0:b1, c0:c1].reshape(nbc, q, g, 1)
            if g <= m:
                # [F^-1]_QQ = (I_g - Z_Q^T Z_Q) / lambda, formed and solved directly.
                A = torch.matmul(Zq.mT, Zq).neg_()
                A.diagonal(dim1=-2, dim2=-1).add_(1.0)
                sol = self._spd_solve(A, wq).mul_(lam)
            else:
                # ([F^-1]_QQ)^-1 w = lambda (w + Z_Q^T (I_m - Z_Q Z_Q^T)^-1 Z_Q w): m x m systems.
                K = eye_m - torch.matmul(Zq, Zq.mT)
                A = K
                sol = (wq + torch.matmul(Zq.mT, self._spd_solve(K, torch.matmul(Zq, wq)))).mul_(lam)
            u[b0:b1, c0:c1] = sol.reshape(nbc, c1 - c0)
            self._note(stage, A)
            del A, sol

    # ----------------------------------------------------------------------------------------
    # chunked access to G

    def _column_chunks(self, align: int = 1) -> Iterator[tuple[int, int, int, int]]:
        """(b0, b1, c0, c1): blocks b0:b1, columns c0:c1 of each, so that one staged chunk of
        shape [b1-b0, m, c1-c0] fits in max_chunk_bytes (at least one block, or one aligned
        column group, per chunk)."""
        m, c, nb = self.m, self.block_size, self.n_blocks
        per_block = m * c * self._item
        if per_block <= self._max_chunk_bytes:
            step = max(1, self._max_chunk_bytes // per_block)
            for b0 in range(0, nb, step):
                yield b0, min(b0 + step, nb), 0, c
        else:
            width = max(align, (self._max_chunk_bytes // (m * self._item)) // align * align)
            for b in range(nb):
                for c0 in range(0, c, width):
                    yield b, b + 1, c0, min(c0 + width, c)

    def _row_chunks(self) -> Iterator[tuple[int, int, int, int]]:
        """(b0, b1, r0, r1) for the primal Gram G_b^T G_b accumulated over row (gradient) chunks."""
        m, c, nb = self.m, self.block_size, self.n_blocks
        per_row = c * self._item
        rows = max(1, min(m, self._max_chunk_bytes // per_row))
        step = max(1, self._max_chunk_bytes // (rows * per_row))
        for r0 in range(0, m, rows):
            for b0 in range(0, nb, step):
                yield b0, min(b0 + step, nb), r0, min(r0 + rows, m)

    def _staging(self, shapes: list[tuple[int, int, int]]) -> torch.Tensor:
        """One flat buffer for the largest chunk, reused by every chunk of a pass: a fresh
        allocation per chunk costs page faults on CPU (measured ~0.5 ms per 8 MiB)."""
        n = max(a * b * c for a, b, c in shapes)
        return torch.empty(n, dtype=self._cdt, device=self.device)

    def _load(self, b0: int, b1: int, r0: int, r1: int, c0: int, c1: int, *, into: torch.Tensor) -> torch.Tensor:
        """G rows r0:r1, columns c0:c1 of blocks b0:b1, as [b1-b0, r1-r0, c1-c0] in compute dtype,
        written into the front of the flat buffer ``into`` (one strided copy, no padding)."""
        c = self.block_size
        G = self._grads[r0:r1]
        shape = (b1 - b0, r1 - r0, c1 - c0)
        out = into[: shape[0] * shape[1] * shape[2]].view(shape)
        # (row r, block i, column j) -> G[r, (b0 + i) * c + c0 + j]
        src = G.as_strided((r1 - r0, b1 - b0, c1 - c0), (G.stride(0), c, 1), G.storage_offset() + b0 * c + c0)
        return out.copy_(src.permute(1, 0, 2))

    def _load_permuted(self, b0: int, b1: int, r0: int, r1: int, perm: torch.Tensor, *,
                       into: torch.Tensor) -> torch.Tensor:
        """As ``_load`` (whole blocks), each block's columns in the order perm[block]: G's columns are
        gathered in G's dtype first (the one extra buffer of a permuted Gram), then converted."""
        c, n, rows = self.block_size, b1 - b0, r1 - r0
        src = self._grads[r0:r1, b0 * c:b1 * c].reshape(rows, n, c)
        cols = torch.gather(src, 2, perm.to(src.device).unsqueeze(0).expand(rows, n, c))
        out = into[: n * rows * c].view(n, rows, c)
        return out.copy_(cols.permute(1, 0, 2))

    def _to_blocks(self, V: torch.Tensor) -> torch.Tensor:
        """(k, d) -> [nb, c, k], always a fresh buffer: the products work in place on it."""
        k = V.shape[0]
        return V.reshape(k, self.n_blocks, self.block_size).permute(1, 2, 0).clone(
            memory_format=torch.contiguous_format)

    def _note(self, *tensors: torch.Tensor) -> None:
        live = self.kept_bytes + sum(t.numel() * t.element_size() for t in tensors)
        self.peak_bytes = max(self.peak_bytes, live)


# Triangular inverses (for diag(F^-1)) of at least twice this size are split in halves once.
_HALVES_FROM = 128  # 0.85x the time of 256 for c = 1000 (fewer flops in the base case's full solves)
# Full blocks at least this wide run in one batch per CPU thread, side by side (``EmpiricalFisherInverse``).
_PARALLEL_FROM = 128
# Primal blocks this wide take the per-block reduced joint move on the CPU (``pruned_mul``); narrower
# ones stay batched, where a Python loop over many small blocks would cost more than the flops saved.
_REDUCED_FROM = 128


def _lower_gram_(K: torch.Tensor, X: torch.Tensor, *, alpha: float, beta: float, width: int = 256) -> None:
    """K = beta K + alpha X^T X on and below the diagonal ([n, c, c], X [n, rows, c]), by row panels of
    about ``width``: panel i is one product X[:, :, panel]^T X[:, :, :end of panel], so the blocks above
    the diagonal are never computed: 5/8 of the full product's flops at 4 panels (c = 1000), 9/16 at 8
    (c = 2000), in products still wide enough to run at the full product's rate (torch has no batched
    syrk). beta = 0 ignores what K held (uninitialised memory included); the part above the panels'
    diagonal blocks is left as it was."""
    c = K.shape[-1]
    panels = max(1, round(c / width))
    edges = [c * i // panels for i in range(panels + 1)]
    for i0, i1 in zip(edges[:-1], edges[1:]):
        K[:, i0:i1, :i1].baddbmm_(X[:, :, i0:i1].mT, X[:, :, :i1], beta=beta, alpha=alpha)


def _cholesky_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 B by two triangular solves, reading L's lower triangle only. The same numbers as
    ``torch.cholesky_solve``, which was measured ~20x slower on the CPU for one right-hand side against
    1000 x 1000 factors (17 ms against 0.8 ms per block, torch 2.14 + oneMKL 2024.2, 2 threads)."""
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True)


def _add_lower_gram_(M: torch.Tensor, X: torch.Tensor, *, base: int = 64) -> None:
    """M += X X^T on and below the diagonal (batched, [b, m, m] += [b, m, c] [b, c, m]).

    Only the lower triangle is read by the Cholesky (uplo='L'), so the upper off-diagonal
    quadrants are skipped recursively: with m = 256 and base 64 this is 5/8 of the multiply-adds
    of the full product, measured ~1.3x faster on CPU (torch exposes no batched syrk).
    Entries above the diagonal are left partially filled; never read them."""
    m = X.shape[-2]
    if m <= base:
        M.baddbmm_(X, X.mT)
        return
    h = m // 2
    _add_lower_gram_(M[..., :h, :h], X[..., :h, :], base=base)
    M[..., h:, :h].baddbmm_(X[..., h:, :], X[..., :h, :].mT)
    _add_lower_gram_(M[..., h:, h:], X[..., h:, :], base=base)


def _column_sq_norms(X: torch.Tensor, *, into: torch.Tensor) -> torch.Tensor:
    """sum_i X[b, i, j]^2 -> [b, j]. Squaring into a scratch buffer (flat, at least X's size) and
    summing over the middle dim runs ~4x faster on CPU than torch.linalg.vector_norm(X, dim=1),
    whose strided reduction is slow."""
    sq = into[: X.numel()].view(X.shape)
    return torch.mul(X, X, out=sq).sum(1)


class DiagonalFisher:
    """The diagonal-Fisher baseline with the same interface: F replaced by its diagonal,
    F_qq = lambda + (1/m) sum_i G_iq^2, so diag(F^-1) = 1/F_qq and F^-1 v = v / F_qq.
    Costs one pass over G and d floats; OBS with it prunes by w_q^2 F_qq and moves nothing else."""

    @torch.no_grad()
    def __init__(self, grads: torch.Tensor, *, damp: float = 1e-5, device: torch.device | str | None = None) -> None:
        if grads.dim() != 2:
            raise ValueError(f"grads must be (m, d), got shape {tuple(grads.shape)}")
        if not damp > 0:
            raise ValueError(f"damp (lambda) must be > 0, got {damp}")
        self.m, self.d = grads.shape
        self.damp = float(damp)
        self.dtype = grads.dtype
        self.device = grads.device if device is None else torch.device(device)
        # Sum of squares in float64 without a float64 copy of G (staged to the device by row chunks).
        sq = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        rows = max(1, (32 * 2**20) // max(1, self.d * 8))
        for r0 in range(0, self.m, rows):
            sq.add_(grads[r0:r0 + rows].to(device=self.device, dtype=torch.float64).square().sum(0))
        self._fisher_diag = sq.div_(self.m).add_(self.damp)
        self._peak_bytes = 2 * self.d * 8 + rows * self.d * 8

    def diag(self) -> torch.Tensor:
        return self._fisher_diag.reciprocal().to(self.dtype)

    def fisher_diag(self) -> torch.Tensor:
        return self._fisher_diag.to(self.dtype)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        return (v.to(torch.float64) / self._fisher_diag).to(v.dtype)

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """[F^-1]_QQ is diagonal (1/F_qq), so s_Q = t_Q F_qq and -F^-1 s = -t on Q, 0 elsewhere."""
        s = t.reshape(-1).to(torch.float64) * self._fisher_diag
        return torch.where(prune.reshape(-1), s, torch.zeros((), dtype=s.dtype, device=s.device)).to(t.dtype)

    def pruned_mul(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """F^-1 s = t on Q and 0 elsewhere (F diagonal: nothing else moves)."""
        flat = t.reshape(-1)
        return torch.where(prune.reshape(-1), flat, torch.zeros((), dtype=flat.dtype, device=flat.device))

    def failed(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.bool, device=self.device)

    def peak_memory_bytes(self) -> int:
        return int(self._peak_bytes)

    def kept_memory_bytes(self) -> int:
        return int(self.d * 8)
