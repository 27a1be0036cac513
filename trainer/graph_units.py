"""Units of any model, cut from its traced graph: what lets the local rules reach torchvision's zoo,
vision transformers and a user's own modules.

The model's forward is traced with ``torch.fx`` (the modules named as cuts, and ``UnitEnd``
markers, kept whole) and cut after each named submodule, or at each marker, in execution order.
Unit k runs the graph's nodes after cut k-1 up to cut k. Every value that crosses a cut besides
the cut's own output (a skip connection, a branch concatenated later, the input itself, a class
token) is carried in the unit's output state after it, so running the units in order gives
exactly the model's output. A state is ``h_k`` or ``(h_k, *carried)``: ``h_k``, the output of the
cut module (a marker's output is its input), is what the rules treat as the unit's output (DFA
and DRTP project onto it, its shape sizes their matrices); carried values are detached at the
boundary like ``h_k`` and receive no signal, so a skip that crosses a cut sends no gradient back
through it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

# the main stack of blocks of common architectures, for granularity = "children"
BLOCK_CONTAINERS = ("features", "encoder.layers", "stages", "layers", "blocks", "trunk")


class UnitEnd(nn.Module):
    """Marks the end of a unit inside a user's forward: the identity, and a cut for the local rules
    (like TinyDFA's DFALayer). Its input becomes the unit's output ``h``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _CutTracer(fx.Tracer):
    """Keeps the cut modules and the markers whole, so that each is one node of the graph."""

    def __init__(self, whole: set[str]):
        super().__init__()
        self.whole = whole

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (qualified_name in self.whole or isinstance(module, UnitEnd)
                or super().is_leaf_module(module, qualified_name))


def markers(model: nn.Module) -> list[str]:
    """The qualified names of the ``UnitEnd`` markers in ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, UnitEnd)]


def children_cuts(model: nn.Module) -> tuple[list[str], str]:
    """Cuts for ``granularity = "children"``: after each block of the model's main block container
    (the first of ``BLOCK_CONTAINERS`` it has, with at least two blocks), else after each top-level
    child but the last; and a note saying which was picked."""
    modules = dict(model.named_modules())
    for name in BLOCK_CONTAINERS:
        container = modules.get(name)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) >= 2:
            cuts = [f"{name}.{child}" for child, _ in container.named_children()]
            return cuts, f"units: after each of the {len(cuts)} blocks of {name}, then the rest of the model"
    children = [name for name, _ in model.named_children()]
    return children[:-1], f"units: after each of the top-level children {', '.join(children[:-1])}, then {children[-1]}"


def trace(model: nn.Module, cuts: list[str]) -> fx.GraphModule:
    """The model's graph with the cut modules and markers as single nodes; a clear error otherwise."""
    modules = dict(model.named_modules())
    unknown = [name for name in cuts if name not in modules]
    if unknown:
        children = ", ".join(name for name, _ in list(model.named_children())[:6])
        raise ValueError(f"units: {', '.join(map(repr, unknown))} names no submodule of {type(model).__name__} "
                         f"(its children: {children}, ...; nested names look like 'features.3')")
    try:
        graph = _CutTracer(set(cuts)).trace(model)
    except Exception as err:
        raise ValueError(
            f"units: {type(model).__name__}'s forward cannot be traced by torch.fx ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); keep Python control flow on tensor values inside a submodule "
            "named as a cut (it stays whole), or make the model an nn.Sequential whose children are the units "
            "(they need not be traceable)") from None
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")


def _item(state: tuple, position: int) -> object:
    """Element ``position`` of a carried state (one node of a unit's graph)."""
    return state[position]


def cut_units(model: nn.Module, cuts: list[str]) -> list[tuple[str, nn.Module]]:
    """``model`` cut after each module in ``cuts`` and at each ``UnitEnd`` marker, in execution order;
    the last unit ends at the model's output. Each unit is named by its cut (the last: "output")."""
    gm = trace(model, cuts)
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise ValueError(f"units: {type(model).__name__}'s forward takes several inputs; local rules need one")
    wanted = set(cuts) | set(markers(model))
    cut_nodes = [n for n in nodes if n.op == "call_module" and n.target in wanted]
    missing = sorted(set(cuts) - {n.target for n in cut_nodes})
    if missing:
        raise ValueError(f"units: {', '.join(map(repr, missing))} is never called by {type(model).__name__}'s forward")
    repeated = sorted({n.target for n in cut_nodes if sum(m.target == n.target for m in cut_nodes) > 1})
    if repeated:
        raise ValueError(f"units: {', '.join(repeated)} runs more than once in the forward; cut at modules that run once")
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=-1) for n in nodes}
    output = nodes[-1]
    # the state after cut c: the cut's output, then every value made by then that is used later
    states = []
    for cut in cut_nodes:
        made = [n for n in nodes[:position[cut] + 1] if n.op not in ("get_attr", "output")]
        states.append([cut, *(n for n in made if n is not cut and last_use[n] > position[cut])])
    inputs = [[nodes[0]], *states]  # what each unit reads: the model input, then the previous state
    units = []
    for k, live_in in enumerate(inputs):
        start = position[live_in[0]] + 1 if k else 1
        stop = position[cut_nodes[k]] if k < len(cut_nodes) else position[output] - 1
        graph = fx.Graph()
        state = graph.placeholder("state")
        env = {node: graph.call_function(_item, (state, i)) for i, node in enumerate(live_in)} \
            if len(live_in) > 1 else {live_in[0]: state}

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env and node.op == "get_attr":  # parameters read directly (e.g. a class token)
                env[node] = graph.get_attr(node.target)
            return env[node]

        for node in nodes[start:stop + 1]:
            if node.op != "get_attr":
                env[node] = graph.node_copy(node, lookup)
        if k < len(cut_nodes):
            out = states[k]
            graph.output(lookup(out[0]) if len(out) == 1 else tuple(lookup(n) for n in out))
            name = cut_nodes[k].target
        else:
            graph.output(fx.node.map_arg(output.args[0], lookup))
            name = "output"
        units.append((name, fx.GraphModule(gm, graph, class_name="GraphUnit")))
    return units
