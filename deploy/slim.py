"""Structured slimming: a masked model becomes a physically smaller plain network.

A filter mask zeroes a convolution's output channel; a channel mask zeroes an input channel. The
masked model still computes every channel. Slimming removes them, and everything that reads or
ties them is made consistent, for any model ``torch.fx`` can trace (no per-architecture rules):

1. **Channel elements.** The dense twin (masks applied) is traced. Every channel of every
   activation is an *element*: each conv output channel, each input channel, each zero channel
   that a padding op adds (option-A shortcuts). Ops that act per channel (BatchNorm, ReLU,
   pooling, spatial slicing) pass their input's elements on; an elementwise op of two activations
   (a residual ``add``) *ties* the elements at the same channel index (union-find); ``flatten``
   maps a channel to its features; ``cat`` concatenates. A grouped conv's filter reads the input
   channels of its group only; a depthwise conv with one filter per channel ties its input and
   output channel.
2. **Decision per tied group.** A group is kept when it is *alive* (some conv in it keeps the
   filter) and *read* (some conv reads it through a kept channel-mask column, or a layer without
   a mask reads it), or when it is *pinned*: the network's input and output, and whatever an op
   this analysis does not understand touches, are never changed. Ties make the kept set of a
   residual stream the UNION of the kept filters of the convs that add into it; the filters that
   union keeps although their mask prunes them are reported with their parameter count.
3. **Constant folding.** A removed group that is read is not zero in the masked model: its conv
   outputs zero, but the BatchNorm after it adds a constant, which passes ReLU and pooling. The
   constant is measured (a forward pass, checked to be the same for two inputs and at every
   position) and folded into the consumers: into a linear layer's bias, into a conv's bias when
   the conv does not zero-pad, and otherwise into a one-channel "border" kernel
   (``FoldedConv2d``), because a zero-padded conv of a constant is not constant at the border.
4. **Rewrite.** Convs, BatchNorms and linears get their kept rows/columns, channel padding its
   kept counts; a grouped conv stays grouped, so every group must keep as many input and as many
   output channels as the others: a group that keeps fewer keeps its first removed channels too
   (reported like the residual unions). The result is checked against the masked model on random
   inputs.

The slimmed model is an ``fx.GraphModule`` (plain PyTorch modules plus ``FoldedConv2d``); write it
with ``deploy.formats`` as a ``torch.export`` program or ONNX, which load without this project.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import StochasticDepth, stochastic_depth

from configs.errors import UserError
from layers import masked_layers, to_dense
from layers.maskset import is_depthwise
from layers.norm import MaskedLayerNorm, norm_channel_dim
from pruning.cost import model_cost


class SlimError(ValueError):
    """The model cannot be slimmed as asked (no structured mask, untraceable model)."""


class FoldedConv2d(nn.Conv2d):
    """A conv plus the constant contribution of input channels that slimming removed.

    Those channels were constant (a pruned filter's BatchNorm shift); a zero-padded conv of a
    constant map is constant inside and smaller at the border, so the exact contribution is the
    conv of an all-ones map with ``border`` (one input channel: sum over removed channels of
    weight x constant). It is computed once per call for the whole batch (N-independent).
    """

    border: torch.Tensor

    def __init__(self, *args: Any, border: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("border", border)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, x.shape[-2], x.shape[-1])
        extra = F.conv2d(ones, self.border, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(x, self.weight, self.bias) + extra


# -- the channel analysis ---------------------------------------------------------------------------
# Modules / functions / methods that act on each channel separately: their output has the channels
# (elements) of their first argument.
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    StochasticDepth)  # torchvision's residual-branch drop: a per-sample factor, identity in eval
PER_CHANNEL_FUNCTIONS: set[Any] = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    stochastic_depth}  # (fx traces StochasticDepth's forward into this wrapped function: EfficientNet, ConvNeXt)
PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "detach"}
ELEMENTWISE_FUNCTIONS: set[Any] = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub,
                                   torch.mul}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "mul"}
SHAPE_METHODS = {"size", "dim"}  # read no values


class _Elements:
    """Union-find over channel elements, with per-element facts."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.alive: list[bool] = []
        self.pinned: list[bool] = []
        self.read: list[bool] = []
        self.producer: list[tuple[str, int] | None] = []  # (conv name, filter index)
        self.norm_members: dict[int, list[tuple[str, int]]] = {}  # element -> (channel LayerNorm, channel)
        self.readers: dict[int, list[tuple[str, int]]] = {}  # element -> (layer, input channel) that reads it

    def new(self, *, alive: bool, pinned: bool = False, producer: tuple[str, int] | None = None) -> int:
        self.parent.append(len(self.parent))
        self.alive.append(alive)
        self.pinned.append(pinned)
        self.read.append(False)
        self.producer.append(producer)
        return len(self.parent) - 1

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class _Analysis:
    elements: _Elements
    channels: dict[fx.Node, list[int]]  # node -> element of each channel (dim 1)
    convs: dict[str, fx.Node]            # conv module name -> its (single) call node
    linears: dict[str, fx.Node]
    norms: dict[str, fx.Node]
    pads: list[fx.Node]
    pointwise: dict[str, fx.Node] = field(default_factory=dict)       # channels-last linears (1x1 convs)
    channel_norms: dict[str, fx.Node] = field(default_factory=dict)   # MaskedLayerNorm calls
    scales: dict[str, tuple[fx.Node, int]] = field(default_factory=dict)  # per-channel parameter -> (op, its dim)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if "tensor_meta" in a.meta]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_list(chans: list[int], in_shape: tuple[int, ...]) -> list[int]:
    per = 1
    for s in in_shape[2:]:
        per *= s
    return [e for e in chans for _ in range(per)]


def _analyse(gm: fx.GraphModule, masks: dict[str, torch.Tensor], *, coupling: bool = False) -> _Analysis:
    """The channel elements of every activation of ``gm`` and their ties. ``coupling``: the units of
    ``dependency_groups``: also ties the j-th channel of every group of a grouped conv (inputs and outputs),
    under which each group keeps the same channels, as a grouped conv's slimmed twin needs; and passes
    a plain channel LayerNorm's channels through, as its masked twin (``layers.norm``) will."""
    el = _Elements()
    chans: dict[fx.Node, list[int]] = {}
    last: set[fx.Node] = set()  # activations whose channels are the last dim (ConvNeXt's permuted blocks)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    analysis = _Analysis(el, chans, {}, {}, {}, [])

    def fresh(node: fx.Node, *, pinned: bool) -> None:
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            chans[node] = [el.new(alive=True, pinned=pinned) for _ in range(shape[1])]

    def pin_inputs(node: fx.Node) -> None:
        for arg in _tensor_args(node):
            for e in chans.get(arg, []):
                el.pinned[e] = True

    def unknown(node: fx.Node) -> None:
        pin_inputs(node)
        fresh(node, pinned=True)

    def read(elements: list[int], columns: torch.Tensor | None, reader: str | None = None) -> None:
        for i, e in enumerate(elements):
            if columns is None or bool(columns[i]):
                el.read[e] = True
            if reader is not None:
                el.readers.setdefault(e, []).append((reader, i))

    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        first = chans.get(args[0]) if args else None
        if any(a in last for a in node.all_input_nodes):
            _channels_last(node, first, modules, masks, analysis, last, unknown, read, coupling=coupling,
                           once=node.op != "call_module" or calls[node.target] == 1)
            continue
        if _permutation(node) == (0, 2, 3, 1) and first is not None and len(_shape(args[0]) or ()) == 4:
            chans[node] = first
            last.add(node)
            continue
        if node.op == "placeholder":
            fresh(node, pinned=True)
        elif node.op == "output":
            pin_inputs(node)
        elif node.op == "call_module":
            mod = modules[node.target]
            rewritten = isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))
            if first is None or (rewritten and calls[node.target] > 1):  # one module, two channel sets
                unknown(node)
            elif type(mod) is nn.Conv2d and one_to_one(mod) and len(first) == mod.in_channels:
                # Output channel j is computed from input channel j alone: the two are one channel, tied.
                mask = masks.get(node.target)
                rows = mask.flatten(1).any(1) if mask is not None else None
                read(first, rows)  # input j is read through filter j
                outs = [el.new(alive=rows is None or bool(rows[j]), producer=(node.target, j))
                        for j in range(mod.out_channels)]
                for a, b in zip(first, outs):
                    el.union(a, b)
                chans[node] = outs
                analysis.convs[node.target] = node
            elif type(mod) is nn.Conv2d and len(first) == mod.in_channels:
                # A plain or grouped conv: filter j reads the input channels of its group. (Grouped: each
                # group must keep as many inputs and outputs as every other, see _balance_pins.)
                mask = masks.get(node.target)
                dense = None if mask is None else _dense_mask(mask, mod.groups)
                rows = dense.flatten(1).any(1) if dense is not None else None
                cols = dense.transpose(0, 1).flatten(1).any(1) if dense is not None else None
                read(first, cols, reader=node.target if mod.groups == 1 else None)
                outs = [el.new(alive=rows is None or bool(rows[j]), producer=(node.target, j))
                        for j in range(mod.out_channels)]
                if coupling and mod.groups > 1:  # --coupled: position p of every group is one unit
                    for side in (first, outs):
                        size = len(side) // mod.groups
                        for i in range(size, len(side)):
                            el.union(side[i % size], side[i])
                chans[node] = outs
                analysis.convs[node.target] = node
            elif (type(mod) is nn.Linear and first is not None and len(first) == mod.in_features
                  and len(_shape(args[0]) or ()) == 2):  # features in dim 1 (a Linear over a map's last dim is not)
                mask = masks.get(node.target)
                read(first, mask.any(0) if mask is not None else None, reader=node.target)
                fresh(node, pinned=True)  # classes (and hidden units) are never removed
                analysis.linears[node.target] = node
            elif isinstance(mod, PER_CHANNEL_MODULES) and first is not None:
                chans[node] = first
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    analysis.norms[node.target] = node
            elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and first is not None:
                chans[node] = _flatten_list(first, _shape(args[0]) or ())
            elif norm_channel_dim(mod) == 1 and calls[node.target] == 1 and first is not None:
                _channel_norm(node, mod, first, masks, analysis, read, unknown, coupling=coupling)
            else:
                unknown(node)
        elif node.op == "call_function":
            fn = node.target
            out_shape = _shape(node)
            if fn in PER_CHANNEL_FUNCTIONS and first is not None:
                chans[node] = first
            elif fn in ELEMENTWISE_FUNCTIONS:
                _elementwise(node, chans, el, unknown, analysis)
            elif fn is torch.flatten and first is not None and _flatten_dim(node) == 1:
                chans[node] = _flatten_list(first, _shape(args[0]) or ())
            elif fn is F.pad and first is not None and _channel_pad(node) is not None:
                before, after = _channel_pad(node)  # type: ignore[misc]  # checked just above
                zero = [el.new(alive=False) for _ in range(before + after)]
                chans[node] = zero[:before] + first + zero[before:]
                analysis.pads.append(node)
            elif fn is operator.getitem and first is not None and _keeps_channels(node):
                chans[node] = first
            elif fn is torch.cat and _cat_dim(node) == 1 and all(a in chans for a in node.args[0]):
                chans[node] = [e for a in node.args[0] for e in chans[a]]
            elif out_shape is None and not _tensor_args(node):
                pass
            else:
                unknown(node)
        elif node.op == "call_method":
            if node.target in SHAPE_METHODS:
                continue
            if node.target in PER_CHANNEL_METHODS and first is not None:
                chans[node] = first
            elif node.target in ELEMENTWISE_METHODS:
                _elementwise(node, chans, el, unknown, analysis)
            elif node.target in ("view", "reshape", "flatten") and first is not None and _is_flatten(node, args[0]):
                chans[node] = _flatten_list(first, _shape(args[0]) or ())
            else:
                unknown(node)
        elif node.op == "get_attr":
            fresh(node, pinned=True)
    return analysis


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` (method or function), else None."""
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1:]
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(int(cast(int, d)) for d in dims) if all(isinstance(d, int) for d in dims) else None


# Ops that act on each value alone: they keep a channels-last activation's channels (no pooling here: it
# would act over the channels).
CHANNELS_LAST_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Dropout, nn.Identity)
CHANNELS_LAST_FUNCTIONS: set[Any] = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.dropout,
                                     torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}


def _channels_last(node: fx.Node, first: list[int] | None, modules: dict[str, nn.Module],
                   masks: dict[str, torch.Tensor], a: _Analysis, last: set[fx.Node], unknown: Any, read: Any, *,
                   coupling: bool, once: bool) -> None:
    """An op reading a channels-last activation (channels in the last dim, after ``permute(0, 2, 3, 1)``):
    the permutation back, values-wise ops, a LayerNorm over the channels, and a linear layer over them (a
    1x1 conv: its rows are channels); anything else keeps every channel it touches, and so does a module
    called more than once (``once`` False: two channel sets, one rewrite)."""
    el, chans = a.elements, a.channels
    src = node.args[0] if node.args else None
    if first is None or not isinstance(src, fx.Node) or src not in last or len(node.all_input_nodes) != 1:
        unknown(node)  # e.g. an elementwise op of two activations: not met in a channels-last layout yet
        return
    if _permutation(node) == (0, 3, 1, 2):
        chans[node] = first
        return
    if node.op == "call_module":
        target = cast(str, node.target)
        mod = modules[target]
        if isinstance(mod, CHANNELS_LAST_MODULES):
            chans[node] = first
            last.add(node)
            return
        if not once and (type(mod) is nn.Linear or norm_channel_dim(mod) is not None):
            unknown(node)
            return
        if type(mod) is nn.Linear and len(first) == mod.in_features:
            mask = masks.get(target)
            read(first, mask.any(0) if mask is not None else None, reader=target)
            rows = mask.any(1) if mask is not None else None
            chans[node] = [el.new(alive=rows is None or bool(rows[j]), producer=(target, j))
                           for j in range(mod.out_features)]
            last.add(node)
            a.pointwise[target] = node
            return
        if norm_channel_dim(mod) == -1:
            _channel_norm(node, mod, first, masks, a, read, unknown, coupling=coupling)
            if node in chans:
                last.add(node)
            return
    if node.op == "call_function" and node.target in CHANNELS_LAST_FUNCTIONS:
        chans[node] = first
        last.add(node)
        return
    unknown(node)


def _channel_norm(node: fx.Node, mod: nn.Module, first: list[int], masks: dict[str, torch.Tensor], a: _Analysis,
                  read: Any, unknown: Any, *, coupling: bool) -> None:
    """A LayerNorm over the channels: its masked twin (statistics over the kept channels, pruned ones 0) passes
    each channel on and reads the kept ones; a plain one mixes every channel into every other (a removed
    channel would change the statistics), except for ``dependency_groups``, where it becomes the twin."""
    assert isinstance(mod, nn.LayerNorm)
    if mod.normalized_shape != (len(first),):
        unknown(node)
    elif isinstance(mod, MaskedLayerNorm):
        read(first, mod.channel_mask)
        a.channels[node] = first
        a.channel_norms[cast(str, node.target)] = node
    elif coupling:
        for j, e in enumerate(first):
            a.elements.norm_members.setdefault(e, []).append((cast(str, node.target), j))
        a.channels[node] = first
    else:
        unknown(node)


def _dense_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's (out, in / groups, kh, kw) mask or weight as the (out, in, kh, kw) block-diagonal
    tensor of the same map (zero outside each filter's group); the tensor itself when groups == 1."""
    if groups == 1:
        return mask
    out, per_in = mask.shape[:2]
    per_out = out // groups
    dense = mask.new_zeros((out, per_in * groups, *mask.shape[2:]))
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = mask[g * per_out:(g + 1) * per_out]
    return dense


def one_to_one(conv: nn.Conv2d) -> bool:
    """A depthwise conv with one filter per input channel (out = in channels): output j reads input j alone."""
    return is_depthwise(conv) and conv.out_channels == conv.in_channels


def _same_channels(shape: tuple[int, ...] | None, out: tuple[int, ...]) -> bool:
    """Whether an operand of shape ``shape`` lines up channel by channel with the output ``out``: the same
    batch and channels, each spatial size equal or 1 (broadcast: squeeze-excitation's per-channel scale)."""
    if shape is None or len(shape) != len(out) or shape[:2] != out[:2]:
        return False
    return all(a in (b, 1) for a, b in zip(shape[2:], out[2:]))


def _elementwise(node: fx.Node, chans: dict[fx.Node, list[int]], el: _Elements, unknown: Any,
                 analysis: _Analysis) -> None:
    """An elementwise op of activations ties the channels at the same index: a residual add, or the
    per-channel scale of squeeze-excitation (channel j of the input times the j-th scale). The scale of a
    removed channel varies with the input: the constancy check of removed channels then keeps it. A
    parameter with one value per channel (ConvNeXt's layer scale) is sliced with the channels."""
    shape = _shape(node)
    params = [a for a in node.args if isinstance(a, fx.Node) and _channel_parameter(a, shape)]
    if len(params) == 1 and len(node.args) == 2 and params[0].target not in analysis.scales:
        other = next(a for a in node.args if a is not params[0])
        if isinstance(other, fx.Node) and other in chans and shape is not None and len(chans[other]) == shape[1] \
                and _shape(other) == shape:
            p_shape = _shape(params[0]) or ()
            analysis.scales[cast(str, params[0].target)] = (node, len(p_shape) - (len(shape) - 1))
            chans[node] = chans[other]
            return
    tensors = [a for a in node.args if isinstance(a, fx.Node) and a in chans]
    if not tensors or shape is None or any(len(chans[a]) != shape[1] or not _same_channels(_shape(a), shape)
                                           for a in tensors):
        unknown(node)  # broadcasting over channels, or an operand we know nothing of
        return
    if any(isinstance(a, fx.Node) and a not in chans for a in node.args):
        unknown(node)
        return
    base = chans[tensors[0]]
    for other in tensors[1:]:
        for a, b in zip(base, chans[other]):
            el.union(a, b)
    chans[node] = base


def _channel_parameter(node: fx.Node, out: tuple[int, ...] | None) -> bool:
    """A parameter (get_attr) that broadcasts one value per channel over an (N, C, ...) output: (C, 1, 1)."""
    shape = _shape(node)
    if node.op != "get_attr" or shape is None or out is None or len(out) < 2 or len(shape) > len(out) - 1:
        return False
    padded = (1,) * (len(out) - len(shape)) + shape
    return padded[1] == out[1] and all(s == 1 for i, s in enumerate(padded) if i != 1)


def _flatten_dim(node: fx.Node) -> int:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return int(cast(int, start)) if end == -1 else -1  # fx arguments are untyped


def _is_flatten(node: fx.Node, source: fx.Node) -> bool:
    shape, src = _shape(node), _shape(source)
    if shape is None or src is None or len(shape) != 2 or len(src) < 2 or shape[0] != src[0]:
        return False
    total = 1
    for s in src[1:]:
        total *= s
    return shape[1] == total


def _channel_pad(node: fx.Node) -> tuple[int, int] | None:
    """(before, after) zero channels that F.pad adds to a 4-D input (option-A shortcuts), or None."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    src = node.args[0]
    shape = _shape(src) if isinstance(src, fx.Node) else None
    if mode != "constant" or shape is None or len(shape) != 4 or not isinstance(pad, (tuple, list)):
        return None
    pad = list(pad) + [0] * (8 - len(pad))
    if pad[6] or pad[7] or pad[4] < 0 or pad[5] < 0:
        return None
    return int(pad[4]), int(pad[5])


def _keeps_channels(node: fx.Node) -> bool:
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    return all(isinstance(i, slice) and i == slice(None) for i in index[:2])


def _cat_dim(node: fx.Node) -> int:
    return int(cast(int, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)))


# -- decisions --------------------------------------------------------------------------------------
def _groups(el: _Elements) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in range(len(el.parent)):
        out.setdefault(el.find(e), []).append(e)
    return out


def _decide(el: _Elements, extra_pins: set[int]) -> set[int]:
    """Roots of the kept groups."""
    kept = set()
    for root, members in _groups(el).items():
        pinned = root in extra_pins or any(el.pinned[e] for e in members)
        alive = any(el.alive[e] for e in members)
        read = any(el.read[e] for e in members)
        if pinned or (alive and read):
            kept.add(root)
    return kept


def _kept_index(el: _Elements, elements: list[int], kept: set[int]) -> list[int]:
    return [i for i, e in enumerate(elements) if el.find(e) in kept]


# -- the public entry -------------------------------------------------------------------------------
@dataclass
class ForcedKeep:
    """Units a layer keeps although its mask prunes them (ties of a residual addition or a shared input)."""
    layer: str
    filters: int
    channels: int
    params: int


@dataclass
class SlimReport:
    dense_params: int
    slim_params: int
    dense_macs: int
    slim_macs: int
    forced: list[ForcedKeep] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)  # layers that took the constant of removed channels

    def lines(self) -> list[str]:
        out = [f"slimmed: {self.slim_params:,} parameters (dense {self.dense_params:,}, "
               f"{self.slim_params / max(1, self.dense_params):.1%}); {self.slim_macs:,} MACs per sample "
               f"(dense {self.dense_macs:,}, {self.slim_macs / max(1, self.dense_macs):.1%})"]
        for f in self.forced:
            what = " and ".join(x for x in (f"{f.filters} filter(s)" * bool(f.filters),
                                            f"{f.channels} input channel(s)" * bool(f.channels)) if x)
            out.append(f"{f.layer}: keeps {what} its mask prunes, tied by a residual addition or read by another "
                       f"layer (+{f.params:,} parameters)")
        if self.forced:
            out.append(f"residual ties and shared inputs cost {sum(f.params for f in self.forced):,} parameters in all")
        return out


def structured_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.mask.detach().clone() for name, layer in masked_layers(model).items()}


def slim(model: nn.Module, *, example: torch.Tensor, check_inputs: int = 2) -> tuple[fx.GraphModule, SlimReport]:
    """A physically smaller plain twin of the masked ``model`` (eval mode) and what it cost.

    example: one input batch (shape and dtype of the real inputs; its values do not matter).
    Raises SlimError when the model has no masked layer or fx cannot trace it.
    """
    layers = masked_layers(model)
    if not layers:
        raise SlimError("the model has no masked layers: there is nothing to slim")
    masks = structured_masks(model)
    plain = to_dense(copy.deepcopy(model)).eval()
    gm = _trace(plain)
    probe = _probe_inputs(example, check_inputs)
    ShapeProp(gm).propagate(probe[:1])
    analysis = _analyse(gm, masks)
    el = analysis.elements
    pins: set[int] = set()
    kept = _decide(el, pins)
    for _ in range(len(el.parent) + 1):  # each round pins at least one more group
        kept = _decide(el, pins)
        more = (_empty_layer_pins(gm, analysis, kept) or _balance_pins(gm, analysis, kept)
                or _nonconstant_pins(gm, analysis, kept, probe))
        if not more:
            break
        pins |= more
    slim_gm, report = _rewrite(gm, analysis, kept, masks, probe)  # export_model checks the written file
    report.dense_params = sum(p.numel() for p in plain.parameters())
    report.slim_params = sum(p.numel() for p in slim_gm.parameters())
    report.dense_macs = count_macs(plain, probe[:1])
    report.slim_macs = count_macs(slim_gm, probe[:1])
    return slim_gm, report


class _Tracer(fx.Tracer):
    """Channel LayerNorms (ConvNeXt's LayerNorm2d, the masked twin) are single calls, not traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return norm_channel_dim(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _trace(plain: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(plain, _Tracer().trace(plain), plain.__class__.__name__)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise SlimError(f"torch.fx cannot trace the model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def _probe_inputs(example: torch.Tensor, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = (max(2, n),) + tuple(example.shape[1:])
    return torch.randn(shape, generator=gen, dtype=example.dtype).to(example.device)


def _empty_layer_pins(gm: fx.GraphModule, a: _Analysis, kept: set[int]) -> set[int]:
    """A layer cannot lose all its inputs or outputs: keep the group of its first unit then."""
    el, pins = a.elements, set()
    for node in list(a.convs.values()) + list(a.linears.values()) + list(a.norms.values()):
        lists = [a.channels[node.args[0]]] if isinstance(node.args[0], fx.Node) else []
        if node in a.channels and node not in a.linears.values():
            lists.append(a.channels[node])
        for elements in lists:
            if elements and not _kept_index(el, elements, kept):
                pins.add(el.find(elements[0]))
    return pins


def _balance_pins(gm: fx.GraphModule, a: _Analysis, kept: set[int]) -> set[int]:
    """A grouped conv's slimmed twin has as many channels in every group (inputs and outputs): in a group
    that keeps fewer than the most any group keeps, keep its first removed channels too."""
    el, pins = a.elements, set[int]()
    for name, node in a.convs.items():
        conv = gm.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        if conv.groups == 1 or one_to_one(conv):
            continue
        for elements in (a.channels[cast(fx.Node, node.args[0])], a.channels[node]):
            size = len(elements) // conv.groups
            blocks = [elements[g * size:(g + 1) * size] for g in range(conv.groups)]
            most = max(len(_kept_index(el, block, kept)) for block in blocks)
            for block in blocks:
                removed = [e for e in block if el.find(e) not in kept]
                pins.update(el.find(e) for e in removed[:most - (size - len(removed))])
    return pins


def _captured_inputs(gm: fx.GraphModule, names: Iterable[str], probe: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda mod, inp, n=n: seen.__setitem__(n, inp[0].detach())) for n in names]
    try:
        with torch.no_grad():
            gm(probe)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _nonconstant_pins(gm: fx.GraphModule, a: _Analysis, kept: set[int], probe: torch.Tensor) -> set[int]:
    """Removed channels must be input-independent and, before a conv, the same at every position;
    any that is not (an op this analysis took for per-channel is not) is kept instead."""
    el, pins = a.elements, set()
    consumers = {**a.convs, **a.linears, **a.pointwise}
    inputs = _captured_inputs(gm, consumers, probe)
    for name, node in consumers.items():
        if name in a.convs and one_to_one(cast(nn.Conv2d, gm.get_submodule(name))):
            continue  # a removed input channel of a depthwise conv feeds only its own, removed, output
        elements = a.channels[cast(fx.Node, node.args[0])]
        x = inputs[name].movedim(-1, 1) if name in a.pointwise else inputs[name]  # channels-last: dim -1
        layer = gm.get_submodule(name)
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        dense = _dense_mask(weight.detach(), getattr(layer, "groups", 1))
        reads = dense.transpose(0, 1).flatten(1).ne(0).any(1)  # a zero column adds nothing
        for i, e in enumerate(elements):
            if el.find(e) in kept or not bool(reads[i]):
                continue
            ch = x[:, i]
            ref = ch[:1].flatten()[:1] if name in a.convs or name in a.pointwise else ch[:1]
            if not torch.allclose(ch, ref.expand_as(ch), rtol=1e-6, atol=1e-6 * (1 + float(ch.abs().max()))):
                pins.add(el.find(e))
    return pins


def _rewrite(gm: fx.GraphModule, a: _Analysis, kept: set[int], masks: dict[str, torch.Tensor],
             probe: torch.Tensor) -> tuple[fx.GraphModule, SlimReport]:
    el = a.elements
    out = copy.deepcopy(gm)
    # deepcopy keeps node order; map analysis nodes to the copy's by name
    by_name = {n.name: n for n in out.graph.nodes}
    report = SlimReport(0, 0, 0, 0)
    inputs = _captured_inputs(gm, list(a.convs) + list(a.linears) + list(a.pointwise), probe)

    def idx(node: fx.Node) -> list[int]:
        return _kept_index(el, a.channels[node], kept)

    for name, node in a.convs.items():
        conv = gm.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        src = node.args[0]
        assert isinstance(src, fx.Node)
        cin, cout = idx(src), idx(node)
        if one_to_one(conv):
            _rewrite_depthwise(out, name, conv, cout, masks.get(name), report)
            continue
        kept_in = set(cin)
        removed = [i for i in range(conv.in_channels) if i not in kept_in]
        weight = _dense_mask(conv.weight.detach(), conv.groups)
        w = _group_blocks(weight[cout][:, cin], conv.groups)
        bias = conv.bias.detach()[cout].clone() if conv.bias is not None else None
        x = inputs[name]
        const = x[0, removed].flatten(1)[:, 0] if removed else x.new_zeros(0)
        fold = torch.einsum("ocij,c->oij", weight[cout][:, removed], const) if removed else None
        args: dict[str, Any] = dict(in_channels=len(cin), out_channels=len(cout), kernel_size=conv.kernel_size,
                                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                    groups=conv.groups,
                                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        new: nn.Conv2d
        if fold is not None and bool(fold.any()):
            report.folded.append(name)
            pads = conv.padding == "same" if isinstance(conv.padding, str) else any(conv.padding)
            if pads and conv.padding_mode == "zeros":
                new = FoldedConv2d(**args, bias=bias is not None, border=fold.unsqueeze(1).clone())
            else:  # no padding, or a padding that repeats the constant: it is a bias
                bias = (bias if bias is not None else w.new_zeros(len(cout))) + fold.sum((1, 2))
                new = nn.Conv2d(**args, bias=True)
        else:
            new = nn.Conv2d(**args, bias=bias is not None)
        with torch.no_grad():
            new.weight.copy_(w)
            if bias is not None:
                assert new.bias is not None
                new.bias.copy_(bias)
        _set_module(out, name, new)
        mask = masks.get(name)
        if mask is not None:
            dense = _dense_mask(mask, conv.groups)
            rows, cols = dense.flatten(1).any(1), dense.transpose(0, 1).flatten(1).any(1)
            dead_rows = int((~rows[cout]).sum())
            dead_cols = int((~cols[cin]).sum())
            held = int((~_group_blocks(dense[cout][:, cin], conv.groups)).sum())
            if dead_rows or dead_cols:
                report.forced.append(ForcedKeep(name, dead_rows, dead_cols, held))
    for name, node in a.norms.items():
        bn = gm.get_submodule(name)
        assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d))
        keep = idx(node)
        new_bn = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
        state = {k: (v[keep] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
        new_bn.load_state_dict(state)
        _set_module(out, name, new_bn.eval())
    for name, node in a.pointwise.items():
        _rewrite_pointwise(out, name, cast(nn.Linear, gm.get_submodule(name)), rows=idx(node),
                           cols=idx(cast(fx.Node, node.args[0])), x=inputs[name], mask=masks.get(name), report=report)
    for name, node in a.channel_norms.items():
        norm = gm.get_submodule(name)
        assert isinstance(norm, MaskedLayerNorm)
        keep = idx(node)
        sub = norm.channel_mask[keep]
        _set_module(out, name, norm.plain(keep) if bool(sub.all()) else norm.sliced(keep))
    for target, (node, axis) in a.scales.items():
        owner, _, attr = target.rpartition(".")
        holder = out.get_submodule(owner) if owner else out
        value = getattr(holder, attr)
        sliced = value.detach().index_select(axis, torch.tensor(idx(node), dtype=torch.long, device=value.device))
        setattr(holder, attr, nn.Parameter(sliced.clone(), requires_grad=value.requires_grad)
                if isinstance(value, nn.Parameter) else sliced.clone())
    for name, node in a.linears.items():
        lin = gm.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        src = node.args[0]
        assert isinstance(src, fx.Node)
        keep = idx(src)
        kept_in = set(keep)
        removed = [i for i in range(lin.in_features) if i not in kept_in]
        weight = lin.weight.detach()
        bias = lin.bias.detach().clone() if lin.bias is not None else None
        if removed:
            contribution = weight[:, removed] @ inputs[name][0, removed]
            if bool(contribution.any()):
                report.folded.append(name)
                bias = (bias if bias is not None else weight.new_zeros(lin.out_features)) + contribution
        new_lin = nn.Linear(len(keep), lin.out_features, bias=bias is not None, device=weight.device,
                            dtype=weight.dtype)
        with torch.no_grad():
            new_lin.weight.copy_(weight[:, keep])
            if bias is not None:
                assert new_lin.bias is not None
                new_lin.bias.copy_(bias)
        _set_module(out, name, new_lin)
    for node in a.pads:
        elements = a.channels[node]
        src = node.args[0]
        assert isinstance(src, fx.Node)
        before, after = _channel_pad(node)  # type: ignore[misc]  # only channel pads are recorded
        kept_slots = set(idx(node))
        new_before = sum(1 for i in range(before) if i in kept_slots)
        new_after = sum(1 for i in range(len(elements) - after, len(elements)) if i in kept_slots)
        target = by_name[node.name]
        pad = list(cast(list, target.args[1] if len(target.args) > 1 else target.kwargs["pad"]))
        pad = pad + [0] * (6 - len(pad))
        pad[4], pad[5] = new_before, new_after
        if len(target.args) > 1:
            target.args = (target.args[0], tuple(pad), *target.args[2:])
        else:
            target.kwargs = {**target.kwargs, "pad": tuple(pad)}
    out.recompile()
    return out.eval(), report


def _group_blocks(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of ``_dense_mask`` on a slimmed block-diagonal (out, in, kh, kw) tensor whose groups keep
    equal counts (``_balance_pins``): the (out, in / groups, kh, kw) weight of the grouped conv."""
    if groups == 1:
        return dense.clone()
    out, cin = dense.shape[:2]
    per_out, per_in = out // groups, cin // groups
    assert per_out * groups == out and per_in * groups == cin, "unbalanced groups survived _balance_pins"
    return torch.cat([dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] for g in range(groups)])


def _rewrite_depthwise(out: fx.GraphModule, name: str, conv: nn.Conv2d, keep: list[int], mask: torch.Tensor | None,
                       report: SlimReport) -> None:
    """A depthwise conv keeps the filters of its kept channels (its input and output channels are tied, so
    nothing removed is read: no constant to fold)."""
    weight = conv.weight.detach()
    new = nn.Conv2d(len(keep), len(keep), conv.kernel_size, stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                    dilation=conv.dilation, groups=len(keep), bias=conv.bias is not None,  # type: ignore[arg-type]
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight[keep])
        if conv.bias is not None:
            assert new.bias is not None
            new.bias.copy_(conv.bias.detach()[keep])
    _set_module(out, name, new)
    if mask is not None:
        dead = ~mask.flatten(1).any(1)[keep]
        if bool(dead.any()):
            report.forced.append(ForcedKeep(name, int(dead.sum()), 0, int((~mask[keep]).sum())))


def _rewrite_pointwise(out: fx.GraphModule, name: str, lin: nn.Linear, *, rows: list[int], cols: list[int],
                       x: torch.Tensor, mask: torch.Tensor | None, report: SlimReport) -> None:
    """A linear layer over the channels of a channels-last map keeps its kept rows and columns; a removed
    column that is read holds a constant (checked by ``_nonconstant_pins``), folded into the bias."""
    weight = lin.weight.detach()
    kept_in = set(cols)
    removed = [i for i in range(lin.in_features) if i not in kept_in]
    bias = lin.bias.detach()[rows].clone() if lin.bias is not None else None
    if removed:
        const = x.reshape(-1, x.shape[-1])[0, removed]
        contribution = weight[rows][:, removed] @ const
        if bool(contribution.any()):
            report.folded.append(name)
            bias = (bias if bias is not None else weight.new_zeros(len(rows))) + contribution
    new = nn.Linear(len(cols), len(rows), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight[rows][:, cols])
        if bias is not None:
            assert new.bias is not None
            new.bias.copy_(bias)
    _set_module(out, name, new)
    if mask is not None:
        dead_rows, dead_cols = int((~mask.any(1)[rows]).sum()), int((~mask.any(0)[cols]).sum())
        if dead_rows or dead_cols:
            report.forced.append(ForcedKeep(name, dead_rows, dead_cols, int((~mask[rows][:, cols]).sum())))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers for one input batch, per sample (the project's
    one counter, ``pruning.cost``)."""
    return model_cost(model, example=x[:1]).flops_total


def coupled_groups(model: nn.Module, *, example: torch.Tensor, granularity: str = "filter"
                   ) -> list[list[tuple[str, int]]]:
    """``dependency_groups`` for ``--coupled``: a model fx cannot trace is one line naming the flag."""
    try:
        return dependency_groups(model, example=example, granularity=granularity)
    except SlimError as exc:
        raise UserError(f"--coupled needs the channel dependencies of the model, but {exc}; drop --coupled") from None


def dependency_groups(model: nn.Module, *, example: torch.Tensor,
                      granularity: str = "filter") -> list[list[tuple[str, int]]]:
    """The filters of ``model``'s convolutions that slimming can only remove together: one list of
    (conv name, filter index) per group of tied channels (a residual stream's channel, a depthwise conv's
    channel with its producer's filter, a squeeze-excitation scale with its channel, the j-th channel of
    every group of a grouped conv, as Torch-Pruning ties them), from the same channel analysis as
    ``slim``. Every filter of an analysed conv is in exactly one group (most alone); convs the analysis
    does not see (called twice) are left out. ``granularity="channel"``: the (layer name, input channel)
    that read each group's channel instead (a channel is removed once no layer reads it). Channel
    LayerNorms of a group are in it as (norm name, channel).
    Raises SlimError when torch.fx cannot trace the model."""
    if granularity not in ("filter", "channel"):
        raise ValueError(f"dependency groups are of filters or channels, not {granularity!r}")
    plain = to_dense(copy.deepcopy(model)).eval()
    gm = _trace(plain)
    ShapeProp(gm).propagate(_probe_inputs(example, 1)[:1])
    el = _analyse(gm, {}, coupling=True).elements
    groups: dict[int, list[tuple[str, int]]] = {}
    if granularity == "filter":
        for e, producer in enumerate(el.producer):
            if producer is not None:
                groups.setdefault(el.find(e), []).append(producer)
    else:
        for e, readers in el.readers.items():
            groups.setdefault(el.find(e), []).extend(readers)
    for e, members in el.norm_members.items():  # channel LayerNorms follow their channel's group
        if el.find(e) in groups:
            groups[el.find(e)].extend(members)
    return list(groups.values())
