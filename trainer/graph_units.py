"""Units of any model, cut from its traced graph: what lets the local rules reach torchvision's zoo,
vision transformers and a user's own modules.

The model's forward is traced with ``torch.fx`` (the modules named as cuts, and ``UnitEnd``
markers, kept whole; the modules that hold one traced through, torch.nn containers included) and
cut after each named submodule, or at each marker, in execution order. A forward fx cannot trace
is refused naming the module and line it failed at. A forward of several inputs (token ids and a
mask, as ``RuleContext.example_input`` gives them) has a first unit that takes their tuple.
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

import functools
import inspect
import linecache
import operator
import os
import traceback

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


def _encoder_forward(self: nn.TransformerEncoder, src: torch.Tensor, mask: torch.Tensor | None = None,
                     src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` as torch.fx can trace it: its layers in turn, then its norm.
    Its own forward decides a fast path from tensor properties, which fx cannot read; this is its
    training-mode path (each layer checks its masks itself; a mask given without ``is_causal``
    is applied as the mask it is). Its eval-time nested-tensor path, which outputs zeros at padded
    positions, is not taken: those positions' outputs differ, and nothing reads them."""
    output = src
    for layer in self.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return output if self.norm is None else self.norm(output)


def _encoder_layer_forward(self: nn.TransformerEncoderLayer, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                           src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward``'s training-mode path, which torch.fx can trace."""
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + self._ff_block(self.norm2(x))
    x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return self.norm2(x + self._ff_block(x))


def _decoder_forward(self: nn.TransformerDecoder, tgt: torch.Tensor, memory: torch.Tensor,
                     tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                     tgt_key_padding_mask: torch.Tensor | None = None,
                     memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                     memory_is_causal: bool = False) -> torch.Tensor:
    """``nn.TransformerDecoder.forward`` as torch.fx can trace it (as ``_encoder_forward``)."""
    output = tgt
    for layer in self.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                       tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return output if self.norm is None else self.norm(output)


# torch.nn containers whose own forward fx cannot trace: what the tracer runs instead when a cut
# lies inside one (the same computation; the others are traced through as they are)
TRACEABLE_FORWARDS = {nn.TransformerEncoder: _encoder_forward, nn.TransformerEncoderLayer: _encoder_layer_forward,
                      nn.TransformerDecoder: _decoder_forward}


class _CutTracer(fx.Tracer):
    """Keeps the cut modules and the markers whole, so that each is one node of the graph, and
    traces through every module that holds one, torch.nn's containers included (fx keeps those
    whole by default): ``nn.Sequential``, ``nn.ModuleList`` loops, ``nn.TransformerEncoder``'s
    layers (by ``TRACEABLE_FORWARDS``)."""

    def __init__(self, whole: set[str], marked: set[str]):
        super().__init__()
        self.whole = whole  # the cuts; ``marked``: the UnitEnd markers; both held by ``holders``
        self.holders = {".".join(parts[:i]) for parts in (name.split(".") for name in whole | marked)
                        for i in range(1, len(parts))}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.whole or isinstance(module, UnitEnd):
            return True
        return qualified_name not in self.holders and super().is_leaf_module(module, qualified_name)

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict):  # fx's signature
        traceable = TRACEABLE_FORWARDS.get(type(m))
        if traceable is not None and self.path_of_module(m) in self.holders:
            forward = functools.partial(traceable, m)
        return super().call_module(m, forward, args, kwargs)


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


def trace(model: nn.Module, cuts: list[str], inputs: int = 1) -> fx.GraphModule:
    """The model's graph with the cut modules and markers as single nodes, its first ``inputs``
    arguments as inputs; a clear error otherwise, naming the module and the line fx failed at."""
    modules = dict(model.named_modules())
    unknown = [name for name in cuts if name not in modules]
    if unknown:
        children = ", ".join(name for name, _ in list(model.named_children())[:6])
        raise ValueError(f"units: {', '.join(map(repr, unknown))} names no submodule of {type(model).__name__} "
                         f"(its children: {children}, ...; nested names look like 'features.3')")
    try:
        graph = _CutTracer(set(cuts), set(markers(model))).trace(model, concrete_args=_defaults(model, inputs))
    except Exception as err:  # noqa: BLE001 -- torch.fx raises anything a forward can: named with its line
        name, line = _failure_site(model, err)
        if name:
            where = f" in {name!r} ({type(modules[name]).__name__}, {line})"
            fix = (f"cut at {name!r} or at a module that holds it (a named cut stays whole and need not be "
                   "traceable: list coarser units), or mark the unit boundaries with UnitEnd in a forward torch.fx "
                   "can trace")
        else:
            where = f" in its own forward ({line})" if line else ""
            fix = ("mark the unit boundaries with UnitEnd, and keep Python control flow on tensor values (len(x), "
                   "if x.sum() > 0, ...) inside a submodule named as a cut (it stays whole)")
        raise ValueError(
            f"units: {type(model).__name__}'s forward cannot be traced by torch.fx{where}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}; {fix}, or make the model an nn.Sequential whose children are "
            "the units (they need not be traceable)") from None
    _drop_specialised_inputs(graph)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")


_TRACING_MACHINERY = (os.path.dirname(fx.__file__), inspect.getsourcefile(nn.Module))


def _failure_site(model: nn.Module, err: BaseException) -> tuple[str | None, str]:
    """Where tracing failed: the innermost module of ``model`` whose forward was running (its
    qualified name, "" for the model itself; None if none was), and its file, line and code there."""
    names = {id(module): name for name, module in model.named_modules()}
    site: tuple[str | None, str] = (None, "")
    for frame, number in traceback.walk_tb(err.__traceback__):
        code = frame.f_code
        path, module = code.co_filename, frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        if isinstance(module, nn.Module) and id(module) in names and not path.startswith(_TRACING_MACHINERY):
            text = linecache.getline(path, number).strip()
            site = (names[id(module)], f"{os.path.basename(path)}:{number}: {text}")
    return site


def _defaults(model: nn.Module, inputs: int = 1) -> dict[str, object]:
    """The forward's arguments after its ``inputs`` first that have defaults (timm's
    ``attn_mask=None``, a flag): traced at those values, so a forward with optional extras still
    has its ``inputs`` inputs alone."""
    params = list(inspect.signature(model.forward).parameters.values())[inputs:]
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


def _landing(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A node of the graph as ``describe`` names where a cut landed."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    return f"{getattr(node.target, '__module__', None) or 'torch'}.{getattr(node.target, '__name__', node.target)}()"


def cut_units(model: nn.Module, cuts: list[str], inputs: int = 1) -> list[tuple[str, nn.Module]]:
    """``model`` cut after each module in ``cuts`` and at each ``UnitEnd`` marker, in execution order;
    the last unit ends at the model's output. Each unit is named by its cut (the last: "output"),
    and says in ``cut_after`` after which module or operation it ends. A forward of ``inputs``
    inputs (``RuleContext.example_input``'s tuple) gives a first unit that takes their tuple."""
    gm = trace(model, cuts, inputs)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != inputs:
        names, model_name = ", ".join(n.target for n in placeholders), type(model).__name__
        if len(placeholders) < inputs:
            raise ValueError(f"units: {model_name}'s forward takes {len(placeholders)} input(s) ({names}), but "
                             f"RuleContext.example_input gives {inputs}: give one example tensor per input")
        given = "one input" if inputs == 1 else f"{inputs} inputs (RuleContext.example_input)"
        raise ValueError(f"units: {model_name}'s forward takes several inputs ({names}) without defaults, but the rule "
                         f"was given {given}: give the others defaults, pass an example of each as "
                         "RuleContext(example_input=(x, mask, ...)) and batches as that tuple, or wrap the model in a "
                         "module whose forward takes one input")
    wanted = set(cuts) | set(markers(model))
    cut_nodes = [n for n in nodes if n.op == "call_module" and n.target in wanted]
    missing = sorted(set(cuts) - {n.target for n in cut_nodes})
    if missing:
        whole = {name: next((cut for cut in cuts if name.startswith(cut + ".")), None) for name in missing}
        inside = "".join(f"; {name!r} lies inside {cut!r}, itself a cut, kept whole: name one of the two"
                         for name, cut in whole.items() if cut)
        raise ValueError(f"units: {', '.join(map(repr, missing))} is never called by {type(model).__name__}'s forward"
                         f"{inside}")
    repeated = sorted({n.target for n in cut_nodes if sum(m.target == n.target for m in cut_nodes) > 1})
    if repeated:
        raise ValueError(f"units: {', '.join(repeated)} runs more than once in the forward; cut at modules that run once")
    # a cut after a module lands after the activations applied to it (a marker stays where it is);
    # two cuts that then meet (bn1 and the relu after it) are one, named by the later
    modules = dict(model.named_modules())
    ends = [n if isinstance(modules[n.target], UnitEnd) else _past_activations(n, modules) for n in cut_nodes]
    names = [n.target for n in cut_nodes]
    keep = [k for k in range(len(ends)) if k + 1 == len(ends) or ends[k] is not ends[k + 1]]
    landed = [_landing(ends[k], modules) + ("" if ends[k] is cut_nodes[k] else
                                            f" applied to {_landing(cut_nodes[k], modules)}") for k in keep]
    cut_nodes, names = [ends[k] for k in keep], [names[k] for k in keep]
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=-1) for n in nodes}
    output = nodes[-1]
    # the state after cut c: the cut's output, then every value made by then that is used later
    states = []
    for cut in cut_nodes:
        made = [n for n in nodes[:position[cut] + 1] if n.op not in ("get_attr", "output")]
        states.append([cut, *(n for n in made if n is not cut and last_use[n] > position[cut])])
    reads = [placeholders, *states]  # what each unit reads: the model's inputs, then the previous state
    units = []
    for k, live_in in enumerate(reads):
        start = position[live_in[0]] + 1 if k else len(placeholders)
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
        unit = fx.GraphModule(gm, graph, class_name="GraphUnit")
        unit.cut_after = landed[k] if k < len(cut_nodes) else "the model's output"
        units.append((name, unit))
    return units
