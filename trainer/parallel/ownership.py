"""What each pipeline stage owns: the tensors its units' updates change, which every other rank
receives from it at an epoch's end, and whose optimizer state moves with them when the cut moves.

Every process builds the whole model (the same seed gives the same parameters) but runs and
updates only its stage's units: activations, graphs and optimizer state are per stage, parameters
are not.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ConfigError
from trainer.parallel.processes import DistEnv
from trainer.parallel.transport import state_tensors
from trainer.passes import uncounted_pass
from trainer.rules.base import Rule
from trainer.rules.unit_rule import UnitRule
from trainer.units import State, detach_state, used_parameters


def owned_state(units: Sequence[nn.Module], model: nn.Module, x: torch.Tensor, rule: Rule) -> list[list[torch.Tensor]]:
    """Per unit, the tensors its updates change: the parameters its forward uses (autograd on one
    training-mode pass: a ResNet layer unit holds its whole block but uses one conv and BN), the
    buffers of the modules it calls (BatchNorm statistics), and the rule's own parameters of it."""
    called: set[nn.Module] = set()
    with_buffers = {m for unit in units for m in unit.modules() if next(m.buffers(recurse=False), None) is not None}
    hooks = [m.register_forward_pre_hook(lambda module, args: called.add(module)) for m in with_buffers]
    owned: list[list[torch.Tensor]] = []
    try:
        with uncounted_pass(model), torch.enable_grad():
            state: State = x
            for index, unit in enumerate(units):
                called.clear()
                out = unit(detach_state(state))
                outputs = [t.float() for t in state_tensors(out) if t.requires_grad]
                params = used_parameters(unit, sum(t.sum() for t in outputs)) if outputs else []
                buffers = [b for m in called for b in m.buffers(recurse=False)]
                extra = rule.unit_rule_parameters(index) if isinstance(rule, UnitRule) else []
                owned.append([*params, *buffers, *extra])
                state = detach_state(out)
    finally:
        for hook in hooks:
            hook.remove()
    return owned


def stage_state(owned: list[list[torch.Tensor]], ranges: list[range], names: Sequence[str]) -> list[list[torch.Tensor]]:
    """Each stage's tensors (in a fixed order); a tensor two stages would both change is refused."""
    per_stage: list[list[torch.Tensor]] = []
    owner: dict[int, int] = {}
    for stage, r in enumerate(ranges):
        tensors = {}
        for index in r:
            for t in owned[index]:
                if owner.setdefault(id(t), stage) != stage:
                    raise ConfigError(f"a tensor of shape {tuple(t.shape)} is used by unit {names[index]!r} on stage "
                                      f"{stage} and by a unit on stage {owner[id(t)]} (shared weights): a pipeline "
                                      "keeps each parameter on one stage; move train.stage_boundaries")
                tensors[id(t)] = t
        per_stage.append(list(tensors.values()))
    return per_stage


@torch.no_grad()
def broadcast_stage_state(per_stage: list[list[torch.Tensor]], env: DistEnv) -> None:
    """Every rank of the pipeline gets what each stage trained (one broadcast per stage and dtype)."""
    for stage, tensors in enumerate(per_stage):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = collections.defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=env.rank_of(stage), group=env.pipeline_group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def move_optimizer_state(optimizer: torch.optim.Optimizer, old: list[list[torch.Tensor]],
                         new: list[list[torch.Tensor]], env: DistEnv) -> None:
    """The optimizer state of the parameters that change stage goes from their old stage's rank to
    their new one's (one object broadcast per stage), which then steps them exactly as the old did;
    the old one drops it, so its stage part holds its own parameters only."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    stage_of = {id(t): stage for stage, tensors in enumerate(new) for t in tensors}
    state = optimizer.state_dict()
    kept = dict(state["state"])
    for stage, tensors in enumerate(old):
        moving = [index[id(t)] for t in tensors if id(t) in index and stage_of[id(t)] != stage]
        sent: list[Any] = [None]
        if env.stage == stage:
            sent = [{i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in kept.pop(i).items()}
                     for i in moving if i in kept}]
        dist.broadcast_object_list(sent, src=env.rank_of(stage), group=env.pipeline_group)
        kept.update({i: entry for i, entry in sent[0].items() if stage_of[id(params[i])] == env.stage})
    optimizer.load_state_dict({"state": kept, "param_groups": state["param_groups"]})  # onto the parameters' devices
