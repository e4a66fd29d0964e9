"""What every benchmark result records about the run that made it, and how its plot is written."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import division
from division.plan import describe_plan

ROOT = Path(__file__).resolve().parents[1]


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# the code that ran: taken when the benchmark starts, not when it ends; DIVISION_GIT_COMMIT names it
# where the checkout's .git is not the code's (the lent GPU machine gets a copy of the working tree
# with the session's starting .git)
GIT_AT_START = os.environ.get("DIVISION_GIT_COMMIT") or git_hash()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_info(device: torch.device) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "division": division.__version__,
        "cuda_extension": division.cuda_extension_available(),
        "git": GIT_AT_START,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


@contextlib.contextmanager
def figure(path: Path, *grid: int, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """(fig, axes) of plt.subplots(*grid, **subplots), drawn off-screen (Agg) and written to `path`
    as a PNG when the block ends without an error; closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """--layer-bits PATTERN=Q ... and --exclude PATTERN ...: DivisionConfig's per-layer settings."""
    parser.add_argument("--layer-bits", nargs="*", default=[], metavar="PATTERN=Q", type=pattern_bits,
                        help="DivisionConfig.layer_bits: Q of the records of the modules PATTERN names")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN",
                        help="DivisionConfig.exclude: modules left stock")


def pattern_bits(text: str) -> tuple[str, int]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern or not bits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATTERN=Q, as 'blocks.*_attention=4'")
    return pattern, int(bits)


def plan_text(cfg: division.DivisionConfig) -> str:
    """The per-layer settings of the run, as the table's caption says them."""
    plan = describe_plan(cfg.layer_bits, cfg.exclude)
    return f"; {plan}" if plan else ""
