"""The one place that writes what a run reports (rank 0; other ranks print warnings only).

- the console and train.log: a line per epoch and the run's events;
- metrics.jsonl: one JSON object per finished epoch, rewritten whole from the training state's
  history (atomically: a temporary file renamed) after the checkpoint that holds that history, and
  again when a run resumes, so a kill at any moment leaves each epoch in it exactly once;
- TensorBoard scalars: per step (loss, lr) and per epoch (every metric);
- status.json: "running", "finished" or "failed" (with the error), which scripts/summarize.py
  reads to mark unfinished and failed runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import distributed

EPOCH_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "lr", "img_per_s",
                 "peak_mem_gib", "act_mem_gib", "act_peak_gib", "data_wait_fraction")


def write_atomic(path: Path, text: str) -> None:
    """A kill while writing leaves the previous file, never half of the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files a killed process left (checkpoint, metrics, status): never complete."""
    for tmp in run_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


class RunLog:
    def __init__(self, run_dir: Path, dist: distributed.DistInfo) -> None:
        self.run_dir, self.main = run_dir, dist.is_main
        self.logger = logging.getLogger(f"division.run.{id(self)}")
        self.logger.setLevel(logging.INFO if self.main else logging.WARNING)
        self.logger.propagate = False
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
        self.handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if self.main:
            self.handlers.append(logging.FileHandler(run_dir / "train.log"))
        for h in self.handlers:
            h.setFormatter(fmt)
            self.logger.addHandler(h)
        self.writer = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss_running", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """After the checkpoint that holds `history` (of which `metrics` is the last entry)."""
        def fmt(v: Any, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        self.info(
            f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f}% | "
            f"val loss {metrics['val_loss']:.4f} top-1 {metrics['val_acc1']:.2f}% top-5 {metrics['val_acc5']:.2f}% | "
            f"{fmt(metrics['img_per_s'], '.1f')} img/s | activations {fmt(metrics['act_mem_gib'], '.4f')} GiB "
            f"(first batch), peak {metrics['peak_mem_gib']:.3f} GiB"
        )
        self.metrics_file(history)
        if self.writer:
            for key in EPOCH_SCALARS:
                if metrics.get(key) is not None:
                    self.writer.add_scalar(f"epoch/{key}", metrics[key], metrics["epoch"])
            self.writer.flush()

    def metrics_file(self, history: list[dict[str, Any]]) -> None:
        if self.main:
            write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))

    def status(self, status: str, **extra: Any) -> None:
        if self.main:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            write_atomic(self.run_dir / "status.json", json.dumps({"status": status, "time": now, **extra}) + "\n")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
