"""last.pt: written under a temporary name and renamed, read back with errors that say what is wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_VERSION = 3  # 2: the history, the current epoch's totals and the config; 3: built_for
REQUIRED_KEYS = ("version", "model", "optimizer", "scheduler", "epoch", "batch_in_epoch", "step",
                 "history", "epoch_totals", "rng", "config", "built_for")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """A crash while writing leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass trainer.resume=PATH to an existing last.pt, "
            "or trainer.resume=auto inside the run folder that wrote it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"checkpoint {path} is corrupt or not a division checkpoint ({type(err).__name__}: "
            f"{err}); resume from another file or start afresh without trainer.resume"
        ) from err
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"checkpoint {path} is not a division training checkpoint")
    if state["version"] == 2:  # written before built_for: resumable, without that check
        state = {**state, "version": CHECKPOINT_VERSION, "built_for": None}
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path} has version {state['version']}, this harness reads versions 2 to "
            f"{CHECKPOINT_VERSION}; resume it with the version of division that wrote it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is not a complete division training checkpoint: missing {missing}")
    return state
