"""What the model-reading criteria know about each filter: its activations, or its BatchNorm's gamma.

Two criteria score a filter by its output activations on calibration samples (``apoz``: Hu, Peng, Tai &
Tang 2016, "Network Trimming"; ``meanact``: the mean activation of Molchanov et al. 2017), and one by the
scale gamma of the BatchNorm that normalises it (``slimming``: Liu et al. 2017, "Learning Efficient
Convolutional Networks through Network Slimming"). Both need to know what follows each masked layer.

What follows is read from the model's graph (``torch.fx``, masked layers and norms as leaves), not from
module order: a model often applies its ReLU as a function (``F.relu`` in smallcnn) and declares modules in
any order. For a masked layer L:

- its BatchNorm: the node that consumes L's output is a BatchNorm module, and L's output goes nowhere else;
- its activation: the node that consumes L's output (or its BatchNorm's, with the same single-consumer
  rule) is a ReLU or ReLU6 (a module, ``F.relu``/``torch.relu``/``F.relu6`` or ``.relu()``).

"The activation" of a filter is that ReLU's output, exactly as the model computes it: a forward hook on
the module whose output the ReLU consumes (the BatchNorm, or L) applies the same ReLU to that output, which
is the ReLU's own output (the single-consumer rule makes it so; an in-place ReLU runs after the hook). In a
residual block (conv -> BN -> add -> ReLU) the filter's own activation does not exist, and such a layer is
refused with the ``--exclude-layers`` hint rather than measured on something else.

Statistics are accumulated per filter while the samples stream through (zeros, sum, count in float64): no
activation tensor outlives its forward hook. The model runs in eval mode (BatchNorm with its running
statistics, as at inference), without gradients, and is restored afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from configs.errors import UserError
from layers.masked import MaskedLayer


@dataclass
class UnitProbe:
    """What a model-reading criterion knows of one layer's filters (one entry per filter).

    zeros: outputs of the filter's activation that were exactly 0; total: their sum; count: outputs per
    filter seen (samples x positions); gamma: the weight of the BatchNorm that follows the layer."""

    zeros: torch.Tensor | None = None
    total: torch.Tensor | None = None
    count: int = 0
    gamma: torch.Tensor | None = None


@dataclass(frozen=True)
class Follower:
    """What the traced graph applies to a masked layer's output: a BatchNorm module (its name) and/or a
    ReLU-like activation (the function, and its name for messages); ``problem`` says why not, if not."""

    norm: str | None = None
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    problem: str | None = None
    consumer: str = ""  # what reads the layer's output (a module name or a graph node's), for messages


class _Tracer(fx.Tracer):
    """Masked layers and norms are single calls (their masking and statistics are not traced through)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, MaskedLayer | nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(
            m, module_qualified_name)


def _relu6(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 6.0)


def _activation_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ReLU/ReLU6 that ``node`` computes of its first input, or None (not a ReLU: APoZ is defined for them)."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if type(mod) is nn.ReLU:
            return torch.relu
        if type(mod) is nn.ReLU6:
            return _relu6
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return torch.relu
        if node.target is F.relu6:
            return _relu6
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return torch.relu
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def followers(model: nn.Module, names: Iterable[str], *, criterion: str) -> dict[str, Follower]:
    """The BatchNorm and activation that directly follow each of the masked layers ``names`` (see the
    module docstring). A model torch.fx cannot trace is one line naming --prune-method."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise UserError(f"--prune-method {criterion} finds the BatchNorm/ReLU after each layer with torch.fx, which "
                        f"cannot trace the model ({type(exc).__name__}: {text}); use another --prune-method") from None
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    out = {}
    for name in names:
        nodes = calls.get(name, [])
        if len(nodes) != 1:  # a hook would see several outputs (or none) per forward
            out[name] = Follower(problem=f"called {len(nodes)} times per forward pass")
            continue
        nxt = _only_user(nodes[0])
        if nxt is None:
            out[name] = Follower(problem=f"its output goes to {len(nodes[0].users)} places")
            continue
        consumer = str(nxt.target) if nxt.op == "call_module" else nxt.name
        norm = None
        if nxt.op == "call_module" and isinstance(modules[str(nxt.target)], nn.modules.batchnorm._BatchNorm):
            norm = str(nxt.target)
            after = _only_user(nxt)
            if after is None or len(calls.get(norm, [])) != 1:
                out[name] = Follower(norm=norm, problem=f"its BatchNorm {norm}'s output does not go to one ReLU alone")
                continue
            nxt = after
        act = _activation_of(nxt, modules)
        problem = None if act is not None else f"{nxt.name} (not a ReLU/ReLU6) consumes its output"
        out[name] = Follower(norm=norm, activation=act, problem=problem, consumer=consumer)
    return out


def _refuse(criterion: str, what: str, bad: dict[str, str]) -> None:
    if bad:
        first = next(iter(bad))
        raise UserError(f"--prune-method {criterion} needs {what} after every masked layer, but {first}: {bad[first]}; "
                        f"keep such layers dense with --exclude-layers {','.join(bad)}")


def _channel_dim(layer: nn.Module, output: torch.Tensor) -> int:
    """The dimension of a layer's output that indexes its filters: 1 for a conv, the last for a Linear."""
    return output.dim() - 1 if isinstance(layer, nn.Linear) else 1


@torch.no_grad()
def batchnorm_gammas(model: nn.Module, layers: Mapping[str, MaskedLayer], *, criterion: str) -> dict[str, UnitProbe]:
    """The weight gamma of the BatchNorm that directly consumes each masked layer's output (Network
    Slimming's channel scale); a layer without one is refused with the --exclude-layers hint."""
    follow = followers(model, layers, criterion=criterion)
    modules = dict(model.named_modules())
    bad = {n: f.problem or f"its output goes to {f.consumer}, not a BatchNorm" for n, f in follow.items()
           if f.norm is None}
    bad.update({n: f"its BatchNorm {f.norm} has no affine weight" for n, f in follow.items()
                if f.norm is not None and getattr(modules[f.norm], "weight", None) is None})
    _refuse(criterion, "a BatchNorm", bad)
    out = {}
    for name, f in follow.items():
        assert f.norm is not None  # refused above
        gamma = modules[f.norm].weight
        assert isinstance(gamma, torch.Tensor)
        out[name] = UnitProbe(gamma=gamma.detach().clone())
    return out


@torch.no_grad()
def activation_stats(model: nn.Module, layers: Mapping[str, MaskedLayer],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, samples: int, device: torch.device,
                     criterion: str) -> dict[str, UnitProbe]:
    """Per filter of each masked layer: how many of its activation's outputs were 0, their sum and their
    count, over the first ``samples`` samples of ``batches`` (eval mode, no gradients; see the module
    docstring). A layer whose filters have no ReLU of their own is refused with the --exclude-layers hint."""
    follow = followers(model, layers, criterion=criterion)
    _refuse(criterion, "a ReLU/ReLU6 (after at most a BatchNorm)",
            {n: f.problem for n, f in follow.items() if f.problem is not None})
    modules = dict(model.named_modules())
    probes = {name: UnitProbe() for name in layers}

    def hook_for(name: str, activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
        layer, probe = layers[name], probes[name]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            dim = _channel_dim(layer, output)
            a = activation(output).movedim(dim, -1).reshape(-1, output.shape[dim])
            zeros, total = (a == 0).sum(0, dtype=torch.float64), a.sum(0, dtype=torch.float64)
            probe.zeros = zeros if probe.zeros is None else probe.zeros + zeros
            probe.total = total if probe.total is None else probe.total + total
            probe.count += a.shape[0]
        return hook

    handles = []
    for name, f in follow.items():
        assert f.activation is not None  # refused above
        handles.append(modules[f.norm or name].register_forward_hook(hook_for(name, f.activation)))
    dtype = next(iter(layers.values())).weight.dtype
    was_training = model.training
    model.eval()
    try:
        done = 0
        for x, _ in batches:
            x = x[: samples - done].to(device)
            model(x.to(dtype) if x.is_floating_point() else x)
            done += len(x)
            if done >= samples:
                break
        if done < samples:
            raise ValueError(f"the batch stream ended after {done} samples; {samples} are needed for the activations")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return probes
