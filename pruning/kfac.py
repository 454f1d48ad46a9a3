"""Blockwise K-FAC (``--prune-method kfac``): WoodFisher's ``KFACFisherPruner`` (pruners/kfac.py and
utils/kfac_utils.py, utils/kfac_fisher_utils.py of IST-DASLab/WoodFisher), one Kronecker-factored Fisher
block per masked layer.

For a layer y = W a (a Linear; a Conv2d on its unfolded input patches, a of length C*kh*kw in the order of
``weight.view(out, -1)``), the per-sample weight gradient is sum_t g_t a_t^T (t: the output positions, one for
a Linear on a vector), and K-FAC approximates the Fisher block F = E[vec(dW) vec(dW)^T] (row-major vec, as
the solver flattens weights) by

    F ~= G (x) A,    A = E_n[ sum_t a_t a_t^T ] / S^2,    G = E_n[ S^2 sum_t g_t g_t^T ],

E_n the mean over the N calibration samples (the Fisher's sample stream, ``--fisher-subsample-size`` x
``--fisher-mini-bsz`` samples, eval mode, labels from the data), g_t = dl_n/dy_t the gradient of the sample's
own cross-entropy with respect to the layer's output, and S the number of output positions (oh * ow for a
conv, 1 for a Linear on a vector). The 1/S^2 and S^2 are the reference's split of the factors between A and
G ("proper" ComputeCovA/ComputeCovG: patches divided by the spatial size, output gradients multiplied by it);
their product, E[sum a a^T] (x) E[sum g g^T], does not depend on it, but the damping does. Damped as the
reference does without --kfac-pi (its default): A + sqrt(lambda) I and G + sqrt(lambda) I, so that

    F^-1 = (G + sqrt(lambda) I)^-1 (x) (A + sqrt(lambda) I)^-1,
    [F^-1]_(i,j),(i,j) = [G~^-1]_ii [A~^-1]_jj          (diag(F^-1) = outer(diag G~^-1, diag A~^-1)),
    F^-1 vec(V) = vec(G~^-1 V A~^-1).

The statistic is WoodFisher's w_q^2 / [F^-1]_qq and the update the sum of the single-weight OBS updates
-F^-1 s with s_q = w_q / [F^-1]_qq on the pruned set (``pruning.obs.obs_statistic``/``obs_update``), as the
reference's pruner (a ``WoodburryFisherPruner`` with the K-FAC inverse) applies them; single weights have no
joint solve (it would need [F^-1]_QQ of an arbitrary set Q, |Q|^2 numbers with no Kronecker structure).

Filters and channels (group OBS, ``pruning.obs.group_obs_statistic``/``group_obs_update``; the reference has
neither) do have that structure. A filter is a row i of W, Q = {i} x all columns, and a channel c of a conv
the r = kh*kw columns J of its input channel (one column of a Linear), Q = all rows x J:

    filter:   [F^-1]_QQ = [G~^-1]_ii A~^-1,      ([F^-1]_QQ)^-1 w_Q = A~ w_i / [G~^-1]_ii,
              joint move for the pruned rows I:   G~^-1[:, I] ([G~^-1]_II)^-1 W_I;
    channel:  [F^-1]_QQ = G~^-1 (x) [A~^-1]_JJ,   ([F^-1]_QQ)^-1 w_Q = G~ W_J ([A~^-1]_JJ)^-1,
              joint move for the pruned columns J: W_J ([A~^-1]_JJ)^-1 A~^-1[J, :],

with G~ = G + sqrt(lambda) I and A~ = A + sqrt(lambda) I; the joint move is the exact optimum of removing
all of them at once, one out x out (filters) or in x in (channels) factorisation per layer, of fixed shape
(``_subset_solve``), so no host read. Everything is float64 inside, with no D x D matrix: per layer, one
(in x in) and one (out x out) factor.

Differences from the reference, on purpose: (1) the bias. The reference appends a 1 to a when a layer has a
bias (the block is then over [W | b]), but its OBS step prunes and indexes weights only and asserts that the
inverse has exactly as many entries as weights, so it runs on bias-free layers only. Here the quadratic model
is over the masked weights alone, as for every other criterion of the solver (G's columns are weights only):
no ones column, the bias a constant that is never moved; on a bias-free layer the two agree. (2) Pruned
weights stay in the Kronecker block (K-FAC cannot remove single coordinates of it, and the reference does not
either); the update then moves them too, and they are set back to exactly 0. (3) A grouped conv (groups > 1)
and layers other than Conv2d/Linear are refused with the --exclude-layers hint (the reference knows Linear and
Conv2d only).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from configs.errors import UserError
from layers.masked import MaskedLayer
from pruning.hessian import PlainForward

SAMPLES_PER_PASS = 64  # per forward/backward pass: A and G are sums over samples, so the cut does not matter


@dataclass
class KFACFactors:
    """One layer's undamped factors: A (in x in, in = numel / out), G (out x out), float64."""

    A: torch.Tensor
    G: torch.Tensor


def _patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, L, C*kh*kw): the input patches a conv multiplies its weight with, in weight.view(out, -1) order."""
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":  # as Conv2d._conv_forward: pad with the mode first, then no padding
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    elif isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": stride 1 (PyTorch's rule); an even receptive field pads unevenly
            pads = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            if any(p % 2 for p in pads):
                raise NotImplementedError("padding='same' with an even receptive field pads unevenly: not supported")
            padding = (pads[0] // 2, pads[1] // 2)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    return cols.transpose(1, 2)


def _check_layers(layers: Mapping[str, MaskedLayer], criterion: str) -> None:
    bad = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            bad[name] = f"a grouped conv (groups {layer.groups})"
        elif not isinstance(layer, nn.Conv2d | nn.Linear):
            bad[name] = f"a {type(layer).__name__}, not a Conv2d or Linear"
    if bad:
        first = next(iter(bad))
        raise UserError(f"--prune-method {criterion} has Kronecker factors for plain Conv2d and Linear layers, but "
                        f"{first} is {bad[first]}; keep such layers dense with --exclude-layers {','.join(bad)}")


def kfac_factors(model: nn.Module, layers: Mapping[str, MaskedLayer],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, samples: int, device: torch.device,
                 criterion: str = "kfac") -> dict[str, KFACFactors]:
    """A and G of every layer (see the module docstring) over the first ``samples`` samples of ``batches``."""
    _check_layers(layers, criterion)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def keep_io(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            calls.setdefault(name, []).append((args[0].detach(), output))
        return hook

    sums = {name: KFACFactors(
        A=torch.zeros(layer.weight[0].numel(), layer.weight[0].numel(), dtype=torch.float64, device=device),
        G=torch.zeros(layer.weight.shape[0], layer.weight.shape[0], dtype=torch.float64, device=device))
        for name, layer in layers.items()}
    dtype = next(iter(layers.values())).weight.dtype
    handles = [layer.register_forward_hook(keep_io(name)) for name, layer in layers.items()]
    done = 0
    try:
        with PlainForward(model, layers):
            for x, y in batches:
                x, y = x[: samples - done].to(device), y[: samples - done].to(device)
                for start in range(0, len(y), SAMPLES_PER_PASS):
                    xb, yb = x[start:start + SAMPLES_PER_PASS], y[start:start + SAMPLES_PER_PASS]
                    calls.clear()
                    with torch.enable_grad():
                        logits = model(xb.to(dtype) if xb.is_floating_point() else xb)
                        # summed: the output gradient of each sample is that of its own loss (eval mode: no
                        # sample reads another), the reference's batch-mean gradient times the batch size
                        loss = F.cross_entropy(logits, yb, reduction="sum")
                        outputs = [o for name in layers for _, o in calls.get(name, [])]
                        missing = [name for name in layers if name not in calls]
                        if missing:
                            raise ValueError(f"layer {missing[0]} took no part in the forward pass")
                        grads = iter(torch.autograd.grad(loss, outputs))
                    for name, layer in layers.items():
                        for inp, _ in calls[name]:  # a layer called twice adds its calls' positions
                            _accumulate(sums[name], layer, inp, next(grads))
                done += len(y)
                if done >= samples:
                    break
    finally:
        for h in handles:
            h.remove()
    if done < samples:
        raise ValueError(f"the batch stream ended after {done} samples; {samples} are needed for the K-FAC factors")
    for f in sums.values():
        f.A /= samples
        f.G /= samples
    return sums


def _accumulate(f: KFACFactors, layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    """Add one call's sum_t a_t a_t^T / S^2 to A and S^2 sum_t g_t g_t^T to G (S: output positions per sample)."""
    if isinstance(layer, nn.Conv2d):
        a = _patches(layer, x)                       # (N, L, in)
        g = gy.flatten(2).transpose(1, 2)            # (N, L, out)
    else:  # Linear, over any leading dims: the positions are all but the first (sample) and last
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        g = gy.reshape(gy.shape[0], -1, gy.shape[-1])
    positions = a.shape[1]
    a = a.reshape(-1, a.shape[-1]).double()
    g = g.reshape(-1, g.shape[-1]).double()
    f.A += a.T @ a / positions**2
    f.G += (g.T @ g) * positions**2


def _damped_inverse(m: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m + shift I)^-1 by Cholesky in float64, and whether the factorisation failed."""
    damped = m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    return torch.cholesky_inverse(chol), info != 0


class KroneckerInverse:
    """One layer's K-FAC inverse (G + sqrt(lambda) I)^-1 (x) (A + sqrt(lambda) I)^-1 behind the curvature
    interface of ``pruning.obs`` (``diag``, ``mul``, ``fisher_diag``), for the weight flattened row-major
    (out, in). Never forms the (out*in)^2 matrix."""

    def __init__(self, factors: KFACFactors, *, damp: float, weight_shape: tuple[int, ...] | None = None) -> None:
        """``weight_shape``: the layer's weight shape (out, C, kh, kw) or (out, in), for its input channels
        (``permuted``); default (out, in), one column a channel."""
        shift = damp ** 0.5
        self.A, self.G = factors.A, factors.G
        self.shift = shift
        self.A_inv, bad_a = _damped_inverse(factors.A, shift)
        self.G_inv, bad_g = _damped_inverse(factors.G, shift)
        self._failed = bad_a | bad_g
        self.shape = (factors.G.shape[0], factors.A.shape[0])
        self.weight_shape = tuple(weight_shape) if weight_shape is not None else self.shape
        if len(self.weight_shape) < 2 or math.prod(self.weight_shape) != \
                self.shape[0] * self.shape[1]:
            raise ValueError(f"weight shape {self.weight_shape} does not match the factors' {self.shape}")

    def diag(self) -> torch.Tensor:
        """[F^-1]_qq = [G~^-1]_ii [A~^-1]_jj for q = (i, j)."""
        return torch.outer(self.G_inv.diagonal(), self.A_inv.diagonal()).reshape(-1)

    def fisher_diag(self) -> torch.Tensor:
        """The damped K-FAC F's diagonal, (G_ii + sqrt(lambda)) (A_jj + sqrt(lambda))."""
        return torch.outer(self.G.diagonal() + self.shift, self.A.diagonal() + self.shift).reshape(-1)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """F^-1 v = vec(G~^-1 V A~^-1), in v's dtype."""
        V = v.reshape(self.shape).to(torch.float64)
        return (self.G_inv @ V @ self.A_inv).reshape(-1).to(v.dtype)

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        raise ValueError("K-FAC has no joint solve for single weights (it would need [F^-1]_QQ for any set Q): "
                         "its update is the sum of single updates")

    pruned_mul = solve_pruned  # the joint move needs the same solve: refused alike

    # -- filters: groups of `in` contiguous weights, one row of W each -----------------------------------------
    def _check_rows(self, group_size: int) -> None:
        if group_size != self.shape[1]:
            raise ValueError(f"K-FAC in the weight's own order groups whole filters ({self.shape[1]} weights), "
                             f"not {group_size}: channels need permuted()")

    def group_solve(self, w: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """u_i = ([F^-1]_QQ)^-1 w_i = A~ w_i / [G~^-1]_ii for every filter i: [F^-1]_QQ = [G~^-1]_ii A~^-1."""
        self._check_rows(group_size)
        W = w.reshape(self.shape).to(torch.float64)
        return ((W @ self.A + self.shift * W) / self.G_inv.diagonal()[:, None]).reshape(-1).to(w.dtype)

    def group_pruned_mul(self, w: torch.Tensor, prune: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """The joint move F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q for Q the filters I where ``prune`` (one bool per
        filter): [F^-1]_QQ = [G~^-1]_II (x) A~^-1, so the move is G~^-1[:, I] ([G~^-1]_II)^-1 W_I."""
        self._check_rows(group_size)
        W = w.reshape(self.shape).to(torch.float64)
        p = prune.reshape(-1).to(torch.float64)
        X, bad = _subset_solve(self.G_inv, p, p[:, None] * W)  # rows I: ([G~^-1]_II)^-1 W_I; 0 elsewhere
        self.note_failure(bad)
        return (self.G_inv @ X).reshape(-1).to(w.dtype)

    def permuted(self, perm: torch.Tensor) -> KroneckerChannels:
        """This inverse in an input-channel order ``perm`` (``KroneckerChannels``): the only order the solver
        asks of it (a filter is a row: filters need none; grouped convs, whose tied filters would, are refused)."""
        return KroneckerChannels(self, perm)

    def kept_memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.G, self.A_inv, self.G_inv))

    def peak_memory_bytes(self) -> int:
        # a product's two temporaries, and a joint move's masked out x out or in x in system and its factor
        return self.kept_memory_bytes() + 8 * (self.shape[0] * self.shape[1] * 2 + 2 * max(self.shape) ** 2)

    def failed(self) -> torch.Tensor:
        return self._failed

    def note_failure(self, bad: torch.Tensor) -> None:
        """Fold a later factorisation's failure flag (a device tensor: no host read) into ``failed()``."""
        self._failed = self._failed | bad


def _subset_solve(M_inv: torch.Tensor, p: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X with X_I = ((M^-1)_II)^-1 B_I and 0 elsewhere, for I where p = 1 (B is 0 off I), in one fixed-shape
    Cholesky solve of P M^-1 P + (I - P): block diagonal, (M^-1)_II on I and the identity off it, so positive
    definite with M^-1 and no host read for the size of I. Also whether the factorisation failed."""
    system = p[:, None] * M_inv * p[None, :] + torch.diag(1 - p)
    chol, info = torch.linalg.cholesky_ex(system)
    return torch.cholesky_solve(B, chol), info != 0


class KroneckerChannels:
    """A ``KroneckerInverse`` in an input-channel order ``perm``: the flat vectors it takes and returns list one
    channel's weights (every filter's, r = kh*kw each; r = 1 for a Linear) after another, channels in any order
    (``group_permutation``'s, or a coupled run's unit order: ``OBSSolver._unit_permutation``), so that a group
    of ``group_size`` = k * out * r contiguous entries is a unit of k channels. A unit owns the columns J of
    W (out x in) of its channels, and

        [F^-1]_QQ = G~^-1 (x) [A~^-1]_JJ,   ([F^-1]_QQ)^-1 w_Q = G~ W_J ([A~^-1]_JJ)^-1,

    and the joint move for the union J of the pruned units is W_J ([A~^-1]_JJ)^-1 A~^-1[J, :]. The channel
    order is read off ``perm`` on the device (no host read)."""

    def __init__(self, base: KroneckerInverse, perm: torch.Tensor) -> None:
        out, fan_in = base.shape
        channels = base.weight_shape[1]
        if perm.numel() != out * fan_in:
            raise ValueError(f"a permutation of {perm.numel()} weights for a layer of {out * fan_in}")
        self.base = base
        self.perm = perm
        self.split = (out, channels, fan_in // channels)  # (out, C, r)
        r = self.split[2]
        # channel of each entry's block of out * r: its first entry's column (o = 0) divided by r
        order = perm.reshape(channels, out * r)[:, 0] // r
        self.columns = (order[:, None] * r + torch.arange(r, device=perm.device)).reshape(-1)  # W's, unit order

    def _natural(self, v: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(v).scatter_(0, self.perm, v)

    def _channels(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.perm]

    def _units(self, group_size: int) -> int:
        """Channels per unit, from the group size."""
        out, channels, r = self.split
        k = group_size // (out * r)
        if k < 1 or k * out * r != group_size or channels % k:
            raise ValueError(f"K-FAC in channel order groups whole channels ({out * r} weights each, "
                             f"{channels} channels), not {group_size}")
        return k

    def diag(self) -> torch.Tensor:
        return self._channels(self.base.diag())

    def fisher_diag(self) -> torch.Tensor:
        return self._channels(self.base.fisher_diag())

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        return self._channels(self.base.mul(self._natural(v)))

    def solve_pruned(self, t: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
        return self.base.solve_pruned(t, prune)

    pruned_mul = solve_pruned

    def group_solve(self, w: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """u_Q = G~ W_J ([A~^-1]_JJ)^-1 for every unit (J: its channels' columns), in this order."""
        k = self._units(group_size)
        out, channels, r = self.split
        base, cols, width = self.base, self.columns, k * r
        units = channels // k
        W = self._natural(w).reshape(base.shape).to(torch.float64)[:, cols].reshape(out, units, width)
        B = base.A_inv[cols][:, cols].reshape(units, width, units, width)
        chol, info = torch.linalg.cholesky_ex(torch.diagonal(B, dim1=0, dim2=2).permute(2, 0, 1))  # [A~^-1]_JJ
        base.note_failure((info != 0).any())
        right = torch.cholesky_solve(W.permute(1, 2, 0), chol).permute(2, 0, 1)  # W_J [A~^-1]_JJ^-1 per unit
        U = (torch.einsum("po,ouj->puj", base.G, right) + base.shift * right).reshape(out, -1)  # G~ on the left
        natural = torch.empty_like(U).index_copy_(1, cols, U)
        return self._channels(natural.reshape(-1)).to(w.dtype)

    def group_pruned_mul(self, w: torch.Tensor, prune: torch.Tensor, *, group_size: int) -> torch.Tensor:
        """The joint move for the units where ``prune`` (one bool per unit), in this order."""
        k = self._units(group_size)
        base = self.base
        W = self._natural(w).reshape(base.shape).to(torch.float64)
        by_unit = prune.reshape(-1).to(torch.float64).repeat_interleave(k * self.split[2])  # columns, unit order
        p = torch.empty_like(by_unit).index_copy_(0, self.columns, by_unit)  # one per column of W
        Y, bad = _subset_solve(base.A_inv, p, (W * p[None, :]).T)  # columns J: ([A~^-1]_JJ)^-1 W_J^T
        base.note_failure(bad)
        return self._channels((Y.T @ base.A_inv).reshape(-1)).to(w.dtype)

    def permuted(self, perm: torch.Tensor) -> KroneckerChannels:
        raise ValueError("K-FAC in channel order is permuted already")

    def kept_memory_bytes(self) -> int:
        return self.base.kept_memory_bytes()

    def peak_memory_bytes(self) -> int:
        return self.base.peak_memory_bytes() + 8 * self.base.shape[1] ** 2  # the reordered A~^-1

    def failed(self) -> torch.Tensor:
        return self.base.failed()


def read_kfac(model: nn.Module, layers: Mapping[str, MaskedLayer],
              batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, samples: int, device: torch.device,
              damp: float, criterion: str, probes: int = 0) -> dict[str, KroneckerInverse]:
    """The curvature reader of ``kfac`` (``PruneMethod.curvature``): each layer's damped ``KroneckerInverse``.
    ``probes`` (naivehess's Hutchinson probes) is accepted for the readers' common signature; --hessian-probes
    with kfac is refused before a run starts."""
    factors = kfac_factors(model, layers, batches, samples=samples, device=device, criterion=criterion)
    return {name: KroneckerInverse(f, damp=damp, weight_shape=tuple(layers[name].weight.shape))
            for name, f in factors.items()}
