"""Build a :class:`NetworkSpec` by following a model's data flow in one dry run.

Every tensor computed from the inputs carries a *node* for its last (feature) axis. A captured
module (an ``nn.Linear``, or any type with a registered extractor) joins its input's node to
its in-space and gives its output a fresh out-space node; element-wise functions keep the
node and restrict its symmetry (ReLU keeps positive scales, tanh / sine keep signs, other
element-wise functions keep permutations only, a purely linear path keeps GL); adding two
tensors ties their nodes (a residual stream is one space); shape operations that keep the
last axis keep the node. Anything the tracer does not know fixes the spaces it touches
(``Trivial``): an unknown operation may make a symmetry false, never true.

The group of a space is the largest of ``GL``, ``ScalePerm``, ``SignPerm``, ``Perm`` and
``Trivial`` that commutes with every operation on it (a space that only dropout reads keeps
both scales and signs; we declare ``ScalePerm``, a subgroup, which is allowed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..core.groups import GL, Blocks, Group, Perm, ScalePerm, SignPerm, Trivial
from ..core.spec import NetworkSpec, Space, UnsupportedModuleError
from .heads import HeadRules, resolve_heads
from .registry import capturable_modules, registered_types

__all__ = ["Trace", "trace", "explain", "spec_of", "InputGuessError"]


class InputGuessError(UnsupportedModuleError):
    """The model did not run on any guessed input: trace it with its real inputs (``example_inputs=``)."""

_ALL = frozenset({"gl", "scale", "sign", "perm"})
_MONOMIAL = frozenset({"scale", "sign", "perm"})
_SCALE = frozenset({"scale", "perm"})
_SIGN = frozenset({"sign", "perm"})
_PERM = frozenset({"perm"})
_NONE: frozenset[str] = frozenset()

_HOMOGENEOUS = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
_ODD = {"tanh", "tanh_", "sin", "sin_", "sinh", "asinh", "atan", "arctan", "hardtanh", "hardtanh_", "softsign",
        "erf", "neg", "negative", "__neg__", "tanhshrink", "hardshrink", "softshrink"}
_POINTWISE = {"gelu", "silu", "sigmoid", "sigmoid_", "elu", "elu_", "selu", "celu", "softplus", "mish", "exp", "cos",
              "abs", "square", "pow", "__pow__", "hardswish", "hardsigmoid", "logsigmoid", "relu6", "sqrt", "log",
              "log1p", "expm1", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "rsqrt", "reciprocal",
              "threshold", "cosh", "erfc", "sign", "floor", "ceil", "round", "glu_" , "silu_", "gelu_", "exp_"}
_SAME = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as", "detach", "requires_grad_",
         "data",
         "cpu", "cuda", "type", "positive", "__pos__"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "squeeze_", "expand", "expand_as", "view_as",
            "reshape_as", "repeat", "tile", "broadcast_to"}
_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub"}
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__",
        "true_divide"}
_DIVIDE = {"div", "div_", "__truediv__", "__itruediv__", "true_divide"}
_FEATURE_NORMS = {"softmax", "log_softmax", "layer_norm", "normalize", "rms_norm", "_softmax"}
_DROPOUT = {"dropout", "dropout_", "feature_alpha_dropout", "alpha_dropout"}
#: pooling over positions (channels-first tensors): averages are linear per channel, maxima keep positive scales
_AVERAGE_POOLS = {"avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d"}
_MAX_POOLS = {"max_pool1d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d",
              "_adaptive_max_pool2d", "adaptive_max_pool1d"}
#: Operations that mix the entries of the axis they are given: over the examples they couple the batch.
_MIXING = {"sum", "mean", "std", "var", "amax", "amin", "max", "min", "logsumexp", "norm", "softmax", "log_softmax",
           "_softmax", "cumsum", "cumprod", "std_mean", "var_mean", "median", "sort", "argsort", "topk"}
_NOT_TRACED = {"size", "dim", "numel", "__len__", "is_floating_point", "__bool__", "item", "tolist", "__format__",
               "__repr__", "__get__", "__set__", "shape", "dtype", "device", "requires_grad", "grad_fn", "is_leaf",
               "grad", "layout", "is_cuda", "is_sparse", "is_quantized", "is_meta", "output_nr",
               "_version", "__hash__", "stride", "data_ptr", "storage_offset", "is_contiguous", "ndim", "ndimension",
               "__iter__", "__reversed__", "__contains__", "__eq__", "__ne__", "_base", "names", "__index__",
               "is_nested"}


class _Graph:
    """Union-find over feature-axis nodes, each with the set of symmetries it still allows."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.allowed: list[frozenset[str]] = []
        self.size: list[int] = []
        self.blocks: dict[int, Group] = {}     # node -> its Blocks group (a module's per-head space)
        self.context = ""                      # what the tracer is looking at: the reason of a restriction
        self.why: dict[int, list[str]] = {}    # root -> what removed symmetries from it
        self.splits: list[tuple[int, int, int]] = []   # (parent, per-head node, heads): see core.heads

    def new(self, size: int, allowed: frozenset[str] = _ALL) -> int:
        self.parent.append(len(self.parent))
        self.allowed.append(allowed if size > 1 else _NONE)
        self.size.append(size)
        if not allowed and size > 1:
            self.why[len(self.parent) - 1] = [f"the output of {self.context}, which cannot be followed"
                                              if self.context else "an input of the model"]
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        i, j = self.find(i), self.find(j)
        if i != j:
            if self.size[i] != self.size[j]:
                raise UnsupportedModuleError(f"internal: tying axes of sizes {self.size[i]} and {self.size[j]}")
            lo, hi = min(i, j), max(i, j)
            self.parent[hi] = lo
            self.allowed[lo] = self.allowed[lo] & self.allowed[hi]
            self.why[lo] = self.why.get(lo, []) + self.why.pop(hi, [])
        return self.find(i)

    def restrict(self, i: int, allowed: frozenset[str]) -> None:
        r = self.find(i)
        lost = self.allowed[r] - allowed
        if lost and self.size[r] > 1:
            self.why.setdefault(r, []).append(f"{self.context} (removes {', '.join(sorted(lost))})")
        self.allowed[r] = self.allowed[r] & allowed

    def group(self, i: int) -> Group:
        root = self.find(i)
        allowed = self.allowed[root]
        blocks = [g for n, g in self.blocks.items() if self.find(n) == root]
        if blocks:
            return blocks[0] if "perm" in allowed and len(set(map(repr, blocks))) == 1 else Trivial()
        if "gl" in allowed:
            return GL()
        if "scale" in allowed:
            return ScalePerm()
        if "sign" in allowed:
            return SignPerm()
        if "perm" in allowed:
            return Perm()
        return Trivial()


def _norm_dim(dim: Any, ndim: int) -> int | None:
    return dim % ndim if isinstance(dim, int) and ndim else None


class _Tracer(HeadRules, TorchFunctionMode):
    """Records which node every traced tensor's last axis lives on (see the module docstring)."""

    ALL, ADD, MUL, RESHAPE = _ALL, _ADD, _MUL, _RESHAPE

    def __init__(self, site_modules: dict[int, tuple[str, nn.Module, Any]]) -> None:
        super().__init__()
        self.graph = _Graph()
        self.node: dict[int, int] = {}
        self.axis: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []           # keeps traced tensors alive so their ids stay unique
        self.site_modules = site_modules
        self.site_params = {id(p): path for path, m, _ in site_modules.values() for p in m.parameters()}
        self.inside = 0
        self.layouts: dict[str, tuple[Any, dict[str, int]]] = {}
        self.site_order: list[str] = []
        self.couplings: list[str] = []
        self.batch_size: int | None = None
        self.where: list[str] = []                   # the stack of modules running (their paths)
        self.heads: dict[int, int] = {}              # id(head tensor) -> its head axis (see core.heads)

    # ------------------------------------------------------------------ bookkeeping
    def mark(self, t: torch.Tensor, node: int, axis: int = -1) -> None:
        """Record that ``t``'s axis ``axis`` (negative: counted from the end) lives on ``node``."""
        self.node[id(t)] = node
        self.axis[id(t)] = axis
        self.keep.append(t)

    def node_of(self, t: Any) -> int | None:
        return self.node.get(id(t)) if isinstance(t, torch.Tensor) else None

    def feature_axis(self, t: torch.Tensor) -> int:
        """Which axis of ``t`` its node is: the last (-1), or the channels of an NCHW tensor (-3)."""
        return self.axis.get(id(t), -1)

    def fresh_fixed(self, t: torch.Tensor) -> None:
        self.mark(t, self.graph.new(t.shape[-1] if t.dim() else 1, _NONE))

    # ------------------------------------------------------------------ modules
    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inside += 1

    def push(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.where.append(path or "<root>")
        return hook

    def pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.where:
            self.where.pop()

    def module_nodes(self, path: str, module: nn.Module, extractor: Any) -> tuple[Any, dict[str, int]]:
        """The module's :class:`~gradmetanet.capture.registry.Layout` and a node per local reference (made once,
        so a module called twice ties its uses)."""
        if path not in self.layouts:
            self.graph.context = f"{type(module).__name__} {path!r}"
            layout = extractor.layout(path, module)
            nodes = {ref: self.graph.new(size) for ref, size in layout.sizes.items()}
            for space in layout.spaces:
                self.graph.restrict(nodes[space.name], _allowed_by(space.group))
                if isinstance(space.group, Blocks):
                    self.graph.blocks[nodes[space.name]] = space.group
            for ref, limit in layout.limits.items():
                self.graph.restrict(nodes[ref], {"perm": _PERM, "sign": _SIGN, "none": _NONE}[limit])
            self.layouts[path] = (layout, nodes)
            self.site_order.append(path)
        return self.layouts[path]

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.inside -= 1
        path, _, extractor = self.site_modules[id(module)]
        layout, nodes = self.module_nodes(path, module, extractor)
        self.graph.context = f"{type(module).__name__} {path!r} reading an input it cannot follow"
        axis = extractor.feature_axis
        for i, x in enumerate(extractor.inputs(args, kwargs)):
            ref = f"input:{i}"
            if ref not in nodes:
                continue
            node = self.node_of(x)
            if node is None or self.feature_axis(x) != axis or x.dim() < -axis or x.shape[axis] != layout.sizes[ref]:
                # not computed from the model inputs (token ids, a constant), or tracked on another axis (an
                # image's width): what the module reads cannot be followed, so its space is fixed
                self.graph.restrict(nodes[ref], _NONE)
            else:
                self.graph.union(node, nodes[ref])
        outs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            raise UnsupportedModuleError(f"captured module {path!r} returned a {type(output).__name__}, not a tensor")
        self.mark(outs[0], nodes[layout.output], axis)
        for extra in outs[1:]:          # attention weights and other side outputs
            self.fresh_fixed(extra)

    # ------------------------------------------------------------------ operations
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        name = getattr(func, "__name__", str(func))
        if name in ("__get__", "__set__"):          # a property: T, mT, data, shape, ...
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _NOT_TRACED:
            return out
        flat_args, _ = tree_flatten((args, kwargs))
        for a in flat_args:
            if isinstance(a, torch.Tensor) and id(a) in self.site_params:
                path = self.site_params[id(a)]
                raise UnsupportedModuleError(
                    f"a parameter of module {path!r} is used outside that module's forward ({name}); its "
                    "per-example gradient cannot be captured by hooks on the module. Call the module instead.")
        traced = [a for a in flat_args if self.node_of(a) is not None]
        if not traced:
            return out
        self.check_coupling(name, args, kwargs, traced)
        self.graph.context = f"{name} in {self.where[-1] if self.where else '<root>'!r}"
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.apply_rule(name, args, kwargs, traced, outs)
        return out

    def check_coupling(self, name: str, args: tuple, kwargs: dict, traced: list[torch.Tensor]) -> None:
        """Record operations that mix the examples of a ``[b, d]`` tensor (the batch axis is then 0 for sure)."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in ("batch_norm", "instance_norm") and (kwargs.get("training") or (len(args) > 5 and args[5] is True)):
            self.couplings.append(f"{name} with batch statistics")
        if x is None or x.dim() != 2 or x.shape[0] != self.batch_size or self.node_of(x) is None or name not in _MIXING:
            return
        dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], (int, tuple, list)) else None)
        dims = dim if isinstance(dim, (tuple, list)) else [dim]
        if name in ("sum", "mean", "std", "var", "amax", "amin", "logsumexp", "norm") and dim is None:
            return                       # a reduction of everything: the model returns a scalar, its own loss
        if any(_norm_dim(d, 2) == 0 for d in dims):
            self.couplings.append(f"{name} over dim 0 (the examples)")

    def fix_all(self, traced: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for t in traced:
            self.graph.restrict(self.node_of(t), _NONE)
        for o in outs:
            self.fresh_fixed(o)

    def keep_node(self, x: torch.Tensor, outs: list[torch.Tensor], allowed: frozenset[str]) -> None:
        n, a = self.node_of(x), self.feature_axis(x)
        self.graph.restrict(n, allowed)
        for o in outs:
            same = (o.dim() and x.dim() and o.shape[-1] == x.shape[-1]) if a == -1 else \
                (o.dim() == x.dim() and o.shape[a] == x.shape[a])
            if same:
                self.mark(o, n, a)
            else:
                self.graph.restrict(n, _NONE)
                self.fresh_fixed(o)

    def apply_rule(self, name: str, args: tuple, kwargs: dict, traced: list[torch.Tensor],
                   outs: list[torch.Tensor]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else traced[0]
        if not x.dim() or not outs:
            return self.fix_all(traced, outs)
        if any(self.head_axis(t) is not None for t in traced):
            return self.head_rule(name, args, kwargs, traced, outs)
        if self.node_of(x) is not None and self.feature_axis(x) != -1:
            return self.channel_rule(name, args, kwargs, x, traced, outs)
        allowed = _elementwise(name, args, kwargs)
        if allowed is not None:
            return self.keep_node(x, outs, allowed)
        if name in _RESHAPE:
            return None if self.split_heads(name, x, outs) else self.keep_node(x, outs, _ALL)
        if name in _ADD or name in _MUL:
            return self.binary(name, args, traced, outs)
        if name in ("transpose", "swapaxes", "swapdims", "transpose_", "permute", "movedim", "moveaxis"):
            kept = _last_axis_stays_last(name, args, kwargs, x.dim())
            return self.keep_node(x, outs, _ALL) if kept else self.fix_all(traced, outs)
        if name in ("__getitem__", "narrow", "select", "index_select", "unsqueeze", "chunk", "split", "unbind",
                    "sum", "mean", "cat", "concat", "concatenate", "stack"):
            return self.structural(name, args, kwargs, x, traced, outs)
        return self.fix_all(traced, outs)

    def channel_rule(self, name: str, args: tuple, kwargs: dict, x: torch.Tensor, traced: list[torch.Tensor],
                     outs: list[torch.Tensor]) -> None:
        """Rules for a tensor whose node is not its last axis (the channels of an NCHW activation): element-wise
        functions, pooling over the positions, sums with other such tensors, means over the positions and the
        flatten that follows a global pooling; anything else fixes the channels."""
        allowed = _elementwise(name, args, kwargs)
        if allowed is not None:
            return self.keep_node(x, outs, allowed)
        if name in _AVERAGE_POOLS:
            return self.keep_node(x, outs, _ALL)
        if name in _MAX_POOLS:
            return self.keep_node(x, outs, _SCALE)             # max commutes with positive scales, not with signs
        if name in _ADD or name in _MUL:
            return self.binary(name, args, traced, outs)
        a, n = self.feature_axis(x), self.node_of(x)
        channel = x.dim() + a
        if name in ("sum", "mean"):
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else [dims]
            if any(d is None for d in dims) or channel in [_norm_dim(d, x.dim()) for d in dims]:
                return self.fix_all(traced, outs)
            keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            reduced = [_norm_dim(d, x.dim()) for d in dims]
            self.graph.restrict(n, _ALL)
            for o in outs:
                self.mark(o, n, a if keepdim else a + sum(1 for d in reduced if d > channel))
            return None
        if name in ("flatten", "reshape", "view", "squeeze") and all(s == 1 for s in x.shape[channel + 1:]):
            o = outs[0]                                        # [b, C, 1, 1] -> [b, C] after a global pooling
            if len(outs) == 1 and o.dim() == channel + 1 and tuple(o.shape) == tuple(x.shape[:channel + 1]):
                self.graph.restrict(n, _ALL)
                return self.mark(o, n, -1)
        return self.fix_all(traced, outs)

    def binary(self, name: str, args: tuple, traced: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        out = outs[0]
        ax = self.feature_axis(traced[0])
        d = out.shape[ax] if out.dim() >= -ax else 1
        full = [a for a in args[:2] if isinstance(a, torch.Tensor) and a.dim() >= -ax and a.shape[ax] == d and d > 1]
        if any(self.node_of(a) is not None and self.feature_axis(a) != ax for a in full):
            return self.fix_all(traced, outs)                 # tracked on different axes
        traced_full = [a for a in full if self.node_of(a) is not None]
        constant_full = [a for a in full if self.node_of(a) is None]
        others = [a for a in args[:2] if a is not None and not any(a is f for f in full)]
        if constant_full:                       # a fixed per-neuron constant joins: no symmetry survives
            return self.fix_all(traced, outs)
        node = traced_full[0] if traced_full else None
        if node is None:
            return self.fix_all(traced, outs)
        n = self.node_of(node)
        for t in traced_full[1:]:
            n = self.graph.union(n, self.node_of(t))
        traced_other = [a for a in others if self.node_of(a) is not None]
        for t in traced_other:                  # a per-example scalar (last axis 1) broadcast over the neurons
            self.graph.restrict(self.node_of(t), _NONE)
        divisor = name in _DIVIDE and len(args) > 1 and any(args[1] is t for t in traced_full)
        if name in _ADD:
            allowed = _ALL if not others else _PERM
        elif len(traced_full) > 1 or divisor or name == "__rtruediv__":
            allowed = _PERM                     # a product of two neurons' values, or c / x: not linear
        elif traced_other:
            allowed = _MONOMIAL
        else:
            allowed = _ALL                      # multiplication by a constant scalar is linear
        self.graph.restrict(n, allowed)
        for o in outs:
            self.mark(o, n, ax)

    def structural(self, name: str, args: tuple, kwargs: dict, x: torch.Tensor, traced: list[torch.Tensor],
                   outs: list[torch.Tensor]) -> None:
        last = x.dim() - 1
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            reaches_last = any(i is Ellipsis for i in index) or \
                sum(i is not None for i in index) >= x.dim()
            if reaches_last and not (isinstance(index[-1], slice) and index[-1] == slice(None)):
                return self.fix_all(traced, outs)
            return self.keep_node(x, outs, _ALL)
        if name in ("sum", "mean"):
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else [dims]
            if any(d is None for d in dims) or last in [_norm_dim(d, x.dim()) for d in dims]:
                return self.fix_all(traced, outs)
            return self.keep_node(x, outs, _ALL)
        if name in ("narrow", "select", "index_select", "chunk", "split", "unbind", "unsqueeze"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 and name in ("narrow", "select", "index_select",
                                                                              "unsqueeze", "unbind") else
                             args[2] if len(args) > 2 else 0)
            if name == "unsqueeze":
                if _norm_dim(dim, x.dim() + 1) == x.dim():
                    return self.fix_all(traced, outs)
            elif _norm_dim(dim, x.dim()) == last:
                return self.fix_all(traced, outs)
            return self.keep_node(x, outs, _ALL)
        # cat / stack: a sequence of tensors and a dim
        tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        ndim = tensors[0].dim() + (1 if name == "stack" else 0)
        if _norm_dim(dim, ndim) == ndim - 1 or any(self.node_of(t) is None for t in tensors):
            return self.fix_all(traced, outs)
        n = self.node_of(tensors[0])
        for t in tensors[1:]:
            n = self.graph.union(n, self.node_of(t))
        for o in outs:
            self.mark(o, n)


def _elementwise(name: str, args: tuple, kwargs: dict) -> frozenset[str] | None:
    """The symmetries an element-wise operation keeps (``None``: not an element-wise operation)."""
    if name in _HOMOGENEOUS:
        return _SCALE
    if name in _ODD:
        return _SIGN
    if name in _POINTWISE or name in _FEATURE_NORMS:
        return _PERM
    if name in _DROPOUT:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return _MONOMIAL if training else _ALL
    if name in _SAME:
        return _ALL
    return None


_Tracer.elementwise = staticmethod(_elementwise)


def _last_axis_stays_last(name: str, args: tuple, kwargs: dict, ndim: int) -> bool:
    """Whether a transpose / permute / movedim leaves the last axis where it is."""
    last = ndim - 1
    if name == "permute":
        rest = args[1:] or (kwargs.get("dims"),)
        dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
        return _norm_dim(dims[-1], ndim) == last
    if name in ("movedim", "moveaxis"):
        src, dst = (list(args[1:3]) + [None, None])[:2]
        src, dst = kwargs.get("source", src), kwargs.get("destination", dst)
        moved = [*(src if isinstance(src, (tuple, list)) else [src]), *(dst if isinstance(dst, (tuple, list)) else [dst])]
        return all(_norm_dim(d, ndim) != last for d in moved)
    dims = list(args[1:3]) or [kwargs.get("dim0"), kwargs.get("dim1")]
    return all(_norm_dim(d, ndim) != last for d in dims)


def _allowed_by(group: Group) -> frozenset[str]:
    """The symmetries a declared group keeps, in the tracer's terms."""
    return {"trivial": _NONE, "perm": _PERM, "sign_perm": _SIGN, "scale_perm": _SCALE, "gl": _ALL,
            "blocks": _PERM}[group.name]


def _candidate_inputs(site_modules: dict[int, tuple[str, nn.Module, Any]]) -> list[tuple]:
    """Guesses at an input: what each captured module accepts (:meth:`Extractor.example_input`), in registration
    order, distinct shapes only."""
    guesses: dict[tuple, tuple] = {}
    with torch.random.fork_rng(devices=[]):                 # tracing never moves the user's random stream
        for _, module, extractor in site_modules.values():
            guess = extractor.example_input(module)
            guesses.setdefault(tuple((tuple(t.shape), t.dtype) for t in guess), guess)
    return list(guesses.values())


@dataclass(frozen=True)
class Trace:
    """What one dry run found: the spec, and operations that couple the examples of a batch."""

    spec: NetworkSpec
    couplings: tuple[str, ...] = ()
    why: dict[str, tuple[str, ...]] = field(default_factory=dict)   # space -> what removed symmetries from it

    def explain(self) -> str:
        """A Markdown table: every space with its size, group, the sites that read and write it and, where a
        symmetry was lost, the operation and module that removed it (a fixed input or output is expected)."""
        lines = ["| space | size | group | read by | written by | symmetries lost to |", "|---|---:|---|---|---|---|"]
        for space in self.spec.spaces:
            readers = ", ".join(s.name for s in self.spec.readers(space.name)) or "-"
            writers = ", ".join(s.name for s in self.spec.writers(space.name)) or "-"
            lost = "; ".join(self.why.get(space.name, ())) or "-"
            lines.append(f"| {space.name} | {space.size} | {space.group.name} | {readers} | {writers} | {lost} |")
        return "\n".join(lines)


def explain(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None,
            example_kwargs: dict | None = None) -> str:
    """Why ``model``'s traced spec is what it is: :meth:`Trace.explain` of one dry run (see :func:`trace`)."""
    return trace(model, example_inputs, example_kwargs).explain()


def spec_of(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None,
            example_kwargs: dict | None = None) -> NetworkSpec:
    """``model``'s spec, traced from its data flow in one dry run on ``example_inputs`` (see :func:`trace`)."""
    return trace(model, example_inputs, example_kwargs).spec


def _deprecated_from_module(cls: type[NetworkSpec], model: nn.Module,
                            example_inputs: tuple | torch.Tensor | None = None) -> NetworkSpec:
    """Deprecated alias of :func:`spec_of` (``core`` no longer reaches up into ``capture``)."""
    warnings.warn("NetworkSpec.from_module is deprecated; use gradmetanet.spec_of(model, example_inputs)",
                  DeprecationWarning, stacklevel=2)
    return spec_of(model, example_inputs)


NetworkSpec.from_module = classmethod(_deprecated_from_module)        # kept for one release (0.9)


def site_modules_of(model: nn.Module) -> dict[int, tuple[str, nn.Module, Any]]:
    """``id(module) -> (path, module, extractor)`` of every module that forms sites; raises
    :class:`UnsupportedModuleError` for a module with parameters that no extractor covers."""
    found = {id(m): (p, m, e) for p, m, e in capturable_modules(model)}
    covered = {id(p) for _, m, _ in found.values() for p in m.parameters()}
    for path, module in model.named_modules():
        if id(module) in found:
            found[id(module)][2].validate(path, module)
            continue
        own = [n for n, p in module.named_parameters(recurse=False) if id(p) not in covered]
        if own:
            raise UnsupportedModuleError(
                f"module {path or '<root>'!r} ({type(module).__name__}) has parameters {own} that gradmetanet "
                "cannot describe; supported parameterised modules: "
                f"{', '.join(t.__name__ for t in registered_types())}. Capture a subset with "
                "GradientCapture(model, layers=[...]) to ignore it, or register an extractor for it.")
    if not found:
        raise UnsupportedModuleError(f"{type(model).__name__} contains no capturable layer (nn.Linear, or a "
                                     "module type with a registered extractor)")
    return found


def trace(model: nn.Module, example_inputs: tuple | torch.Tensor | None = None,
          example_kwargs: dict | None = None) -> Trace:
    """Follow ``model``'s data flow in one forward on ``example_inputs`` (default: a guess from its first layer).

    Besides the spec, it records operations that mix the examples of a ``[b, d]`` tensor (a softmax
    or a mean over the batch, batch statistics): per-example gradients are not defined there.
    Raises :class:`UnsupportedModuleError` naming any parameterised module that no extractor
    covers, a captured module's parameter used functionally outside it, and a model without
    captured modules. Modules that do not run in the dry run are not part of the spec. A parameter
    shared by two modules (a tied embedding and unembedding) ties the spaces of its axes; where the
    two uses label an axis differently (a row in one, a column in the other) its space keeps signed
    permutations only.
    """
    site_modules = site_modules_of(model)
    if example_inputs is not None:
        tracer, output = _trace(model, site_modules, example_inputs, example_kwargs or {})
    else:
        errors = []
        for guess in _candidate_inputs(site_modules):
            try:
                tracer, output = _trace(model, site_modules, guess, {})
                break
            except UnsupportedModuleError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
                errors.append(f"{[list(t.shape) for t in guess]}: {err}")
        else:
            raise InputGuessError(f"could not run {type(model).__name__} on a guessed input ({'; '.join(errors)});"
                                         " pass example_inputs= to spec_of")
    graph = tracer.graph
    graph.context = "the model's output"
    for o in tree_flatten(output)[0]:
        n = tracer.node_of(o)
        if n is not None:
            graph.restrict(n, _NONE)
    canonical = canonical_parameter_names(model)
    modules = {path: module for path, module, _ in site_modules.values()}
    node_sites = []                               # sites whose spaces are still node ids
    for path in tracer.site_order:
        module, (layout, nodes) = modules[path], tracer.layouts[path]
        for site in layout.sites:
            node_sites.append(replace(site, in_space=str(nodes[site.in_space]), out_space=str(nodes[site.out_space]),
                                      weight=canonical(module, path, site.weight),
                                      bias=None if site.bias is None else canonical(module, path, site.bias)))
    _tie_shared_parameters(graph, node_sites)
    resolve_heads(graph, {graph.find(int(n)) for site in node_sites for n in (site.in_space, site.out_space)})
    names: dict[int, str] = {}
    for site in node_sites:
        for node in (int(site.in_space), int(site.out_space)):
            names.setdefault(graph.find(node), f"s{len(names)}")
    spaces = [Space(name, graph.size[root], graph.group(root)) for root, name in names.items()]
    sites = tuple(replace(site, in_space=names[graph.find(int(site.in_space))],
                          out_space=names[graph.find(int(site.out_space))]) for site in node_sites)
    why = {name: tuple(dict.fromkeys(graph.why.get(root, []))) for root, name in names.items()}
    return Trace(NetworkSpec(tuple(spaces), sites), tuple(dict.fromkeys(tracer.couplings)), why)


def canonical_parameter_names(model: nn.Module) -> Callable[[nn.Module, str, str], str]:
    """``canonical(module, path, name)``: the name ``model.named_parameters()`` gives the tensor a site calls
    ``name`` (a tied unembedding's ``unembed.weight`` is ``embed.weight``)."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)

    def canonical(module: nn.Module, path: str, name: str) -> str:
        local = name[len(path) + 1:] if path and name.startswith(f"{path}.") else name
        try:
            tensor = module.get_parameter(local)
        except AttributeError:
            return name
        return first.get(id(tensor), name)
    return canonical


def _tie_shared_parameters(graph: _Graph, sites: list) -> None:
    """Union the spaces of a parameter declared by several sites, axis by axis (spaces are node ids here)."""
    declared: dict[tuple, Any] = {}
    for site in sites:
        for p in site.parameters():
            key = (p.name, p.rows)
            if key not in declared:
                declared[key] = p
                continue
            for x, y in zip(declared[key].axes, p.axes):
                if x.space is None or y.space is None:
                    continue
                graph.union(int(x.space), int(y.space))
                if x.role != y.role:
                    graph.restrict(int(x.space), _SIGN)


def _trace(model: nn.Module, site_modules: dict[int, tuple[str, nn.Module, Any]],
           example_inputs: tuple | torch.Tensor, example_kwargs: dict) -> tuple[_Tracer, Any]:
    """One dry run of ``model`` under the tracer (no gradients, the user's RNG untouched)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tracer = _Tracer(site_modules)
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(tracer.push(path)))
        handles.append(module.register_forward_hook(tracer.pop))
    for _, module, _ in site_modules.values():
        handles.append(module.register_forward_pre_hook(tracer.enter, with_kwargs=True))
        handles.append(module.register_forward_hook(tracer.leave, with_kwargs=True))
    try:
        for t in tree_flatten((inputs, example_kwargs))[0]:
            if isinstance(t, torch.Tensor):
                tracer.batch_size = tracer.batch_size or (t.shape[0] if t.dim() else None)
                if t.is_floating_point():
                    tracer.fresh_fixed(t)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), tracer:
            output = model(*inputs, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
    return tracer, output

