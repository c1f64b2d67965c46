"""Attention heads in the data-flow tracer (:mod:`gradmetanet.capture.trace`).

A feature axis viewed as ``[..., heads, d]`` (``q_proj(x).view(b, T, h, d)``) becomes a *head
tensor*: its last axis gets a per-head node ``d`` and the tracer remembers where the head axis is.
The split ``(parent, child, heads)`` says that the parent space may move only by
``Blocks(heads, G_child)``: one element per head, heads keeping their identity. Head tensors
follow a short list of operations (element-wise functions, transposes and permutes that keep
the head axis and the per-head axis apart, slices along other axes, ``q @ k^T``, ``p @ v``,
``scaled_dot_product_attention``, and the reshape that merges the heads back); anything else
fixes them. ``q @ k^T`` ties Q's and K's per-head nodes (one ``Blocks(h, Perm)`` space for both,
as in ``nn.MultiheadAttention``); the merge of ``p @ v`` ties V's projection to O's input.

:func:`resolve_heads` then settles the splits: parents of one per-head node are one space,
per-head nodes of one parent are one node, and a split whose head counts disagree (grouped-query
attention repeats key/value heads over query heads), whose per-head node lost its permutations
(rotary embeddings rotate pairs of features, each pair at its own frequency) or is read by a
module across heads, fixes every space it touches, with the reason recorded for ``explain``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..core.groups import Blocks, Perm

PERM = frozenset({"perm"})
NONE: frozenset[str] = frozenset()

#: shape operations a head tensor may go through (the head axis and the per-head axis stay apart)
AXIS_MOVES = {"transpose", "swapaxes", "swapdims", "transpose_", "permute", "movedim", "moveaxis"}
MATMULS = {"matmul", "__matmul__", "bmm"}
ATTENTION = {"scaled_dot_product_attention"}


class HeadRules:
    """Mixed into the tracer: the rules for head tensors (see the module docstring)."""

    heads: dict[int, int]          # id(tensor) -> its head axis (negative); filled by the tracer

    def head_axis(self, t: Any) -> int | None:
        return self.heads.get(id(t)) if isinstance(t, torch.Tensor) else None

    def mark_heads(self, t: torch.Tensor, node: int, axis: int, head: int) -> None:
        self.mark(t, node, axis)
        self.heads[id(t)] = head

    def split_heads(self, name: str, x: torch.Tensor, outs: list[torch.Tensor]) -> bool:
        """``[..., H d] -> [..., H, d]`` (``view``/``reshape``/``unflatten``): record the split, mark the output
        as a head tensor on a new per-head node; ``False`` where the operation is not such a split."""
        if name not in ("view", "reshape", "unflatten") or len(outs) != 1:
            return False
        o = outs[0]
        if o.dim() != x.dim() + 1 or tuple(o.shape[:-2]) != tuple(x.shape[:-1]) or o.shape[-2] < 2 \
                or o.shape[-2] * o.shape[-1] != x.shape[-1]:
            return False
        child = self.graph.new(o.shape[-1])
        self.graph.splits.append((self.node_of(x), child, o.shape[-2]))
        self.mark_heads(o, child, -1, -2)
        return True

    def head_rule(self, name: str, args: tuple, kwargs: dict, traced: list[torch.Tensor],
                  outs: list[torch.Tensor]) -> None:
        """An operation on at least one head tensor."""
        if name in ATTENTION:
            return self.attention_rule(args, kwargs, traced, outs)
        if name in MATMULS and len(args) >= 2:
            return self.matmul_rule(args[0], args[1], traced, outs)
        if name in ("cat", "concat", "concatenate"):
            return self.cat_heads(args, kwargs, traced, outs)
        x = next(t for t in traced if self.head_axis(t) is not None)
        h = self.head_axis(x)
        if any(self.head_axis(t) is None for t in traced):
            return self.fix_all(traced, outs)           # a head tensor meets a tensor without heads
        if any(self.head_axis(t) != h or t.dim() != x.dim() for t in traced):
            return self.fix_all(traced, outs)
        axis = self.feature_axis(x)
        if name in AXIS_MOVES:
            return self.move_axes(name, args, kwargs, x, traced, outs)
        if name == "__getitem__":
            return self.slice_heads(args[1], x, traced, outs)
        if axis != -1:
            return self.fix_all(traced, outs)
        if name in ("view", "reshape", "flatten", "reshape_as", "view_as") and len(outs) == 1 and h == -2 \
                and outs[0].dim() == x.dim() - 1 and tuple(outs[0].shape[:-1]) == tuple(x.shape[:-2]):
            parent = self.graph.new(outs[0].shape[-1])                # the heads merged back: [..., H, d] -> [..., H d]
            self.graph.splits.append((parent, self.node_of(x), x.shape[-2]))
            return self.mark(outs[0], parent)
        before = len(self.keep)
        self.dispatch_kept(name, args, kwargs, x, traced, outs)
        root = self.graph.find(self.node_of(x))
        for o in self.keep[before:]:
            if o.dim() == x.dim() and tuple(o.shape[h:]) == tuple(x.shape[h:]) and \
                    self.graph.find(self.node_of(o)) == root:
                self.heads[id(o)] = h
            else:
                self.graph.context = f"{name} folding the heads into another axis in {self.graph.context.split(' in ')[-1]}" \
                    " (grouped-query attention repeats key/value heads so)"
                self.graph.restrict(self.node_of(x), NONE)
        return None

    def dispatch_kept(self, name: str, args: tuple, kwargs: dict, x: torch.Tensor, traced: list[torch.Tensor],
                      outs: list[torch.Tensor]) -> None:
        """Element-wise functions, sums and products with head tensors of the same layout, and reshapes that keep
        the head axis and what follows it; anything else fixes."""
        allowed = self.elementwise(name, args, kwargs)
        if allowed is not None:
            return self.keep_node(x, outs, allowed)
        if name in self.ADD or name in self.MUL:
            return self.binary(name, args, traced, outs)
        if name in self.RESHAPE:
            return self.keep_node(x, outs, self.ALL)
        return self.fix_all(traced, outs)

    def move_axes(self, name: str, args: tuple, kwargs: dict, x: torch.Tensor, traced: list[torch.Tensor],
                  outs: list[torch.Tensor]) -> None:
        """Transposes, permutes and movedims: where the head and per-head axes land, found by running the same
        operation on a meta tensor whose axes have distinct sizes. The per-head axis may end last or next to
        last (``k.transpose(-1, -2)`` before ``q @ k^T``)."""
        nd = x.dim()
        probe = torch.empty(tuple(range(2, nd + 2)), device="meta")
        try:
            moved = getattr(probe, name)(*args[1:], **kwargs)
        except (TypeError, RuntimeError, IndexError, AttributeError):
            return self.fix_all(traced, outs)
        sizes = list(moved.shape)
        head = sizes.index(nd + self.head_axis(x) + 2) - nd
        axis = sizes.index(nd + self.feature_axis(x) + 2) - nd
        if axis not in (-1, -2) or len(outs) != 1:
            return self.fix_all(traced, outs)
        return self.mark_heads(outs[0], self.node_of(x), axis, head)

    def slice_heads(self, index: Any, x: torch.Tensor, traced: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """``key[:, :, :T]``, ``key[:, :, None]``: slices, integers and new axes, the head and per-head axes
        untouched."""
        index = index if isinstance(index, tuple) else (index,)
        nd = x.dim()
        head, axis = nd + self.head_axis(x), nd + self.feature_axis(x)
        if len(outs) != 1 or any(not (i is None or isinstance(i, (int, slice))) for i in index):
            return self.fix_all(traced, outs)
        landed: dict[int, int] = {}                  # axis of x -> axis of the output (slices only)
        p = q = 0
        for i in index:
            if i is None:
                q += 1
                continue
            if p in (head, axis) and i != slice(None):
                return self.fix_all(traced, outs)
            if isinstance(i, slice):
                landed[p] = q
                q += 1
            p += 1
        if p > nd:
            return self.fix_all(traced, outs)
        landed.update({r: q + r - p for r in range(p, nd)})
        o = outs[0]
        return self.mark_heads(o, self.node_of(x), landed[axis] - o.dim(), landed[head] - o.dim())

    def cat_heads(self, args: tuple, kwargs: dict, traced: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """Concatenating head tensors of one layout along another axis (a key/value cache growing over positions);
        empty tensors may join, other constants fix."""
        tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        heads = [t for t in tensors if self.head_axis(t) is not None]
        x = heads[0]
        nd = x.dim()
        layout = (self.head_axis(x), self.feature_axis(x))
        if len(outs) != 1 or not isinstance(dim, int) or (dim % nd) - nd in layout or \
                any(t.numel() and (self.head_axis(t), self.feature_axis(t)) != layout for t in tensors) or \
                any(t.dim() != nd for t in heads):
            return self.fix_all(traced, outs)
        for t in heads[1:]:
            self.graph.union(self.node_of(x), self.node_of(t))
        return self.mark_heads(outs[0], self.node_of(x), layout[1], layout[0])

    def matmul_rule(self, a: Any, b: Any, traced: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """``q @ k^T`` (per-head axis last in ``q``, next to last in ``k^T``): ties Q's and K's per-head nodes, the
        scores are fixed; ``p @ v`` (``v`` a head tensor, per-head axis last): the output is on ``v``'s node."""
        ha, hb = self.head_axis(a), self.head_axis(b)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or len(outs) != 1 or hb is None:
            return self.fix_all(traced, outs)
        o = outs[0]
        if ha is not None and ha == hb and a.dim() == b.dim() == o.dim() and self.feature_axis(a) == -1 \
                and self.feature_axis(b) == -2:
            self.graph.restrict(self.node_of(a), PERM)
            self.graph.union(self.node_of(a), self.node_of(b))
            return self.fresh_fixed(o)
        if ha is None and self.feature_axis(b) == -1 and o.dim() == b.dim() and a.dim() <= b.dim():
            if self.node_of(a) is not None:
                self.graph.restrict(self.node_of(a), NONE)    # a's last axis is contracted with b's positions
            return self.mark_heads(o, self.node_of(b), -1, hb)
        return self.fix_all(traced, outs)

    def attention_rule(self, args: tuple, kwargs: dict, traced: list[torch.Tensor],
                       outs: list[torch.Tensor]) -> None:
        """``scaled_dot_product_attention(q, k, v)``: the output is on V's per-head node; Q and K are tied when both
        are head tensors of V's layout (fixed otherwise: only their scores matter). Where a key/value head serves
        several query heads (grouped-query attention), V's heads are fixed."""
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        h = self.head_axis(v)
        if len(outs) != 1 or h is None or self.feature_axis(v) != -1 or q.dim() != v.dim():
            return self.fix_all(traced, outs)
        if q.shape[h] != v.shape[h]:
            self.graph.context = f"{self.graph.context} (grouped-query attention: a key/value head serves several " \
                                 "query heads)"
            self.graph.restrict(self.node_of(v), NONE)
        if all(self.head_axis(t) == h and self.feature_axis(t) == -1 for t in (q, k)) and q.shape[h] == k.shape[h]:
            self.graph.restrict(self.node_of(q), PERM)
            self.graph.union(self.node_of(q), self.node_of(k))
        else:
            for t in (q, k):
                if self.node_of(t) is not None:
                    self.graph.restrict(self.node_of(t), NONE)
        return self.mark_heads(outs[0], self.node_of(v), -1, h)


def _cause(entries: list[str]) -> str:
    """What removed symmetries, without the "(removes ...)" each entry ends with."""
    return "; ".join(dict.fromkeys(re.sub(r" \(removes [^)]*\)$", "", e) for e in entries)) or "an operation on them"


def resolve_heads(graph: Any, site_roots: set[int]) -> None:
    """Settle the recorded head splits on ``graph`` (see the module docstring); ``site_roots`` are the roots of the
    nodes that captured modules read or write."""
    def fix(nodes: tuple[int, ...], reason: str) -> bool:
        changed = False
        for n in nodes:
            if graph.allowed[graph.find(n)]:
                graph.context = reason
                graph.restrict(n, NONE)
                changed = True
        return changed

    changed = True
    while changed:
        changed = False
        splits = graph.splits
        for i, (p1, c1, h1) in enumerate(splits):
            for p2, c2, h2 in splits[i + 1:]:
                same_child, same_parent = graph.find(c1) == graph.find(c2), graph.find(p1) == graph.find(p2)
                if not (same_child or same_parent) or (same_child and same_parent):
                    continue
                if h1 != h2:
                    changed |= fix((p1, c1, p2, c2), f"attention heads of {h1} and {h2} meet (key/value heads "
                                                     "repeated over query heads: grouped-query attention)")
                elif same_child:
                    graph.union(p1, p2)
                    changed = True
                else:
                    graph.union(c1, c2)
                    changed = True
        for p, c, h in splits:
            child, parent = graph.find(c), graph.find(p)
            if child in site_roots:
                changed |= fix((p, c), "a module reading every head's features alike (one permutation for all heads)")
            elif "perm" not in graph.allowed[child] or "perm" not in graph.allowed[parent]:
                cause = _cause(graph.why.get(child, []) + graph.why.get(parent, []))
                changed |= fix((p, c), f"attention heads whose features are fixed by {cause}")
    for p, c, h in graph.splits:
        if "perm" in graph.allowed[graph.find(p)]:
            graph.context = f"attention heads ({h} blocks)"
            graph.restrict(p, PERM)
            graph.blocks[graph.find(p)] = Blocks(h, Perm())
