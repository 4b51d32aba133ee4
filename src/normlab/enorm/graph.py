"""Rescaling groups of a ReLU network, found by tracing it with torch.fx.

A *rescaling variable* is one hidden channel whose values may be multiplied by any d > 0 without
changing the network's function, provided that every parameter writing the channel (the rows of
the layer producing it, its bias, the scale and shift of a norm layer) is multiplied by d and
every parameter reading it (the matching input columns of the next layers) is divided by d.
This holds because every operation between them is channel-wise and positively 1-homogeneous:
f(d * x) = d * f(x) for ReLU, LeakyReLU, PReLU, max / average / adaptive / LP pooling, zero
padding, dropout, identity, interpolation, flattening and concatenation.

Channels added together (residual streams) must share their factor: they are merged with a
union-find. Channels that reach something ENorm cannot rescale (the network input or output,
the input of a normalization layer, a constant or buffer added to them) are frozen (d = 1).
A normalization layer's output channels form a new group written by its affine weight and
bias (torch's batch / instance / group / layer norms, normlab's batch renormalization, and
classes declared with :func:`register_norm_layer`). Layers are recognised only if they keep
their class's forward: a subclass that overrides it (a weight-standardised conv) is traced
into, and refused if its body is not homogeneous.
An operation on free channels that is not positively homogeneous (GELU, sigmoid, tanh,
softmax, a product of two activations, an unknown module) stops the trace with an
:class:`ENormGraphError` naming it, unless it is listed in ``exclude``; an excluded module or
operation is an opaque cut, its boundary channels are frozen and its parameters untouched.

Every parameter ENorm touches is described by a :class:`ParamSlot`: its tensor viewed as
``(G, R, C)`` (G independent blocks of R output rows by C input columns: G = conv groups, one
for Linear layers, biases and norm affines) with the rescaling variable of each row and of
each column. Entry (g, i, j) of the parameter is multiplied by ``d[row[g, i]] / d[col[g, j]]``.

Variables are numbered 0 .. N-1, block by block in the trace's topological order; index N is
the frozen slot whose factor is always one. A *block* (a :class:`RescalingGroup`) is a set of
variables created by layer outputs that were tied together (one layer's output, or a whole
residual stream); blocks are the units of the sequential (Gauss-Seidel) sweep.

References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks",
ICLR 2019, arXiv:1902.10416 (sections 3 and 4 on the rescaling symmetry and on ResNets).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..nn import layer_registry

__all__ = [
    "ENormGraphError",
    "ParamSlot",
    "RescalingGroup",
    "RescalingPlan",
    "register_norm_layer",
    "trace_plan",
]

FROZEN = 0  # union-find id of the frozen class (factor one)


class ENormGraphError(UserError):
    """The model contains an operation ENorm cannot rescale through, or cannot be traced."""


@dataclass(frozen=True)
class RescalingGroup:
    """One block of rescaling variables (a hidden layer, or a residual stream).

    ``producers`` are the parameters writing its channels (rows scaled by d), ``consumers`` the
    parameters reading them (columns scaled by 1/d); names are ``model.named_parameters()``
    names. ``start:stop`` is the block's slice of the variable vector.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    start: int
    stop: int


@dataclass
class ParamSlot:
    """A parameter touched by ENorm, viewed as (G, R, C) with a variable per row and column.

    ``rows`` / ``cols`` hold variable indices (the frozen slot for frozen channels) as LongTensors
    of shape (G * R,) and (G * C,), or None when every row (column) is frozen. ``depth`` is the
    layer depth used by the asymmetric coefficient c; ``balanced`` says whether the slot's
    energy enters the balance (weights and norm scales always; biases and norm shifts only
    with ``include_bias``).
    """

    name: str
    param: torch.Tensor
    shape3: tuple[int, int, int]
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    depth: int
    kind: str  # "weight", "bias", "norm_weight" or "norm_bias"
    module: str

    @property
    def is_bias_like(self) -> bool:
        return self.kind in ("bias", "norm_bias")


@dataclass
class RescalingPlan:
    """Everything ENorm precomputes from the graph: the slots, the blocks, the variable count."""

    slots: list[ParamSlot]
    groups: list[RescalingGroup]
    num_variables: int


# ----------------------------------------------------------------------------------------------
# Union-find over channel ids
# ----------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FROZEN]

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        # The frozen class always stays the root so that "is frozen" is find(x) == FROZEN.
        if rb == FROZEN:
            ra, rb = rb, ra
        self.parent[rb] = ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.union(x, y)

    def freeze(self, ids: np.ndarray) -> None:
        for x in ids.tolist():
            self.union(FROZEN, x)


# ----------------------------------------------------------------------------------------------
# What the walker knows about a traced value
# ----------------------------------------------------------------------------------------------


@dataclass
class _Channels:
    """A traced tensor whose channels carry rescaling variables.

    ``channel_dim`` is 1 for channels-first tensors (conv outputs, pooled maps) and -1 for
    channels-last ones (Linear outputs). ``rank`` is the tensor rank when known. ``flatten`` is
    set after a flatten(1) whose expansion is resolved by the consuming Linear layer:
    "interleave" (channels-first: feature c * S + s) or "tile" (channels-last: feature l * C + c).
    """

    ids: np.ndarray
    channel_dim: int
    rank: int | None
    flatten: str | None = None

    def with_(self, **kw) -> _Channels:
        values = dict(
            ids=self.ids, channel_dim=self.channel_dim, rank=self.rank, flatten=self.flatten
        )
        values.update(kw)
        return _Channels(**values)


@dataclass
class _SlotRecord:
    name: str
    param: torch.Tensor
    shape3: tuple[int, int, int]
    rows: np.ndarray | None  # union-find ids, shape (G * R,)
    cols: np.ndarray | None  # union-find ids, shape (G * C,)
    depth: int
    kind: str
    module: str


@dataclass
class _Origin:
    """Fresh channel ids created by one layer output (a candidate block)."""

    label: str
    ids: np.ndarray


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Norm layers and channel-wise pass-through ops (ReLU, pooling, padding, dropout, flatten, ...)
# come from the registry shared with the scale-invariance probe: normlab.nn.layer_registry.
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SCALAR_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_REDUCE_NAMES = {"mean", "sum", "amax"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "type", "get_device"}


def register_norm_layer(cls: type) -> None:
    """Declare ``cls`` a normalization layer with a per-channel affine output.

    Its instances are not traced into. ENorm leaves their input channels unscaled and rescales
    their output channels through ``weight`` and ``bias`` (shape (C,) or starting with C), which
    is exact whenever the layer computes ``y = weight * f(x) + bias`` channel by channel, as
    batch, group, instance, layer and batch re-normalization do. The declaration goes to the
    shared :mod:`normlab.nn.layer_registry`, so the scale-invariance probe knows the layer too
    (use :func:`normlab.nn.layer_registry.register_norm_layer` to also say what it normalizes).
    """
    layer_registry.register_norm_layer(cls)


def _is_plain(module: nn.Module, classes) -> bool:
    """An instance of one of ``classes`` that keeps that class's forward.

    A subclass overriding forward (say, a weight-standardised convolution) is not the layer
    ENorm knows: it is traced into instead, and refused if its body is not homogeneous.
    """
    for cls in classes:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


def _norm_layer(module: nn.Module) -> layer_registry.NormLayer | None:
    """The registry entry of a norm layer that keeps its registered class's forward."""
    return layer_registry.find_norm_layer(module, same_forward=True)


def _is_leaf(module: nn.Module) -> bool:
    """Layers ENorm reads as a whole: Linear, Conv, norm layers and pass-through modules."""
    return (
        _is_plain(module, (nn.Linear, *_CONV))
        or _norm_layer(module) is not None
        or layer_registry.find_pass_through(module) is not None
    )


def _callable_name(target) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps excluded modules opaque and records each node's module scope."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self._leaves = leaves
        self.current_scope = ""
        self.failed_scope: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaves or _is_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self.current_scope
        self.current_scope = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:
                self.failed_scope = self.current_scope
            raise
        finally:
            self.current_scope = outer

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["enorm_scope"] = self.current_scope
        return node


def _trace(model: nn.Module, leaves: set[str]) -> fx.Graph:
    tracer = _Tracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 -- re-raised with the module being traced named
        where = tracer.failed_scope
        if where:
            fix = (
                f"pass exclude=['{where}'] to treat that module as an opaque block (its "
                "boundary channels are then left unscaled)"
            )
        else:
            where, fix = "its own forward", "make the top-level forward traceable"
        raise ENormGraphError(
            f"ENorm could not trace {type(model).__name__} with torch.fx in module '{where}': "
            f"{type(exc).__name__}: {exc}. Data-dependent control flow cannot be traced; {fix}."
        ) from exc


class _Walker:
    """Walks a traced graph and assigns union-find channel ids to every tensor with free channels."""

    def __init__(self, root: nn.Module, exclude: set[str], names: dict[int, str]):
        self.root = root
        self.exclude = exclude
        self.names = names  # id(parameter) -> name in root.named_parameters()
        self.uf = _UnionFind()
        self.values: dict[fx.Node, _Channels | None] = {}
        self.depths: dict[fx.Node, int] = {}
        self.slots: dict[str, _SlotRecord] = {}
        self.origins: list[_Origin] = []
        self.module_outputs: dict[str, tuple[_Channels | None, int]] = {}  # shared modules
        self.used_excludes: set[str] = set()

    # --- helpers ------------------------------------------------------------------------------

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            return f"module '{node.target}' ({type(module).__name__})"
        what = node.target if isinstance(node.target, str) else _callable_name(node.target)
        scope = node.meta.get("enorm_scope") or ""
        inside = f" inside module '{scope}'" if scope else ""
        return f"operation '{node.name}' ({what}){inside}"

    def fail(self, node: fx.Node, why: str) -> None:
        raise ENormGraphError(
            f"ENorm cannot rescale through {self.describe(node)}: {why}. Pass "
            f"exclude=['{node.target if node.op == 'call_module' else node.name}'] to leave the "
            "channels around it unscaled."
        )

    def free_inputs(self, node: fx.Node) -> list[_Channels]:
        found: list[_Channels] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.values.get(n)))
        return [v for v in found if v is not None]

    def input_depth(self, node: fx.Node) -> int:
        depths = [-1]
        fx.node.map_arg((node.args, node.kwargs), lambda n: depths.append(self.depths.get(n, -1)))
        return max(depths)

    def freeze(self, value: _Channels | None) -> None:
        if value is not None:
            self.uf.freeze(value.ids)

    def freeze_inputs(self, node: fx.Node) -> None:
        for value in self.free_inputs(node):
            self.freeze(value)

    def new_channels(self, n: int, label: str, channel_dim: int, rank: int | None) -> _Channels:
        ids = self.uf.new(n)
        self.origins.append(_Origin(label, ids))
        return _Channels(ids, channel_dim, rank)

    def record(
        self,
        param: torch.Tensor | None,
        shape3: tuple[int, int, int],
        rows: np.ndarray | None,
        cols: np.ndarray | None,
        depth: int,
        kind: str,
        module: str,
    ) -> None:
        if param is None:
            return
        name = self.names[id(param)]
        old = self.slots.get(name)
        if old is None:
            self.slots[name] = _SlotRecord(name, param, shape3, rows, cols, depth, kind, module)
            return
        # A shared module called again: its rows (columns) carry the same factors at every call.
        for new_ids, old_ids, attr in ((rows, old.rows, "rows"), (cols, old.cols, "cols")):
            if new_ids is None and old_ids is None:
                continue
            if new_ids is None:
                self.uf.freeze(old_ids)
            elif old_ids is None:
                self.uf.freeze(new_ids)
                setattr(old, attr, new_ids)
            else:
                self.uf.union_arrays(new_ids, old_ids)
        old.depth = max(old.depth, depth)

    def require_channels_first(self, node: fx.Node, x: _Channels) -> None:
        if x.channel_dim != 1 or x.flatten is not None:
            self.fail(
                node,
                "it acts on the spatial dimensions of a channels-first tensor, but its "
                "input is a Linear layer's output or a flattened tensor",
            )

    @staticmethod
    def arg(node: fx.Node, index: int, name: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # --- the walk -----------------------------------------------------------------------------

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "placeholder" or node.op == "get_attr":
                self.values[node] = None
                self.depths[node] = -1
                continue
            if node.op == "output":
                self.freeze_inputs(node)  # the network's outputs cannot be rescaled
                continue
            self.depths[node] = self.input_depth(node)
            if node.op == "call_module" and node.target in self.exclude:
                self.used_excludes.add(node.target)
                self.freeze_inputs(node)
                self.values[node] = None
                continue
            if node.name in self.exclude:
                self.used_excludes.add(node.name)
                self.freeze_inputs(node)
                self.values[node] = None
                continue
            if not self.free_inputs(node):
                # Nothing rescalable flows in: any operation is fine (input preprocessing, shape
                # arithmetic, layers on frozen channels); parametrised layers still open groups.
                if node.op == "call_module":
                    self.values[node] = self.visit_module(node)
                else:
                    self.values[node] = None
                continue
            if node.op == "call_module":
                self.values[node] = self.visit_module(node)
            elif node.op == "call_function":
                self.values[node] = self.visit_function(node)
            elif node.op == "call_method":
                self.values[node] = self.visit_method(node)
            else:  # pragma: no cover - fx has no other node kinds
                self.fail(node, f"unknown node kind {node.op}")

    # --- modules ------------------------------------------------------------------------------

    def visit_module(self, node: fx.Node) -> _Channels | None:
        name = node.target
        module = self.root.get_submodule(name)
        if len(node.args) != 1 or node.kwargs:
            if self.free_inputs(node):
                self.fail(node, "ENorm only follows modules called with a single tensor")
            return None
        x = self.values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        depth = self.depths[node]

        if _is_plain(module, (nn.Linear,)):
            return self.visit_linear(node, module, x, depth)
        if _is_plain(module, _CONV):
            return self.visit_conv(node, module, x, depth)
        norm = _norm_layer(module)
        if norm is not None:
            return self.visit_norm(node, module, norm, x, depth)
        if x is None:
            return None  # any layer on frozen input: nothing to follow, parameters untouched
        op = layer_registry.find_pass_through(module)
        if op is None:
            self.fail(
                node,
                f"{type(module).__name__} is not a channel-wise positively homogeneous "
                "operation ENorm knows",
            )
        if op.layout == "spatial":
            self.require_channels_first(node, x)
        refusal = op.refusal(module)
        if refusal is not None:
            self.fail(node, refusal)
        if op.layout == "flatten":
            return self.flatten(node, x, module.start_dim, module.end_dim)
        return x

    def linear_columns(self, node: fx.Node, x: _Channels | None, in_features: int):
        if x is None:
            return None
        n = len(x.ids)
        if x.flatten is None:
            if x.channel_dim == 1 and x.rank != 2:
                self.fail(
                    node,
                    "a Linear layer applied to a channels-first tensor mixes "
                    "positions, not channels; flatten it first",
                )
            if n != in_features:
                self.fail(node, f"it reads {in_features} features but ENorm tracked {n} channels")
            return x.ids
        if in_features % n:
            self.fail(
                node,
                f"it reads {in_features} flattened features, not a multiple of the "
                f"{n} channels ENorm tracked",
            )
        positions = in_features // n
        if x.flatten == "interleave":  # (N, C, *spatial) -> feature c * S + s
            return np.repeat(x.ids, positions)
        return np.tile(x.ids, positions)  # (N, *positions, C) -> feature s * C + c

    def visit_linear(self, node, module: nn.Linear, x, depth) -> _Channels:
        depth += 1
        self.depths[node] = depth
        cols = self.linear_columns(node, x, module.in_features)
        shared = self.module_outputs.get(node.target)
        out = self.new_channels(
            module.out_features, node.target, -1, x.rank if x is not None else None
        )
        if shared is not None and shared[0] is not None:
            self.uf.union_arrays(out.ids, shared[0].ids)
        self.module_outputs[node.target] = (out, depth)
        n_out, n_in = module.weight.shape
        self.record(module.weight, (1, n_out, n_in), out.ids, cols, depth, "weight", node.target)
        self.record(module.bias, (1, n_out, 1), out.ids, None, depth, "bias", node.target)
        return out

    def visit_conv(self, node, module: nn.Conv2d, x, depth) -> _Channels:
        depth += 1
        self.depths[node] = depth
        groups = module.groups
        c_out, c_in_g = module.weight.shape[:2]
        taps = int(np.prod(module.weight.shape[2:]))
        cols = None
        if x is not None:
            self.require_channels_first(node, x)
            if len(x.ids) != module.in_channels:
                self.fail(
                    node, f"it reads {module.in_channels} channels but ENorm tracked {len(x.ids)}"
                )
            # Grouped conv: input channel q * c_in_g + j feeds only the outputs of group q.
            cols = np.repeat(x.ids.reshape(groups, c_in_g), taps, axis=1).reshape(-1)
        n_spatial = module.weight.dim() - 2
        out = self.new_channels(c_out, node.target, 1, n_spatial + 2)
        shared = self.module_outputs.get(node.target)
        if shared is not None and shared[0] is not None:
            self.uf.union_arrays(out.ids, shared[0].ids)
        self.module_outputs[node.target] = (out, depth)
        shape3 = (groups, c_out // groups, c_in_g * taps)
        self.record(module.weight, shape3, out.ids, cols, depth, "weight", node.target)
        self.record(module.bias, (1, c_out, 1), out.ids, None, depth, "bias", node.target)
        return out

    def visit_norm(
        self, node, module: nn.Module, norm: layer_registry.NormLayer, x, depth
    ) -> _Channels | None:
        # The input of a normalization layer is a cut: per-channel scaling of it is absorbed by
        # the normalization only up to eps, and running statistics would have to change. Its
        # output is a fresh group written by the per-channel affine (scale and shift), which is
        # exact in train and eval mode alike; running statistics are never touched.
        self.freeze(x)
        affine = norm.affine_params(module) + (None, None)
        weight, bias = (p if p is not None and id(p) in self.names else None for p in affine[:2])
        if weight is None and bias is None:
            return None  # no affine: the output cannot be rescaled
        rank = x.rank if x is not None else None
        channel_dim = x.channel_dim if x is not None else 1
        if norm.normalized == "layer":  # LayerNorm, RMSNorm: affine over normalized_shape
            shape = tuple(module.normalized_shape)
            if channel_dim == -1 and len(shape) == 1:
                channels, per_row = shape[0], 1
            elif channel_dim == 1 and rank is not None and len(shape) == rank - 1:
                channels, per_row = shape[0], int(np.prod(shape[1:]))
            else:
                return None  # affine not aligned with channels: output stays unscaled
        else:
            affine = weight if weight is not None else bias  # (C,) or (C, ...): channels first
            channels = affine.shape[0]
            per_row = affine.numel() // channels
        out = self.new_channels(channels, node.target, channel_dim, rank)
        shape3 = (1, channels, per_row)
        self.record(weight, shape3, out.ids, None, depth, "norm_weight", node.target)
        self.record(bias, shape3, out.ids, None, depth, "norm_bias", node.target)
        return out

    # --- functions and methods ----------------------------------------------------------------

    def node_value(self, a) -> _Channels | None:
        return self.values.get(a) if isinstance(a, fx.Node) else None

    def visit_function(self, node: fx.Node) -> _Channels | None:
        target = node.target
        x = self.node_value(node.args[0]) if node.args else None
        op = layer_registry.pass_through_function(target)
        if op is not None:
            return self.pass_through(node, op, x)
        if target in _ADD_FUNCTIONS:
            return self.add(
                node, node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            )
        if target in _SCALAR_FUNCTIONS:
            return self.scalar_product(node)
        if target in _CAT_FUNCTIONS:
            return self.cat(node)
        if target in (torch.mean, torch.sum, torch.amax):
            return self.reduce(
                node, x, self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False)
            )
        if target in (torch.clamp, torch.clamp_min):
            return self.clamp(node, x)
        if target is getattr:
            return None  # x.shape, x.dtype, ...: not a tensor
        if target is F.pad:
            self.check_only_first_free(node)
            self.require_channels_first(node, x)
            mode = self.arg(node, 2, "mode", "constant")
            value = self.arg(node, 3, "value", None)
            if mode == "constant" and value not in (None, 0, 0.0):
                self.fail(node, f"padding with the constant {value} is not positively homogeneous")
            return x
        self.fail(
            node,
            "it is not a channel-wise positively homogeneous operation ENorm knows "
            "(GELU, sigmoid, tanh, softmax, products of activations break the rescaling "
            "symmetry)",
        )
        return None

    def visit_method(self, node: fx.Node) -> _Channels | None:
        name = node.target
        x = self.node_value(node.args[0])
        if name in _SHAPE_METHODS:
            return None
        op = layer_registry.pass_through_method(name)
        if op is not None:
            return self.pass_through(node, op, x)
        if name in ("add", "add_", "sub", "sub_"):
            return self.add(
                node, node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            )
        if name in ("mul", "mul_", "div", "div_"):
            return self.scalar_product(node)
        if name in _REDUCE_NAMES:
            return self.reduce(
                node, x, self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False)
            )
        if name in ("clamp", "clamp_", "clamp_min", "clamp_min_"):
            return self.clamp(node, x)
        if name in ("squeeze", "unsqueeze"):
            return self.squeeze(node, x, name)
        self.fail(node, "it is not a channel-wise positively homogeneous operation ENorm knows")
        return None

    def pass_through(
        self, node: fx.Node, op: layer_registry.PassThrough, x: _Channels | None
    ) -> _Channels | None:
        """A registered pass-through function or tensor method (element-wise, spatial on
        channels-first tensors, flatten, view / reshape)."""
        if not op.homogeneous:
            what = node.target if isinstance(node.target, str) else _callable_name(node.target)
            self.fail(node, f"{what} is not positively homogeneous")
        if op.layout == "flatten":
            return self.flatten(
                node, x, self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1)
            )
        if op.layout == "reshape":
            return self.view(node, x)
        self.check_only_first_free(node)
        if op.layout == "spatial":
            self.require_channels_first(node, x)
            if self.arg(node, 5, "return_indices", False) is True and "max_pool" in node.name:
                self.fail(node, "pooling with return_indices is not supported")
        return x

    def check_only_first_free(self, node: fx.Node) -> None:
        rest = list(node.args[1:]) + list(node.kwargs.values())
        found: list[_Channels] = []
        fx.node.map_arg(rest, lambda n: found.append(self.values.get(n)))
        if any(v is not None for v in found):
            self.fail(node, "it combines two rescalable tensors")

    def add(self, node: fx.Node, a, b) -> _Channels | None:
        va, vb = self.node_value(a), self.node_value(b)
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, fx.Node):
            self.fail(node, "a traced alpha is not supported")
        if va is None or vb is None:
            # Free channels plus something that does not scale with them (a constant, a buffer,
            # the network input): the sum is homogeneous only with d = 1.
            self.freeze(va)
            self.freeze(vb)
            return None
        if va.flatten != vb.flatten:
            self.fail(node, "it adds a flattened and an unflattened tensor")
        if len(va.ids) == len(vb.ids):
            self.uf.union_arrays(va.ids, vb.ids)
        elif len(vb.ids) == 1 or len(va.ids) == 1:  # broadcast of one channel over all
            one, many = (vb, va) if len(vb.ids) == 1 else (va, vb)
            self.uf.union_arrays(many.ids, np.full_like(many.ids, one.ids[0]))
            return many
        else:
            self.fail(node, f"it adds tensors with {len(va.ids)} and {len(vb.ids)} channels")
        return va

    def scalar_product(self, node: fx.Node) -> _Channels | None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        va, vb = self.node_value(a), self.node_value(b)
        divide = node.target in (operator.truediv, torch.div) or node.target in ("div", "div_")
        if va is not None and vb is not None:
            self.fail(node, "a product of two rescalable tensors is homogeneous of degree two")
        if divide and vb is not None:
            self.fail(node, "dividing by a rescalable tensor is homogeneous of degree minus one")
        other = b if va is not None else a
        if isinstance(other, (int, float)):
            return va if va is not None else vb  # linear in the free operand
        self.fail(
            node,
            "it multiplies rescalable channels by a tensor (a gate or mask that "
            "ENorm cannot prove constant per channel)",
        )
        return None

    def cat(self, node: fx.Node) -> _Channels | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = self.arg(node, 1, "dim", 0)
        values = [self.node_value(t) for t in tensors]
        free = [v for v in values if v is not None]
        first = free[0]
        if any(v.channel_dim != first.channel_dim or v.flatten for v in free):
            self.fail(node, "it concatenates tensors of different layouts or flattened tensors")
        along_channels = dim == first.channel_dim or (
            first.rank is not None and dim % first.rank == first.channel_dim % first.rank
        )
        if along_channels:
            if any(v is None for v in values):
                self.fail(
                    node,
                    "it concatenates rescalable channels with channels of unknown "
                    "count (for instance the network input)",
                )
            return first.with_(ids=np.concatenate([v.ids for v in free]))
        if len(free) != len(values):  # stacked along batch or space with frozen parts
            for v in free:
                self.freeze(v)
            return None
        for v in free[1:]:
            if len(v.ids) != len(first.ids):
                self.fail(node, "concatenated tensors have different channel counts")
            self.uf.union_arrays(first.ids, v.ids)
        return first

    def flatten(self, node: fx.Node, x: _Channels | None, start: int, end: int) -> _Channels | None:
        if x is None:
            return None
        if start != 1 or end not in (-1, None) and not (x.rank is not None and end == x.rank - 1):
            self.fail(
                node,
                f"only flatten(start_dim=1) is supported, got start_dim={start}, end_dim={end}",
            )
        if x.flatten is not None:
            return x
        if x.channel_dim == 1:
            return x.with_(flatten="interleave", channel_dim=-1, rank=2)
        return x.with_(flatten="tile", rank=2)

    def view(self, node: fx.Node, x: _Channels | None) -> _Channels | None:
        shape = list(node.args[1:])
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = list(shape[0])
        # x.view(x.size(0), -1), x.view(-1, k), x.reshape(n, -1): a flatten(1).
        if len(shape) == 2 and (shape[1] == -1 or shape[0] == -1 or isinstance(shape[0], fx.Node)):
            return self.flatten(node, x, 1, -1)
        self.fail(
            node, f"reshape to {shape} is not a flatten(1); use nn.Flatten or torch.flatten(x, 1)"
        )
        return None

    def reduce(self, node: fx.Node, x: _Channels, dim, keepdim) -> _Channels:
        if dim is None:
            self.fail(node, "a reduction over all dimensions mixes channels")
        dims = [dim] if isinstance(dim, int) else list(dim)
        if x.channel_dim != 1 or x.flatten is not None:
            self.fail(node, "reductions are only followed on channels-first tensors")
        if any(d < 0 for d in dims):
            if x.rank is None:
                self.fail(node, "negative reduction dims on a tensor of unknown rank")
            dims = [d % x.rank for d in dims]
        if any(d in (0, 1) for d in dims):
            self.fail(node, "it reduces over the batch or the channel dimension")
        rank = x.rank if keepdim or x.rank is None else x.rank - len(dims)
        return x.with_(rank=rank)

    def clamp(self, node: fx.Node, x: _Channels) -> _Channels:
        low = self.arg(node, 1, "min", None)
        high = self.arg(node, 2, "max", None)
        if node.target in ("clamp_min", "clamp_min_", torch.clamp_min):
            high = None
        if low in (0, 0.0) and high is None:
            return x  # clamp(min=0) is ReLU
        self.fail(node, "only clamp(min=0) (a ReLU) is positively homogeneous")
        return x

    def squeeze(self, node: fx.Node, x: _Channels, name: str) -> _Channels:
        dim = self.arg(node, 1, "dim", None)
        if dim is None or not isinstance(dim, int) or x.channel_dim != 1 or x.flatten:
            self.fail(
                node, f"{name} is followed only with an explicit dim on channels-first tensors"
            )
        if dim < 0:
            if x.rank is None:
                self.fail(node, f"{name} with a negative dim on a tensor of unknown rank")
            dim = dim % (x.rank + (name == "unsqueeze"))
        if dim < 2:
            self.fail(node, f"{name} of the batch or channel dimension")
        delta = 1 if name == "unsqueeze" else -1
        return x.with_(rank=None if x.rank is None else x.rank + delta)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel are not traceable; their replicas are identical.
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def trace_plan(model: nn.Module, exclude: Iterable[str] = ()) -> RescalingPlan:
    """Trace ``model`` and return its rescaling plan (slots, groups, variable count).

    ``exclude`` lists module names (``model.named_modules()``) or traced operation names
    treated as opaque cuts; unknown names are a ValueError.
    """
    model = _unwrap(model)
    exclude = set(exclude)
    module_names = {name for name, _ in model.named_modules()}
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in names and names[id(param)] != name:
            raise ENormGraphError(
                f"ENorm does not support tied parameters: '{names[id(param)]}' is also "
                f"'{name}'; exclude one of their modules"
            )
        names[id(param)] = name
    graph = _trace(model, exclude & module_names)
    walker = _Walker(model, exclude, names)
    walker.run(graph)
    unknown = exclude - walker.used_excludes - module_names
    if unknown:
        raise ValueError(
            f"Invalid exclude: {sorted(unknown)} match no module or traced operation of "
            f"{type(model).__name__}"
        )
    return _compile_plan(walker)


def _compile_plan(walker: _Walker) -> RescalingPlan:
    """Resolve the union-find into contiguous variable numbers, blocks and index tensors."""
    uf = walker.uf
    records = list(walker.slots.values())

    def roots(ids: np.ndarray | None) -> np.ndarray | None:
        return None if ids is None else np.array([uf.find(int(i)) for i in ids], dtype=np.int64)

    row_roots = [roots(r.rows) for r in records]
    col_roots = [roots(r.cols) for r in records]
    # A variable needs a balanced producer (incoming energy) and a consumer (outgoing energy);
    # without either its optimal factor is 0 or infinity, so it stays frozen.
    produced: set[int] = set()
    consumed: set[int] = set()
    for rec, rr, cr in zip(records, row_roots, col_roots):
        if rr is not None and rec.kind in ("weight", "norm_weight"):
            produced.update(rr.tolist())
        if cr is not None:
            consumed.update(cr.tolist())
    live = (produced & consumed) - {FROZEN}

    # Blocks: union the origins (layer outputs) whose channels were tied together.
    n_orig = len(walker.origins)
    owner: dict[int, int] = {}
    block_parent = list(range(n_orig))

    def find_block(i: int) -> int:
        while block_parent[i] != i:
            block_parent[i] = block_parent[block_parent[i]]
            i = block_parent[i]
        return i

    for k, origin in enumerate(walker.origins):
        for i in origin.ids.tolist():
            root = uf.find(i)
            if root not in live:
                continue
            if root in owner:
                a, b = find_block(owner[root]), find_block(k)
                if a != b:
                    block_parent[max(a, b)] = min(a, b)
            else:
                owner[root] = k
    # Number variables block by block, blocks in order of their first origin (topological).
    index: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for k in range(n_orig):
        members.setdefault(find_block(k), []).append(k)
    groups_raw = []
    for b in sorted(members):
        start = len(index)
        labels = []
        for k in members[b]:
            origin = walker.origins[k]
            added = False
            for i in origin.ids.tolist():
                root = uf.find(i)
                if root in live and root not in index:
                    index[root] = len(index)
                    added = True
            if added or any(uf.find(i) in live for i in origin.ids.tolist()):
                labels.append(origin.label)
        if len(index) > start:
            groups_raw.append((labels, start, len(index)))
    n = len(index)

    def to_index(rr: np.ndarray | None) -> torch.Tensor | None:
        if rr is None:
            return None
        idx = np.array([index.get(int(r), n) for r in rr], dtype=np.int64)
        if (idx == n).all():
            return None
        return torch.from_numpy(idx)

    slots = []
    for rec, rr, cr in zip(records, row_roots, col_roots):
        rows, cols = to_index(rr), to_index(cr)
        if rows is None and cols is None:
            continue
        slots.append(
            ParamSlot(rec.name, rec.param, rec.shape3, rows, cols, rec.depth, rec.kind, rec.module)
        )
    groups = []
    for labels, start, stop in groups_raw:
        producers = tuple(
            s.name for s in slots
            if s.rows is not None and bool(((s.rows >= start) & (s.rows < stop)).any())
        )  # fmt: skip
        consumers = tuple(
            s.name for s in slots
            if s.cols is not None and bool(((s.cols >= start) & (s.cols < stop)).any())
        )  # fmt: skip
        name = labels[0] if len(labels) == 1 else "+".join(labels)
        groups.append(RescalingGroup(name, stop - start, producers, consumers, start, stop))
    return RescalingPlan(slots, groups, n)
