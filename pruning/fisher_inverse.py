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

* primal (c <= m): F_b is formed (c x c), factored F_b = L L^T (Cholesky), then
  diag(F_b^-1) from ``cholesky_inverse`` and F_b^-1 v from ``cholesky_solve``.
  Time O(m c^2 + c^3) per block, memory O(c^2).

* dual (c > m): the Woodbury identity with A = lambda I, U = G_b^T, C = (1/m) I, V = G_b gives

      F_b^-1 = (1/lambda) [ I - G_b^T (lambda m I_m + G_b G_b^T)^-1 G_b ].

  With M = lambda m I_m + G_b G_b^T = L L^T (m x m) and Z = L^-1 G_b (m x c):

      diag(F_b^-1)_j = (1 - ||Z[:, j]||^2) / lambda,      F_b^-1 v = (v - Z^T (Z v)) / lambda
                                                          = (v - G_b^T M^-1 (G_b v)) / lambda.

  Time O(m^2 c + m^3) per block, memory O(m c) transient and O(m^2) kept: a block can be a whole
  layer, or all prunable weights at once (d = total, block_size=None).

Precision: everything past the input is done in float64 (``compute_dtype``). The dual form needs
it: 1 - ||z||^2 cancels when a coordinate is well determined by the gradients, and M has condition
number up to (lambda m + ||G_b||^2) / (lambda m), which float32 cannot carry at lambda = 1e-5.
The results are clamped into the bounds every SPD F satisfies,

    1 / F_qq  <=  [F^-1]_qq  <=  1 / lambda,

so round-off can never produce a negative or unbounded OBS denominator.

Memory: G is never copied whole. It is read in chunks of blocks (or, for a single block wider than
the budget, chunks of columns), each converted to float64 into one reused staging buffer of at most
``max_chunk_bytes`` (plus a scratch buffer of the same size while building); only the Cholesky
factors (n_blocks x k x k, k = c primal / m dual) and two length-d vectors stay. Only the lower
triangle of each Gram matrix is formed (it is all the Cholesky reads). ``peak_memory_bytes()`` reports the
largest sum of live buffers this object allocated (an analytic count of its own temporaries, the figure the
trainer logs).

The dual form keeps a reference to G (no copy) because F^-1 v needs G_b again; do not modify G in
place while the inverse is in use.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

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
        spans = ([(0, n_full * c, c)] if n_full else []) + ([(n_full * c, d, tail)] if tail else [])
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
        return torch.cat([part.diag() for _, _, part in self._parts]).to(self.dtype)

    def fisher_diag(self) -> torch.Tensor:
        """F_qq = lambda + (1/m) sum_i G_iq^2, length d, in G's dtype (the diagonal-Fisher baseline)."""
        return torch.cat([part.fisher_diag() for _, _, part in self._parts]).to(self.dtype)

    @torch.no_grad()
    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v for v of shape (d,) or a batch (k, d); same shape and dtype as v."""
        if v.shape[-1] != self.d or v.dim() not in (1, 2):
            raise ValueError(f"v must be ({self.d},) or (k, {self.d}), got {tuple(v.shape)}")
        V = v.reshape(-1, self.d).to(device=self.device, dtype=self._cdt)
        out = torch.cat([part.mul(V[:, a:b]) for a, b, part in self._parts], dim=1)
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
        return torch.cat([part.group_solve(W[a:b], g) for a, b, part in self._parts]).to(w.dtype)

    @torch.no_grad()
    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        """s with s_Q = ([F^-1]_QQ)^-1 t_Q in every block, Q = the block's coordinates where ``prune``
        is True, and s = 0 elsewhere: the joint OBS solve for removing the set Q at once (the update
        is then -F^-1 s). Exact for any Q; the cost per block is bounded by min(|Q|, c, m)^3:
        primal blocks (c <= m) solve a c x c system, dual blocks an m x m one (Woodbury), so a set
        of any size costs no more than one block's inverse. Returns shape (d,), in t's dtype."""
        if t.numel() != self.d or prune.numel() != self.d:
            raise ValueError(f"t and prune must have {self.d} entries, got {t.numel()} and {prune.numel()}")
        T = t.reshape(-1).to(device=self.device, dtype=self._cdt)
        P = prune.reshape(-1).to(device=self.device, dtype=torch.bool)
        return torch.cat([part.solve_pruned(T[a:b], P[a:b]) for a, b, part in self._parts]).to(t.dtype)

    def failed(self) -> torch.Tensor:
        """A 0-dim bool tensor on the device: whether any Cholesky factorisation failed. Checking it
        is a host synchronisation, so the caller does it once per pruning step, not per block."""
        return torch.stack([part.failed for _, _, part in self._parts]).any()

    def peak_memory_bytes(self) -> int:
        """Largest sum of buffers held at once (all kept factors + one batch's staging), in bytes."""
        kept = [part.kept_bytes for _, _, part in self._parts]
        return int(max(sum(kept) - k + part.peak_bytes for k, (_, _, part) in zip(kept, self._parts)))

    def kept_memory_bytes(self) -> int:
        """Bytes kept between calls: Cholesky factors, diag(F^-1) and F_qq."""
        return int(sum(part.kept_bytes for _, _, part in self._parts))


class _BlockBatch:
    """n blocks of the same width c covering exactly the n*c columns of ``grads``, computed in
    batched calls; the primal or dual form by c <= m. Inputs and outputs in compute dtype."""

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
        # Kept state: one Cholesky factor per block, diag(F^-1) and F_qq.
        self._factor = torch.zeros(nb, k, k, dtype=compute_dtype, device=self.device)
        self._diag = torch.empty(nb, c, dtype=compute_dtype, device=self.device)
        self._fisher_diag = torch.zeros(nb, c, dtype=compute_dtype, device=self.device)
        self.kept_bytes = sum(t.numel() * self._item for t in (self._factor, self._diag, self._fisher_diag))
        self.peak_bytes = self.kept_bytes
        if self.form == "primal":
            self._build_primal()
        else:
            self._build_dual()
        # 1/F_qq <= [F^-1]_qq <= 1/lambda for every SPD F; clamp away round-off outside.
        self._diag = torch.maximum(self._diag, self._fisher_diag.reciprocal()).clamp_(max=1.0 / self.damp)

    def diag(self) -> torch.Tensor:
        return self._diag.reshape(-1)

    def fisher_diag(self) -> torch.Tensor:
        return self._fisher_diag.reshape(-1)

    def mul(self, V: torch.Tensor) -> torch.Tensor:
        """F^-1 applied to the rows of V (k, d); returns (k, d)."""
        vb = self._to_blocks(V)  # [nb, c, k]
        if self.form == "primal":
            out = torch.cholesky_solve(vb, self._factor)
            self._note(vb, out)
        else:
            out = self._dual_mul(vb)
        return out.permute(2, 0, 1).reshape(V.shape[0], self.d)

    def group_solve(self, w: torch.Tensor, g: int) -> torch.Tensor:
        wb = w.reshape(self.n_blocks, self.block_size)
        u = torch.empty_like(wb)
        if self.form == "primal":
            self._primal_group_solve(wb, u, g)
        else:
            self._dual_group_solve(wb, u, g)
        return u.reshape(-1)

    # ----------------------------------------------------------------------------------------
    # construction

    def _build_primal(self) -> None:
        """F_b = lambda I + G_b^T G_b / m for all blocks, then Cholesky and diag(F^-1)."""
        m, c = self.m, self.block_size
        F = self._factor  # built in place, factored in place
        chunks = list(self._row_chunks())
        stage = self._staging([(b1 - b0, r1 - r0, c) for b0, b1, r0, r1 in chunks])
        sq = torch.empty_like(stage)
        for b0, b1, r0, r1 in chunks:
            X = self._load(b0, b1, r0, r1, 0, c, into=stage)  # [nbc, rows, c]
            F[b0:b1].baddbmm_(X.mT, X)
            self._fisher_diag[b0:b1].add_(_column_sq_norms(X, into=sq))
        self._note(stage, sq)
        del stage, sq
        F.div_(m).diagonal(dim1=1, dim2=2).add_(self.damp)
        self._fisher_diag.div_(m).add_(self.damp)
        self._cholesky_in_place(F)
        # diag(F^-1) from the explicit inverse of a chunk of blocks at a time.
        per_block = c * c * self._item
        step = max(1, self._max_chunk_bytes // per_block)
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            inv = torch.cholesky_inverse(F[b0:b1])
            self._diag[b0:b1] = inv.diagonal(dim1=1, dim2=2)
            self._note(inv)
            del inv

    def _build_dual(self) -> None:
        """M_b = lambda m I + G_b G_b^T, L = chol(M), Z = L^-1 G_b, diag = (1 - ||Z_:j||^2)/lambda."""
        m, c = self.m, self.block_size
        M = self._factor
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
                self._diag[b0:b1] = X.square_().sum(1).neg_().add_(1.0)  # Z is scratch: square in place
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
                self._diag[b0:b1, c0:c1] = X.square_().sum(1).neg_().add_(1.0)
        del stage, sq
        self._diag.div_(self.damp)
        self._fisher_diag.div_(m).add_(self.damp)

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
        # Only the lower triangle is read afterwards (solve_triangular / cholesky_solve /
        # cholesky_inverse with upper=False), so the factor is left exactly as LAPACK returns it.

    # ----------------------------------------------------------------------------------------
    # products

    def _dual_mul(self, vb: torch.Tensor) -> torch.Tensor:
        """(v - G_b^T M^-1 (G_b v)) / lambda per block; vb is [nb, c, k] and is overwritten."""
        m, c, k = self.m, self.block_size, vb.shape[-1]
        U = torch.zeros(self.n_blocks, m, k, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks())
        whole = all(c0 == 0 and c1 == c for _, _, c0, c1 in chunks)
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        self._note(vb, U, U, stage)  # U and its cholesky_solve result
        if whole:
            for b0, b1, _, _ in chunks:
                X = self._load(b0, b1, 0, m, 0, c, into=stage)
                U[b0:b1] = torch.cholesky_solve(torch.bmm(X, vb[b0:b1]), self._factor[b0:b1])
                vb[b0:b1].baddbmm_(X.mT, U[b0:b1], alpha=-1.0)
        else:
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                U[b0:b1].baddbmm_(X, vb[b0:b1, c0:c1])
            U = torch.cholesky_solve(U, self._factor)
            for b0, b1, c0, c1 in chunks:
                X = self._load(b0, b1, 0, m, c0, c1, into=stage)
                vb[b0:b1, c0:c1] -= torch.bmm(X.mT, U[b0:b1])
        return vb.div_(self.damp)

    # ----------------------------------------------------------------------------------------
    # joint OBS over a set of pruned coordinates

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        tb = t.reshape(self.n_blocks, self.block_size)
        pb = prune.reshape(self.n_blocks, self.block_size)
        out = torch.zeros_like(tb)
        if self.form == "primal":
            self._primal_solve_pruned(tb, pb, out)
        else:
            self._dual_solve_pruned(tb, pb, out)
        return out.reshape(-1)

    def _primal_solve_pruned(self, tb: torch.Tensor, pb: torch.Tensor, out: torch.Tensor) -> None:
        """[F^-1]_QQ z = t_Q as one c x c system per block: F^-1 where both coordinates are in Q, the
        identity elsewhere, and a right-hand side that is 0 off Q (so z is 0 there)."""
        c = self.block_size
        step = max(1, self._max_chunk_bytes // (2 * c * c * self._item))
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            inv = torch.cholesky_inverse(self._factor[b0:b1])  # [nbc, c, c]
            both = pb[b0:b1, :, None] & pb[b0:b1, None, :]
            eye = torch.eye(c, dtype=self._cdt, device=self.device).expand_as(inv)
            A = torch.where(both, inv, eye)  # SPD: a principal submatrix of F^-1, bordered by I
            rhs = torch.where(pb[b0:b1], tb[b0:b1], torch.zeros((), dtype=self._cdt, device=self.device))
            factor, info = torch.linalg.cholesky_ex(A)
            self.failed = self.failed | (info != 0).any()
            out[b0:b1] = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
            self._note(inv, A)
            del inv, A

    def _dual_solve_pruned(self, tb: torch.Tensor, pb: torch.Tensor, out: torch.Tensor) -> None:
        """With Z = L^-1 G_b and Z_Q its columns in Q, [F^-1]_QQ = (I - Z_Q^T Z_Q) / lambda, whose
        inverse by Woodbury is lambda (I + Z_Q^T (I_m - Z_Q Z_Q^T)^-1 Z_Q): only m x m systems.
        Z_Q Z_Q^T and Z_Q t_Q accumulate over column chunks; the result needs Z_Q once more."""
        m = self.m
        nb = self.n_blocks
        gram = torch.zeros(nb, m, m, dtype=self._cdt, device=self.device)
        zt = torch.zeros(nb, m, 1, dtype=self._cdt, device=self.device)
        chunks = list(self._column_chunks())
        stage = self._staging([(b1 - b0, m, c1 - c0) for b0, b1, c0, c1 in chunks])
        self._note(stage, gram, gram)
        for b0, b1, c0, c1 in chunks:
            Z = self._load(b0, b1, 0, m, c0, c1, into=stage)
            torch.linalg.solve_triangular(self._factor[b0:b1], Z, upper=False, out=Z)
            Z.mul_(pb[b0:b1, None, c0:c1])  # Z_Q: columns outside Q zeroed
            gram[b0:b1].baddbmm_(Z, Z.mT)
            zt[b0:b1].baddbmm_(Z, tb[b0:b1, c0:c1, None])
        K = torch.eye(m, dtype=self._cdt, device=self.device).expand(nb, m, m) - gram  # SPD (see above)
        factor, info = torch.linalg.cholesky_ex(K)
        self.failed = self.failed | (info != 0).any()
        y = torch.cholesky_solve(zt, factor)  # (I - Z_Q Z_Q^T)^-1 Z_Q t_Q
        del gram, K
        for b0, b1, c0, c1 in chunks:
            Z = self._load(b0, b1, 0, m, c0, c1, into=stage)
            torch.linalg.solve_triangular(self._factor[b0:b1], Z, upper=False, out=Z)
            part = tb[b0:b1, c0:c1] + torch.bmm(Z.mT, y[b0:b1]).squeeze(-1)
            out[b0:b1, c0:c1] = torch.where(pb[b0:b1, c0:c1], part * self.damp,
                                            torch.zeros((), dtype=self._cdt, device=self.device))

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
        return torch.cholesky_solve(rhs, factor)

    def _primal_group_solve(self, wb: torch.Tensor, u: torch.Tensor, g: int) -> None:
        c = self.block_size
        step = max(1, self._max_chunk_bytes // (c * c * self._item))
        for b0 in range(0, self.n_blocks, step):
            b1 = min(b0 + step, self.n_blocks)
            inv = torch.cholesky_inverse(self._factor[b0:b1])  # [nbc, c, c]
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

    def _to_blocks(self, V: torch.Tensor) -> torch.Tensor:
        """(k, d) -> [nb, c, k], always a fresh buffer: the products work in place on it."""
        k = V.shape[0]
        return V.reshape(k, self.n_blocks, self.block_size).permute(1, 2, 0).clone(
            memory_format=torch.contiguous_format)

    def _note(self, *tensors: torch.Tensor) -> None:
        live = self.kept_bytes + sum(t.numel() * t.element_size() for t in tensors)
        self.peak_bytes = max(self.peak_bytes, live)


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

    def failed(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.bool, device=self.device)

    def peak_memory_bytes(self) -> int:
        return int(self._peak_bytes)

    def kept_memory_bytes(self) -> int:
        return int(self.d * 8)
