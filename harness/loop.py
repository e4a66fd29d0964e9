"""The training loop: one step, one epoch, evaluation, and fit over epochs (torchvision's
references/classification/train.py shape: train_one_epoch, evaluate, and a driver).

`train_step` is also what the benchmarks time, so a benchmark step is a training step. The loop
works on a `Run` (harness/build.py): the model, its training state, loaders and log. Training
stops, before a checkpoint is written, on a non-finite training or validation loss, weights or
buffers (BatchNorm statistics): last.pt keeps the last sound state to resume from at a lower lr.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .build import Run
from .measure import GIB, ActivationProbe, Throughput, peak_memory_gib, topk_correct


class Batch:
    """One step's inputs and labels, handed over to `train_step`, which lets go of the inputs once
    the forward pass has run: the input batch is then freed before backward unless a layer saved it
    (a stock first conv saves it; a converted one keeps only its compressed copy). The paper's
    activation memory counts the batch, so this is 0.14 GiB of a ResNet-50 step at batch 256. It
    is freed only if the caller holds no other reference: build the Batch from the loader's output
    (or a copy) and keep only the Batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._x: torch.Tensor | None = x
        self.y = y

    def take_inputs(self) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("this Batch was already used by a training step, which let go of its inputs; "
                               "make a new Batch(x, y) for every step")
        return x


def train_step(
    model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    probe: ActivationProbe | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, cross-entropy, backward and (with an optimizer) an optimizer step; returns the
    detached loss and logits. `probe` measures activation memory around it."""
    x, y = batch.take_inputs(), batch.y
    # under torch.compile's CUDA graphs (trainer.compile=reduce-overhead): a new step, whose replay
    # may reuse the last step's graph memory (its loss and logits were read already)
    torch.compiler.cudagraph_mark_step_begin()
    autocast = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with forward_context(), autocast, probe.forward() if probe else contextlib.nullcontext():
        out = model(x)
        del x  # the batch's last reference here (see Batch)
        loss = F.cross_entropy(out, y)
    if probe:
        probe.before_backward(out, loss)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if optimizer is not None:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    if probe:
        probe.after_step()
    return loss.detach(), out.detach()


def check_finite(value: float, what: str, where: str) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the {what} became {value} {where}; the run stops without overwriting last.pt. Lower "
            "optim.lr, or use trainer.amp=bf16 instead of fp16"
        )


def check_weights(model: nn.Module, where: str) -> None:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(
            f"weights or buffers became non-finite {where} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            "the run stops without overwriting last.pt. Lower optim.lr, or use trainer.amp=bf16"
        )


def to_device(run: Run, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if run.cfg.trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def evaluate(run: Run) -> dict[str, float]:
    """Loss and top-1/top-5 over the validation set, every sample counted once across ranks."""
    model, amp = run.train_model, run.amp_dtype
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
    with torch.no_grad():
        for i, batch in enumerate(run.loaders.val):
            if run.cfg.trainer.max_val_steps is not None and i >= run.cfg.trainer.max_val_steps:
                break
            x, y = to_device(run, batch)
            with torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext():
                out = model(x)
            totals[0] += F.cross_entropy(out.float(), y, reduction="sum").item()
            c1, c5 = topk_correct(out, y)
            totals[1] += c1
            totals[2] += c5
            totals[3] += y.numel()
    loss, c1, c5, n = distributed.all_reduce_sum(totals, run.device, run.dist)
    n = max(n, 1)
    return {"val_loss": loss / n, "val_acc1": 100.0 * c1 / n, "val_acc5": 100.0 * c5 / n}


def _batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The current epoch's batches from the position on (a mid-epoch resume skips those done)."""
    run.loaders.set_epoch(run.state.position.epoch, run.state.position.batch)
    return iter(run.loaders.train)


class EpochTotals:
    """The epoch's sample count, training-loss sum and correct count: on the device while the epoch
    runs (no sync per step). A mid-epoch checkpoint carries their global values (TrainState.
    epoch_totals), which the resumed main process starts from, so the epoch reports all its batches."""

    def __init__(self, run: Run) -> None:
        carried = run.state.epoch_totals if run.state.position.batch and run.dist.is_main else [0.0] * 3
        self.run = run
        self.seen = carried[0]
        self.loss = torch.tensor(carried[1], dtype=torch.float64, device=run.device)
        self.correct = torch.tensor(carried[2], dtype=torch.float64, device=run.device)

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.double() * y.numel()
        self.correct += (out.argmax(dim=1) == y).sum()
        self.seen += y.numel()

    def running_loss(self) -> float:
        return self.loss.item() / max(self.seen, 1)

    def global_sums(self) -> list[float]:
        """(seen, loss sum, correct) over all processes (collective)."""
        local = [float(self.seen), self.loss.item(), self.correct.item()]
        return distributed.all_reduce_sum(local, self.run.device, self.run.dist)


def save_mid_epoch(run: Run, totals: EpochTotals) -> None:
    """last.pt at trainer.save_every_steps: a kill loses at most that many steps."""
    state = run.state
    where = f"at step {state.position.step}"
    check_finite(totals.running_loss(), "training loss", where)
    check_weights(state.model, where)
    state.epoch_totals = totals.global_sums()
    state.save(run.run_dir / "last.pt", run.cfg, run.dist)


def after_step(run: Run, totals: EpochTotals, bar: tqdm) -> None:
    """A step's bookkeeping: the position, the progress bar, the running loss every log_every steps
    (checked finite), and last.pt every save_every_steps inside an epoch (its end saves anyway)."""
    state, tr, pos = run.state, run.cfg.trainer, run.state.position
    pos.batch += 1
    pos.step += 1
    bar.update(1)
    if pos.step % tr.log_every == 0 or pos.step == run.total_steps:
        running = totals.running_loss()
        check_finite(running, "training loss", f"at epoch {pos.epoch + 1}, step {pos.step}")
        bar.set_postfix(loss=f"{running:.4f}")
        run.log.step(pos.step, running, state.optimizer.param_groups[0]["lr"])
    inside_epoch = pos.batch < run.steps_per_epoch
    if tr.save_last and tr.save_every_steps and pos.step % tr.save_every_steps == 0 and inside_epoch:
        save_mid_epoch(run, totals)


def epoch_train_metrics(run: Run, totals: EpochTotals, meter: Throughput, seconds: float) -> dict[str, Any]:
    """The epoch's training loss, accuracy and speed over all its batches and processes."""
    run.state.epoch_totals = totals.global_sums()  # what a resume after a max_steps stop starts from
    seen, loss_sum, correct = run.state.epoch_totals
    img_s = meter.img_per_s
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": 100.0 * correct / max(seen, 1),
        # every process trains its share of the global batch
        "img_per_s": None if img_s is None else img_s * run.dist.world_size,
        "data_wait_fraction": meter.data_fraction,
        "epoch_time_s": seconds,
    }


def train_one_epoch(run: Run) -> dict[str, Any]:
    """Train from the position to the end of the epoch or of the run; the epoch's training metrics."""
    state, pos = run.state, run.state.position
    run.train_model.train()
    meter, totals = Throughput(run.device), EpochTotals(run)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    epoch_t0 = time.perf_counter()
    bar = tqdm(total=run.steps_per_epoch, initial=pos.batch, leave=False, dynamic_ncols=True,
               desc=f"epoch {pos.epoch + 1}/{run.cfg.trainer.epochs}", disable=not run.dist.is_main)
    batches = _batches(run)
    while pos.step < run.total_steps:
        probe = ActivationProbe(run.device, state.model) if run.activation is None else None
        if probe:
            probe.before_fetch()
        t_fetch = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        data_seconds = time.perf_counter() - t_fetch
        step_batch = Batch(*to_device(run, batch))
        del batch  # on the GPU the device copy in step_batch is then the batch's only reference
        y = step_batch.y
        loss, out = train_step(run.train_model, step_batch, state.optimizer, state.scaler, run.amp_dtype,
                               run.prepared.forward_context, probe)
        if probe:
            run.activation = (probe.activation_bytes, probe.peak_bytes)
        totals.add(loss, out, y)
        meter.add(y.numel(), data_seconds)
        if not meter.running:
            meter.start()  # after the epoch's first step: start-up and autotuning left out
        after_step(run, totals, bar)
    meter.stop()
    bar.close()
    return epoch_train_metrics(run, totals, meter, time.perf_counter() - epoch_t0)


def end_epoch(run: Run, train: dict[str, Any]) -> dict[str, Any]:
    """Evaluate, check, advance the position and scheduler, checkpoint, then report the epoch."""
    state, pos = run.state, run.state.position
    epoch = pos.epoch + 1
    complete = pos.batch >= run.steps_per_epoch
    check_finite(train["train_loss"], "training loss", f"in epoch {epoch}")
    lr = state.optimizer.param_groups[0]["lr"]
    check_weights(state.model, f"after epoch {epoch}")
    val = evaluate(run)
    check_finite(val["val_loss"], "validation loss", f"after epoch {epoch} (eval-mode BatchNorm statistics "
                 "overflow this way early in a run with a high lr and a small batch)")
    act_bytes, act_peak = run.activation or (None, None)
    metrics = {
        "epoch": epoch, "epoch_complete": complete, "step": pos.step, "lr": lr, **train, **val,
        "peak_mem_gib": peak_memory_gib(run.device),
        "act_mem_gib": None if act_bytes is None else act_bytes / GIB,
        "act_peak_gib": None if act_peak is None else act_peak / GIB,
        **run.description,
    }
    if complete:
        state.scheduler.step()
        pos.epoch, pos.batch = epoch, 0
        state.epoch_totals = [0.0] * 3
    state.history.append(metrics)
    if run.cfg.trainer.save_last:
        state.save(run.run_dir / "last.pt", run.cfg, run.dist)
    run.log.epoch(metrics, state.history)
    if run.dist.is_main and train["data_wait_fraction"] > 0.3:
        run.log.warning(
            f"the input pipeline sets the pace: {100 * train['data_wait_fraction']:.0f}% of the training "
            "time was spent waiting for batches (try data.on_gpu=true or more data.workers)"
        )
    return metrics


def fit(run: Run) -> dict[str, Any]:
    """Epochs from the position until trainer.epochs or trainer.max_steps; the last epoch's metrics."""
    metrics: dict[str, Any] = run.state.history[-1] if run.state.history else {}
    while run.state.position.epoch < run.cfg.trainer.epochs and run.state.position.step < run.total_steps:
        metrics = end_epoch(run, train_one_epoch(run))
        if not metrics["epoch_complete"]:
            break  # trainer.max_steps ended the run inside an epoch
    return metrics
