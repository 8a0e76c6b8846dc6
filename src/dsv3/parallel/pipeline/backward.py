"""Backward split into an input-gradient part (B) and a deferred weight-gradient part (W).

Zero-bubble schedules (DualPipe's W) need dL/d(stage input) early, to send it upstream, and may compute
dL/d(weights) later, in a bubble. Mechanism (no change to the model code):

B: ``torch.autograd.grad(outputs, stage_input, grad_outputs, retain_graph=True)``. The autograd engine only
   runs the graph nodes on a path to the stage input and, inside each node, only the outputs that lead
   there: a linear's MmBackward computes dX but not dW. Before that call we find the *join nodes*: for
   each parameter, walking from the outputs toward it, the last nodes that also lie on a path to the
   stage input (e.g. the MmBackward where a weight's path leaves the activation path). A pre-hook on each
   join node records the gradient arriving there during B.
W: for each group of parameters sharing join nodes, ``torch.autograd.grad`` from the join nodes (as
   GradientEdges, seeded with the recorded gradients) to the group's parameters. Only the weight-side
   branches run, so B + W costs about one full backward. When a group has several join nodes, one can be
   reached from another through the activation path; their pre-hooks then replace the arriving gradient
   with the recorded one, so nothing is counted twice. Parameters whose path never touches the stage
   input (and every parameter of a stage whose input needs no gradient, e.g. the embedding chunk) are
   differentiated from the outputs directly in W.

Opaque join nodes: a custom autograd.Function, and a torch.compile'd region (AOTAutograd's
``CompiledFunction``), computes every input's gradient whenever its backward runs, whatever was asked for.
Deferring the weights behind such a node would run its backward twice, once in B (weight gradients
computed and dropped) and again in W. On the CPU, a compiled two-linear block's B + W took 2.2x its full
backward. Parameters joining at one are therefore differentiated in B itself, in the same engine call as
the stage input. Their backward runs once, and only the built-in nodes' weight branches are deferred to W.

The weight gradients are accumulated into ``.grad`` exactly as ``backward()`` would, and then the parameter's
post-accumulate-grad hooks run, as after autograd's own accumulation.
"""
from __future__ import annotations

import collections
from typing import Sequence

import torch
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node


def grad_node(t: torch.Tensor) -> Node | None:
    """A tensor's grad_fn, or for a leaf its AccumulateGrad node (made to exist through a throwaway view)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


def _consumers(roots: list[Node]) -> dict[Node, list[Node]]:
    """Reverse edges of the graph below ``roots``: node -> the nodes that feed gradient into it."""
    rev: dict[Node, list[Node]] = collections.defaultdict(list)
    seen = set(roots)
    todo = collections.deque(roots)
    while todo:
        node = todo.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            rev[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return rev


def _closure(starts: list[Node], rev: dict, stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Nodes reached from ``starts`` along reverse edges (toward the outputs), not entering ``stop``;
    returns (reached, the stop nodes touched)."""
    reached, touched = set(starts), set()
    todo = collections.deque(starts)
    while todo:
        node = todo.popleft()
        for up in rev.get(node, ()):
            if up in reached:
                continue
            if up in stop:
                touched.add(up)
                continue
            reached.add(up)
            todo.append(up)
    return reached, touched


class WeightGrad:
    """The deferred W of one backward: call ``run()`` once to accumulate the weight gradients."""

    def __init__(self, groups: list[tuple[list[Node], list, list[torch.nn.Parameter]]],
                 direct: tuple[list, list, list[torch.nn.Parameter]] | None, keep: list | None = None):
        self.groups = groups    # (join nodes, recorded grads per node, params)
        self.direct = direct    # (outputs, grad_outputs, params) differentiated from the outputs
        # The graph must outlive B even when the caller drops the stage outputs. The join nodes alone do not
        # hold it: a custom autograd.Function's node is reachable from Python only through its ctx, which
        # holds the C++ node weakly, so on torch 2.11 (CUDA, DualPipeV) a join node inside an FP8/MoE
        # Function died once the outputs were freed ("Attribute 'register_prehook' is invalid for this
        # instance of _C._FunctionBase"). ``keep`` holds built-in nodes above the outputs, which own it all.
        self.keep = keep or []

    def run(self) -> None:
        for nodes, recorded, params in self.groups:
            edges, seeds = [], []
            for node, grads in zip(nodes, recorded):
                if grads is None:       # the join node was not reached in B: no gradient flows through it
                    continue
                for i, g in enumerate(grads):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        seeds.append(g)
            if not edges:
                continue
            handles = []
            if len(nodes) > 1:  # pin each join node to its recorded gradient (no double counting)
                for node, grads in zip(nodes, recorded):
                    if grads is not None:
                        handles.append(node.register_prehook(lambda _g, saved=grads: saved))
            try:
                dws = torch.autograd.grad(edges, [GradientEdge(grad_node(p), 0) for p in params],
                                          grad_outputs=seeds, retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            _accumulate(params, dws)
        if self.direct is not None:
            outs, gouts, params = self.direct
            dws = torch.autograd.grad(outs, params, grad_outputs=gouts, retain_graph=True, allow_unused=True)
            _accumulate(params, dws)
        self.groups, self.direct, self.keep = [], None, []   # drop the graph


def _accumulate(params, grads) -> None:
    """Add into ``.grad`` as autograd's AccumulateGrad would, post-accumulate-grad hooks included (the
    gradient reducer's buckets; ``train.weight_cast = "per_step"``'s move into the FP32 master)."""
    from dsv3.train.compute_weights import run_post_accumulate_grad_hooks
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone() if g.requires_grad else g
        else:
            p.grad += g
        run_post_accumulate_grad_hooks(p)


def backward_input(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None],
                   inp: torch.Tensor | None, params: Sequence[torch.nn.Parameter]
                   ) -> tuple[torch.Tensor | None, WeightGrad]:
    """B: dL/d(inp) now, and the W that completes the backward later.

    outputs/grad_outputs: the stage's differentiable outputs and their gradients (None = a scalar loss,
    seeded with 1). inp: the stage input (a leaf with requires_grad) or None for the first chunk.
    """
    pairs = [(o, torch.ones_like(o) if g is None else g) for o, g in zip(outputs, grad_outputs)
             if o is not None and o.requires_grad]
    outs, gouts = [o for o, _ in pairs], [g for _, g in pairs]
    params = [p for p in params if p.requires_grad]
    if not outs:
        return None, WeightGrad([], None)
    if inp is None or not inp.requires_grad:
        return None, WeightGrad([], (outs, gouts, params))   # nothing to send: the whole backward is W

    rev = _consumers([o.grad_fn for o in outs if o.grad_fn is not None])
    in_node = grad_node(inp)
    if in_node not in rev:   # the outputs do not depend on the input
        return torch.zeros_like(inp), WeightGrad([], (outs, gouts, params))
    on_input_path, _ = _closure([in_node], rev, set())

    # Group parameters by their join nodes (union-find over shared join nodes).
    parent: dict[Node, Node] = {}

    def find(n):
        while parent.setdefault(n, n) is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    joins_of: list[tuple[torch.nn.Parameter, set[Node]]] = []
    direct_params = []
    for p in params:
        node = grad_node(p)
        if node not in rev:
            continue                       # not used by this stage's graph
        _, joins = _closure([node], rev, on_input_path)
        if not joins:
            direct_params.append(p)
            continue
        joins_of.append((p, joins))
        first = next(iter(joins))
        for j in joins:
            parent[find(j)] = find(first)
    grouped: dict[Node, tuple[set[Node], list]] = {}
    for p, joins in joins_of:
        root = find(next(iter(joins)))
        nodes, ps = grouped.setdefault(root, (set(), []))
        nodes.update(joins)
        ps.append(p)

    groups = []
    handles = []
    now_params = []     # joining at an opaque node (module docstring): differentiated in B
    for nodes, ps in grouped.values():
        if any(isinstance(n, BackwardCFunction) for n in nodes):
            now_params.extend(ps)
            continue
        nodes = list(nodes)
        recorded: list = [None] * len(nodes)
        for i, node in enumerate(nodes):
            def hook(grads, i=i, recorded=recorded):
                recorded[i] = tuple(None if g is None else g.detach() for g in grads)
            handles.append(node.register_prehook(hook))
        groups.append((nodes, recorded, ps))
    try:
        d_inp, *now_grads = torch.autograd.grad(outs, [inp, *now_params], grad_outputs=gouts, retain_graph=True,
                                                allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    _accumulate(now_params, now_grads)
    if d_inp is None:
        d_inp = torch.zeros_like(inp)
    direct = (outs, gouts, direct_params) if direct_params else None
    # Strong owners of the graph: a view's backward node holds its base's grad_fn (built-in or custom) through
    # a C++ edge, whatever the caller later does to the output tensors (free them, detach them in place).
    keep = [o.view_as(o).grad_fn for o in outs if o.grad_fn is not None]
    return d_inp, WeightGrad(groups, direct, keep)


def backward_full(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None],
                  inp: torch.Tensor | None) -> torch.Tensor | None:
    """B and W at once: accumulate weight gradients and return dL/d(inp) (None for a first chunk)."""
    pairs = [(o, torch.ones_like(o) if g is None else g) for o, g in zip(outputs, grad_outputs)
             if o is not None and o.requires_grad]
    if not pairs:
        return None
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    if inp is None or not inp.requires_grad:
        return None
    return inp.grad if inp.grad is not None else torch.zeros_like(inp)
