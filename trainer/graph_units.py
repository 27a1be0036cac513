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

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# the main stack of blocks of common architectures, for granularity = "children"
BLOCK_CONTAINERS = ("features", "encoder.layers", "stages", "layers", "blocks", "trunk")

# elementwise activations a cut moves past, so that a unit's output h is after its activation
# (the signal at h then passes through the activation's derivative), whether the forward calls
# them as functions, tensor methods or modules
ACTIVATION_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu,
                        F.hardswish, F.hardsigmoid, F.mish, F.selu, F.celu, F.softplus, F.tanh, F.sigmoid,
                        F.hardtanh, torch.tanh, torch.sigmoid}
ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid,
                      nn.Mish, nn.SELU, nn.CELU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.PReLU)
# what torch.fx adds for a forward argument traced at its default value (an assertion of it)
_SPECIALISATION_CHECKS = {fx._symbolic_trace._assert_is_none, torch._assert, operator.eq}


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
    if len(children) < 2:
        return [], (f"units: the whole model (granularity = \"children\" finds no block stack "
                    f"({', '.join(BLOCK_CONTAINERS)}) and {len(children)} top-level child to cut after)")
    shown = ", ".join(children[:-1]) if len(children) <= 8 else f"{', '.join(children[:6])}, ... {children[-2]}"
    return children[:-1], f"units: after each top-level child but the last ({shown}), then {children[-1]}"


def trace(model: nn.Module, cuts: list[str]) -> fx.GraphModule:
    """The model's graph with the cut modules and markers as single nodes; a clear error otherwise."""
    modules = dict(model.named_modules())
    unknown = [name for name in cuts if name not in modules]
    if unknown:
        children = ", ".join(name for name, _ in list(model.named_children())[:6])
        raise ValueError(f"units: {', '.join(map(repr, unknown))} names no submodule of {type(model).__name__} "
                         f"(its children: {children}, ...; nested names look like 'features.3')")
    try:
        graph = _CutTracer(set(cuts)).trace(model, concrete_args=_defaults(model))
    except Exception as err:
        raise ValueError(
            f"units: {type(model).__name__}'s forward cannot be traced by torch.fx ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); keep Python control flow on tensor values inside a submodule "
            "named as a cut (it stays whole), or make the model an nn.Sequential whose children are the units "
            "(they need not be traceable)") from None
    _drop_specialised_inputs(graph)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")


def _defaults(model: nn.Module) -> dict[str, object]:
    """The forward's arguments after the first that have defaults (timm's ``attn_mask=None``, a
    flag): traced at those values, so a forward with optional extras still has one input."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders of the arguments traced at their defaults (``_defaults``), with the
    assertions fx adds on them: a unit graph has one input, the state. A placeholder used by
    anything else (an argument without a default) stays, and is refused by ``cut_units``."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        checks, frontier = [], [node]
        while frontier:
            for user in frontier.pop().users:
                if user.op == "call_function" and user.target in _SPECIALISATION_CHECKS and user not in checks:
                    checks.append(user)
                    frontier.append(user)
        if node.args and all(u in checks for n in (node, *checks) for u in n.users):  # args: (default,)
            for check in reversed(checks):
                graph.erase_node(check)
            graph.erase_node(node)


def _past_activations(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """``node``, or the last of the elementwise activations applied to it alone, in a chain."""
    while len(node.users) == 1:
        (user,) = node.users
        if not user.args or user.args[0] is not node:
            break
        if not ((user.op == "call_function" and user.target in ACTIVATION_FUNCTIONS)
                or (user.op == "call_method" and user.target in ACTIVATION_METHODS)
                or (user.op == "call_module" and isinstance(modules.get(user.target), ACTIVATION_MODULES))):
            break
        node = user
    return node


def _item(state: tuple, position: int) -> object:
    """Element ``position`` of a carried state (one node of a unit's graph)."""
    return state[position]


def cut_units(model: nn.Module, cuts: list[str]) -> list[tuple[str, nn.Module]]:
    """``model`` cut after each module in ``cuts`` and at each ``UnitEnd`` marker, in execution order;
    the last unit ends at the model's output. Each unit is named by its cut (the last: "output")."""
    gm = trace(model, cuts)
    nodes = list(gm.graph.nodes)
    inputs = [n.target for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"units: {type(model).__name__}'s forward takes several inputs ({', '.join(inputs)}) without "
                         "defaults; local rules need one: give the others defaults, or wrap the model in a module "
                         "whose forward takes the images alone")
    wanted = set(cuts) | set(markers(model))
    cut_nodes = [n for n in nodes if n.op == "call_module" and n.target in wanted]
    missing = sorted(set(cuts) - {n.target for n in cut_nodes})
    if missing:
        raise ValueError(f"units: {', '.join(map(repr, missing))} is never called by {type(model).__name__}'s forward")
    repeated = sorted({n.target for n in cut_nodes if sum(m.target == n.target for m in cut_nodes) > 1})
    if repeated:
        raise ValueError(f"units: {', '.join(repeated)} runs more than once in the forward; cut at modules that run once")
    # a cut after a module lands after the activations applied to it (a marker stays where it is);
    # two cuts that then meet (bn1 and the relu after it) are one, named by the later
    modules = dict(model.named_modules())
    ends = [n if isinstance(modules[n.target], UnitEnd) else _past_activations(n, modules) for n in cut_nodes]
    names = [n.target for n in cut_nodes]
    keep = [k for k in range(len(ends)) if k + 1 == len(ends) or ends[k] is not ends[k + 1]]
    cut_nodes, names = [ends[k] for k in keep], [names[k] for k in keep]
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
            name = names[k]
        else:
            graph.output(fx.node.map_arg(output.args[0], lookup))
            name = "output"
        units.append((name, fx.GraphModule(gm, graph, class_name="GraphUnit")))
    return units
