"""Backprop through a pipeline of processes: the baseline that unit-parallel local rules are held against.

A model's units are split into S contiguous stages, one per process. Backprop cannot run the
stages concurrently on one batch (stage s waits for s−1's activations, then for s+1's gradients),
so the batch is cut into M micro-batches and the stages work on different micro-batches at once.
This module does not schedule that itself: it hands the stage to PyTorch's own engine,
``torch.distributed.pipelining`` (``PipelineStage`` with ``ScheduleGPipe`` or ``Schedule1F1B``),
so the baseline is the one a practitioner would use, not a home-made one.

GPipe runs all M forwards, then all M backwards (fill, drain). 1F1B (in torch: S−s warm-up
forwards on stage s, then one backward and one forward alternating) lets a stage hold at most S
micro-batches' activations instead of M. Both leave the same idle "bubble": each stage waits
S−1 slots of a schedule of M+S−1 slots per direction, a fraction (S−1)/(M+S−1) of the step
(with S=4: 43 % at M=4, 16 % at M=16). 1F1B saves memory, not time; only more micro-batches
(smaller ones, so less efficient kernels) shrink the bubble. Forward-only local rules have no
backward wave to wait for, which is the comparison this baseline exists for.

The update is exactly one-process backprop on the full batch with the mean loss: each
micro-batch's loss is the criterion's mean over that micro-batch, the engine accumulates the
M backwards into ``.grad`` and then divides by M (``scale_grads=True``, its
``perform_reduce_grad(M)`` after the last backward), which is gradient accumulation of loss_m / M.

The stages are built from static metadata (each stage's ``input_template`` and a dry forward of
it), so the engine skips its own shape-inference round; the templates must therefore be what the
previous stage really sends, dtype included (bf16 under CUDA autocast), which the constructor
checks across the stages. A stage's received input is an autograd leaf: its first unit must not
modify it in place.

``torch.distributed.pipelining`` is imported when a stage is built: importing it takes seconds
(it loads ``torch._dynamo``), which only a backprop pipeline should pay.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Literal, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.passes import evaluation_mode
from trainer.rules.base import StepResult, apply_step
from trainer.units import State, primary

Schedule = Literal["gpipe", "1f1b"]
SCHEDULES: dict[str, str] = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}  # torch.distributed.pipelining classes

# What crosses a stage boundary, as compared across ranks: (is a tuple, ((shape, dtype), ...)).
_Signature = tuple[bool, tuple[tuple[tuple[int, ...], str], ...]]


class _BoundaryError(ValueError):
    """A state at a stage boundary holds something the engine cannot send."""

    def __init__(self, message: str, side: Literal["input", "output"]):
        super().__init__(message)
        self.side = side


def _as_tensors(state: object, where: str, side: Literal["input", "output"]) -> tuple[bool, tuple[torch.Tensor, ...]]:
    """A state as the flat tensors the engine sends (it sends tensors only, one message each)."""
    items = state if isinstance(state, tuple) else (state,)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise _BoundaryError(f"the state at {where} holds a {type(item).__name__} at position {i}; "
                                 "a pipeline stage boundary can carry tensors only", side)
    return isinstance(state, tuple), tuple(items)


def _signature(is_tuple: bool, tensors: Sequence[torch.Tensor]) -> _Signature:
    return is_tuple, tuple((tuple(t.shape), str(t.dtype)) for t in tensors)


class _StageModule(nn.Module):
    """This stage's units as the one module the engine runs: positional tensors in, tensors out.

    The engine passes a boundary's tuple as separate arguments, so the tuple is rebuilt here
    before the first unit and flattened after the last; the forward runs under ``autocast``
    because the engine calls the module itself, outside any context the caller could set.
    """

    def __init__(self, units: Sequence[nn.Module], input_is_tuple: bool, is_last: bool,
                 autocast: Callable[[], ContextManager]):
        super().__init__()
        self.units = nn.ModuleList(units)  # shares the parameters with the model
        self.input_is_tuple = input_is_tuple
        self.is_last = is_last
        self.autocast = autocast
        self.where_out = "the output of this stage"  # set by BackpropStage to the unit boundary

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        state: State = tuple(tensors) if self.input_is_tuple else tensors[0]
        with self.autocast():
            for unit in self.units:
                state = unit(state)
        if self.is_last:
            return primary(state)  # the logits
        is_tuple, out = _as_tensors(state, self.where_out, "output")
        out = tuple(t.contiguous() for t in out)  # sends need dense memory; the receiver's buffer is dense
        return out if is_tuple else out[0]


class BackpropStage:
    """This process's stage of end-to-end backprop over S processes, run by torch.distributed.pipelining."""

    def __init__(self, units: list[nn.Module], stage: int, stages: int, group: dist.ProcessGroup | None,
                 device: torch.device, micro_batches: int, schedule: Schedule,
                 criterion: nn.Module, input_template: State, autocast: Callable[[], ContextManager]):
        """Build this process's stage; every stage of the pipeline must construct it at the same time.

        ``units`` are this stage's units only (sharing parameters with the model); ``input_template``
        is one micro-batch of this stage's input state, from which the engine's buffers are sized
        (static metadata, so its first step runs no shape-inference round). The stages exchange what
        they send and expect once here (one small all-gather), so a template that does not match what
        the previous stage emits, or a boundary carrying a non-tensor, fails on every rank with one
        ValueError instead of hanging in a receive.
        """
        from torch.distributed import pipelining  # noqa: PLC0415 (seconds to import: see the module's docstring)

        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {sorted(SCHEDULES)}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if not units:
            raise ValueError(f"stage {stage} has no units")
        if dist.get_world_size(group) != stages or dist.get_rank(group) != stage:
            raise ValueError(f"stage {stage} of {stages} needs a process group of {stages} ranks in stage "
                             f"order; this process is rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
        self.stage, self.stages, self.group = stage, stages, group
        self.device = torch.device(device)
        self.micro_batches = micro_batches
        self.is_first, self.is_last = stage == 0, stage == stages - 1

        # What this stage receives and sends, found locally; a failure is only recorded here and
        # raised after the exchange below, on every rank, so that no stage is left waiting.
        error, side, cause = "", "", None
        in_tuple, inputs, outputs = False, (), ()
        try:
            in_tuple, in_tensors = _as_tensors(input_template, f"the input of stage {stage}", "input")
            self.micro_batch = in_tensors[0].shape[0]
            self.module = _StageModule(units, in_tuple, self.is_last, autocast).to(self.device)
            self.module.where_out = f"the output of stage {stage}"
            # Received activations are leaves the backward stops at: they need requires_grad, and
            # both sides of a boundary must agree on which tensors get a gradient sent back (here:
            # every floating tensor; one that needs none gets zeros).
            inputs = tuple(t.detach().to(self.device).contiguous()
                           .requires_grad_(not self.is_first and t.is_floating_point()) for t in in_tensors)
            outputs = self._dry_forward(inputs)
        except Exception as exc:  # noqa: BLE001 -- any failure is the stage's message to every rank
            error, cause = f"stage {stage}: {exc}", exc
            side = exc.side if isinstance(exc, _BoundaryError) else ""
        out_tuple = isinstance(outputs, tuple)
        out_tensors = outputs if isinstance(outputs, tuple) else (outputs,)
        mine = dict(units=[type(u).__name__ for u in units], error=error, side=side,
                    input=_signature(in_tuple, inputs), output=_signature(out_tuple, out_tensors))
        everyone: list[dict] = [{} for _ in range(stages)]
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            dist.all_gather_object(everyone, mine, group=group)
        self._raise_for(everyone, cause)
        self.module.where_out = self._boundary(everyone, stage + 1)
        self.x_shape = everyone[0]["input"][1][0][0][1:]  # stage 0's micro-batch, less its batch dimension
        last_shape, last_dtype = everyone[-1]["output"][1][0]
        self.classes = last_shape[-1]
        self.logits_dtype = getattr(torch, last_dtype.removeprefix("torch."))

        output_args = tuple(torch.empty_like(t).requires_grad_(t.is_floating_point()) for t in out_tensors)
        self.pipeline_stage = pipelining.PipelineStage(
            self.module, stage, stages, self.device, input_args=inputs,
            output_args=output_args, group=group)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with autocast():  # the engine calls the loss outside the module's forward
                return criterion(logits, target)

        # scale_grads=True: the engine divides the accumulated gradients by M after the last
        # backward, which turns M per-micro-batch mean losses into the full batch's mean.
        self.schedule = getattr(pipelining, SCHEDULES[schedule])(self.pipeline_stage, micro_batches, loss_fn=loss_fn,
                                                                 scale_grads=True)

    def _dry_forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """This stage's output for the template, to size what it sends (and the last stage's classes).

        In eval mode and without grad, so BatchNorm statistics and dropout's RNG are untouched; each
        module's own training flag is restored afterwards."""
        with evaluation_mode(self.module), torch.no_grad():
            out = self.module(*(t.detach() for t in inputs))
        if self.is_last and (out.dim() != 2 or out.shape[0] != self.micro_batch):
            raise ValueError(f"the last unit returns shape {tuple(out.shape)}, not logits "
                             f"(micro_batch={self.micro_batch}, classes)")
        return out

    @staticmethod
    def _boundary(everyone: list[dict], s: int) -> str:
        """The unit boundary in front of stage ``s`` (s = S: after the last unit), in global unit indices."""
        k = sum(len(info["units"]) for info in everyone[:s])
        before = f"unit {k - 1} ({everyone[s - 1]['units'][-1]}, stage {s - 1})" if s > 0 else "the model input"
        after = f"unit {k} ({everyone[s]['units'][0]}, stage {s})" if s < len(everyone) else "the loss"
        return f"the boundary between {before} and {after}"

    def _raise_for(self, everyone: list[dict], cause: BaseException | None) -> None:
        """The same ValueError on every rank for the first problem of any stage, in the order: a
        non-tensor at a boundary, a boundary whose sent tensors differ from the receiving stage's
        template (shape, dtype, tuple or not), any other failure of a stage's dry forward."""
        problems: list[tuple[int, int, str]] = []  # (order, stage that found it, message)
        for s, info in enumerate(everyone):
            if info["error"] and info["side"]:
                where = self._boundary(everyone, s if info["side"] == "input" else s + 1)
                problems.append((0, s, f"{where}: {info['error']}"))
            elif info["error"]:
                problems.append((2, s, info["error"]))
        for s in range(1, self.stages):
            sender, receiver = everyone[s - 1], everyone[s]
            if sender["error"] or receiver["side"] == "input":
                continue  # nothing to compare
            if sender["output"] != receiver["input"]:
                problems.append((1, s, f"{self._boundary(everyone, s)}: stage {s - 1} sends {sender['output']} "
                                       f"but stage {s}'s input_template is {receiver['input']} "
                                       "((is a tuple, ((shape, dtype), ...)) per micro-batch)"))
        if problems:
            _, s, message = min(problems)
            raise ValueError(message) from (cause if s == self.stage else None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
        """One optimizer step on the full batch (x, y), run as ``micro_batches`` pipelined micro-batches.

        Every rank passes the same batch (and calls this at the same time); only stage 0 reads x and
        only the last stage reads y. The last stage returns the batch's mean loss and its logits, the
        others a zero loss and empty (0, classes) logits: they never see the logits."""
        n, m = x.shape[0], self.micro_batches
        if n % m:
            raise ValueError(f"batch {n} is not a multiple of micro_batches {m}: the engine would make "
                             "unequal micro-batches, and their mean losses would not average to the batch's")
        if n // m != self.micro_batch or tuple(x.shape[1:]) != self.x_shape or y.shape[0] != n:
            # checked on every rank (each has the batch), so all of them raise and none waits
            raise ValueError(f"batch x {tuple(x.shape)}, y {tuple(y.shape)} in {m} micro-batches does not fit the "
                             f"stages' buffers, built for micro-batches of {(self.micro_batch, *self.x_shape)} "
                             "(input_template)")
        for p in self.module.parameters():  # the engine's final division by M must see only this step
            p.grad = None
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:
            out = self.schedule.step(x.to(self.device), target=y.to(self.device), losses=losses)
        elif self.is_first:
            out = self.schedule.step(x.to(self.device))
        elif self.is_last:
            out = self.schedule.step(target=y.to(self.device), losses=losses)
        else:
            out = self.schedule.step()
        apply_step(optimizer)
        if self.is_last:
            return StepResult(torch.stack([l.detach().float() for l in losses]).mean(), out.detach())
        return StepResult.unseen(self.classes, self.device, self.logits_dtype)

