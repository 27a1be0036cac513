"""Which device a run uses: ``[train] device`` read on this machine, and the defaults that follow
from it (``compile`` and ``amp`` are on where CUDA is). Training, ``trainer eval``, ``trainer show``
and the benchmarks all resolve it here, so they agree on what "auto" means."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.config import ConfigError


def device_name(name: str) -> str:
    """``[train] device`` as this machine reads it: "auto" is cuda when available, else cpu. A
    ``cuda:N`` must be one of this machine's GPUs: torch refuses a long index with a traceback and
    wraps one above 127 (``cuda:128`` is ``cuda:-128``)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    index = name.partition(":")[2]
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        there = f"its GPUs are {', '.join(f'cuda:{i}' for i in range(count))}; use one of those, " if count else \
            "it has no CUDA device; use "
        raise ConfigError(f"[train] device = {name!r}: this machine has no such device ({there}'cpu' or 'auto')")
    return name


def on_cuda_by_default(flag: bool | None, device_type: str) -> bool:
    """An unset ``compile`` or ``amp``: on where CUDA is."""
    return device_type == "cuda" if flag is None else flag


def cpu_bf16_note(amp: bool, device_type: str) -> str | None:
    """A note when bf16 autocast is asked for on a CPU without native bf16 arithmetic (no AVX-512
    or AMX: ``torch.backends.cpu.get_cpu_capability()`` reads "AVX2" or less), else None: there
    every bf16 operation is emulated. ResNet-20 BP, batch 128, 2 threads, on an AVX2 AMD EPYC:
    28 images/s under bf16 against 390 in float32 (BENCHMARKS.md, "bf16 autocast on the CPU")."""
    if not amp or device_type != "cpu":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") or "AMX" in capability:
        return None
    return (f"train.amp = true on a CPU without native bf16 ({capability}): bf16 is emulated here and "
            "trains about 14x slower than float32; set train.amp = false")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; under torchrun each process takes the GPU of its local rank."""
    name = device_name(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"[train] device = {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def free_bytes(device: torch.device) -> int:
    """Memory a step can still take: the GPU's free memory, or the host's available memory (free
    pages and reclaimable caches) within the cgroup's limit, which the OOM killer enforces."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            free = int(line.split()[1]) * 1024
    limit, used = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if limit.isdigit() and used.isdigit():
        free = min(free, int(limit) - int(used))
    return free


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # not Linux, or no cgroup v2
        return ""
