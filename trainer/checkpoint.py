"""What a session puts in a checkpoint (``checkpoint_payload``) and how a freshly built session takes
it back (``restore``): everything a resume or ``trainer eval`` needs, the RNG states included.

The file itself (written atomically with a digest, read back verified) is ``trainer.checkpoint_file``;
its names are re-exported here for one release."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.checkpoint_file import (  # noqa: F401 (re-exported for one release)
    DIGEST_KEY, DIGEST_SINCE, EXPORTED_KIND, FORMAT_VERSION, MODEL_KEYS, NOTE_KEY, PAYLOAD_KEYS, STAGE_PARTS,
    load_checkpoint, load_stage_part, payload_digest, remove_stage_parts, resolve_checkpoint, save_checkpoint,
    save_stage_part, stage_part_path,
)
from trainer.config import ConfigError
from trainer.parallel.processes import DistEnv
from trainer.run_folder import CHECKPOINT_NAME  # noqa: F401 (re-exported for one release)

if TYPE_CHECKING:
    from trainer.session import Session


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective: all ranks call it)."""
    if not env.enabled:
        return [rng_state()]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


# --- a session's round trip ----------------------------------------------------------------------


def checkpoint_payload(s: Session, epoch: int, step: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint holds: enough to resume exactly, and to evaluate without the data."""
    return {
        "recipe": s.recipe.to_dict(), "epoch": epoch, "step": step, "world_size": s.env.world_size,
        "model": s.model.state_dict(), "rule": s.rule.state_dict(),
        **s.layout.checkpoint_fields(s.optimizer),  # "optimizer" and "pipeline"
        "scheduler": s.scheduler.state_dict(), "rng": rng,
        "data": {**s.data.stats.state(), "num_classes": s.data.num_classes, "input_shape": list(s.data.input_shape),
                 "files": s.data_files},
    }


def restore(s: Session, payload: dict[str, Any], out_dir: Path) -> tuple[int, int]:
    """Load a checkpoint of the run folder ``out_dir`` (and this rank's stage part, under a pipeline)
    into a freshly built session; returns (epoch, step) to continue from."""
    if payload["world_size"] != s.env.world_size:
        raise ConfigError(f"the checkpoint was written by {payload['world_size']} process(es); resume it with "
                          f"the same number (got {s.env.world_size})")
    stages = (payload.get("pipeline") or {}).get("stages", 1)
    if stages != s.env.stages:
        raise ConfigError(f"the checkpoint was written by a pipeline of {stages} stage(s); resume it with "
                          f"train.pipeline_stages = {stages} (got {s.env.stages})")
    for key, saved in payload["data"].get("files", {}).items():  # checkpoints before fingerprints have none
        now = s.data_files.get(key)
        if now is not None and now != saved:
            change = f"{saved['size']} → {now['size']} bytes" if now["size"] != saved["size"] else \
                "its sha256 differs"
            raise ConfigError(f"{now['file']} ({key}): the file changed since the checkpoint was written ({change}); "
                              "--resume needs the images it trained on: put that file back, or start a new run with "
                              "another --out")
    optimizer_state = s.layout.optimizer_state(payload, out_dir)
    try:
        s.model.load_state_dict(payload["model"])
        s.rule.load_state_dict(payload["rule"])
        s.optimizer.load_state_dict(optimizer_state)
    except (RuntimeError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"the checkpoint does not fit the model and rule built from the recipe ({reason}); "
                          "resume with the recipe it was written with, or start a new run with another --out") from None
    s.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"][s.env.rank])
    return payload["epoch"], payload["step"]

