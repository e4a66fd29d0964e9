"""Train an image classifier with DIVISION (or a baseline method) and log accuracy, memory and speed.

One process:   python train.py experiment=resnet18_cifar10 data.root=datasets
Override:      python train.py model=resnet50 data=imagenet division.hfc_bits=4 trainer.amp=bf16
Several GPUs:  torchrun --nproc_per_node=4 train.py experiment=resnet50_imagenet \
                   hydra.run.dir=logs/runs/rn50   (trainer.batch_size is the global batch)
Sweep:         python train.py -m experiment=demo division.block_size=4,8,16 division.hfc_bits=1,2

Everything a run writes lives in its Hydra run folder (logs/runs/<date>/<time> by default): the
resolved config.yaml, train.log, metrics.jsonl (one line per epoch), tensorboard/ and last.pt.
`trainer.resume=auto` continues the run in the given folder exactly where last.pt left it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

import data as datasets
import models
from harness import checkpoints, distributed
from harness.loaders import build_loaders
from harness.measure import GIB, ActivationProbe, Throughput, peak_memory_gib, topk_correct
from harness.methods import prepare
from harness.schema import division_config, register_configs, validate

log = logging.getLogger("train")


# ---------------------------------------------------------------------------------------------
# set-up


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(run_dir: Path, is_main: bool) -> list[logging.Handler]:
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, as the paper; optional linear warm-up before it."""
    epochs, sched = cfg.trainer.epochs, cfg.sched
    warmup = min(sched.warmup_epochs, epochs - 1) if epochs > 1 else 0
    name = enum_value(sched.name)
    if name == "cosine":
        main: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, epochs - warmup), eta_min=sched.eta_min
        )
    elif name == "step":
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(sched.milestones), gamma=sched.gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def check_loss(loss: float, where: str) -> None:
    """A NaN or infinite loss stops the run before last.pt is overwritten."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss became {loss} {where}; the run stops without overwriting last.pt. "
            "Lower optim.lr, or use trainer.amp=bf16 instead of fp16"
        )


def enum_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


# ---------------------------------------------------------------------------------------------
# the loop


def skip(iterable: Iterable, count: int) -> Iterator:
    it = iter(iterable)
    for _ in range(count):
        next(it, None)
    return it


def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, amp: contextlib.AbstractContextManager,
    channels_last: bool, max_steps: int | None, dist_info: distributed.DistInfo,
) -> dict[str, float]:
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                out = model(x)
            totals[0] += F.cross_entropy(out.float(), y, reduction="sum").item()
            c1, c5 = topk_correct(out, y)
            totals[1] += c1
            totals[2] += c5
            totals[3] += y.numel()
    loss, c1, c5, n = distributed.all_reduce_sum(totals, device, dist_info)
    n = max(n, 1)
    return {"val_loss": loss / n, "val_acc1": 100.0 * c1 / n, "val_acc5": 100.0 * c5 / n}


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured training; returns the last epoch's metrics and the run folder."""
    validate(cfg)  # bad values fail here, before any data, model or file is touched
    dcfg = division_config(cfg)
    launched = distributed.launched_by_torchrun()
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = resolve_device(cfg.trainer.device, local_rank)
    dist_info = distributed.setup(device.type)
    handlers: list[logging.Handler] = []
    try:
        run_dir = Path(run_dir or tempfile.mkdtemp(prefix="division-run-")).resolve()
        run_dir = Path(distributed.broadcast_object(str(run_dir), dist_info))  # type: ignore[arg-type]
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        handlers = setup_logging(run_dir, dist_info.is_main)
        return _train(cfg, dcfg, device, dist_info, run_dir)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        distributed.teardown()


def _train(
    cfg: DictConfig, dcfg: Any, device: torch.device, dist_info: distributed.DistInfo, run_dir: Path
) -> dict[str, Any]:
    tr = cfg.trainer
    method = enum_value(cfg.method.name)
    amp_mode = enum_value(tr.amp)
    if tr.batch_size % dist_info.world_size:
        raise ValueError(
            f"trainer.batch_size={tr.batch_size} is the global batch and must divide evenly among "
            f"{dist_info.world_size} processes"
        )
    batch_per_rank = tr.batch_size // dist_info.world_size

    resume_state = None
    if tr.resume:
        path = run_dir / "last.pt" if tr.resume == "auto" else Path(tr.resume)
        resume_state = checkpoints.load(path)  # a corrupt file fails here, before anything is written
        log.info(f"resuming from {path} (epoch {resume_state['epoch']}, step {resume_state['step']})")

    if dist_info.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = tr.cudnn_benchmark and not tr.deterministic
    if tr.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)

    train_set, val_set, info = datasets.build_datasets(
        cfg.data.name, cfg.data.root, num_train=cfg.data.num_train, num_val=cfg.data.num_val,
        image_size=cfg.data.image_size, num_classes=cfg.data.num_classes, seed=cfg.seed,
        download=cfg.data.download,
    )
    loaders = build_loaders(
        train_set, val_set, info, cfg.data, batch_per_rank, tr.eval_batch_size or batch_per_rank,
        device, dist_info, cfg.seed,
    )
    model = models.build_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels)
    prepared = prepare(
        model, method, dcfg, actnn_bits=cfg.method.actnn_bits,
        actnn_group_size=cfg.method.actnn_group_size, swap_pin_memory=cfg.method.swap_pin_memory,
    )
    model = prepared.model.to(device)
    if tr.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov,
    )
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_mode == "fp16")
    start_epoch, global_step, skip_batches = 0, 0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, global_step = resume_state["epoch"], resume_state["step"]
        skip_batches = resume_state.get("batch_in_epoch", 0)
        set_rng_state(resume_state["rng"][dist_info.rank] if isinstance(resume_state["rng"], list) else resume_state["rng"])
    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp_mode)
    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"{cfg.experiment_name}: {cfg.model.name} ({n_params / 1e6:.2f}M params) on {info.name} "
        f"({loaders.train_size} train / {loaders.val_size} val images), method={method}"
        + (f" (B={dcfg.block_size}, Q={dcfg.hfc_bits}, {dcfg.backward_mode})" if method == "division" else "")
        + f", device={device}, processes={dist_info.world_size}, batch {tr.batch_size} "
        f"({batch_per_rank} per process), amp={amp_mode}, channels_last={tr.channels_last}"
    )
    log.info(f"run folder: {run_dir}")

    steps_per_epoch = len(loaders.train)
    total_steps = tr.epochs * steps_per_epoch if tr.max_steps is None else min(tr.max_steps, tr.epochs * steps_per_epoch)
    metrics: dict[str, Any] = {}
    act_bytes: int | None = None
    act_peak: int | None = None
    stop = global_step >= total_steps
    epoch = start_epoch
    while epoch < tr.epochs and not stop:
        loaders.set_epoch(epoch)
        train_model.train()
        meter = Throughput(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        first_batch = skip_batches
        batches = skip(loaders.train, skip_batches)
        skip_batches = 0
        bar = tqdm(
            total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch + 1}/{tr.epochs}",
            disable=not dist_info.is_main, leave=False, dynamic_ncols=True,
        )
        epoch_t0 = time.perf_counter()
        batch_index = first_batch
        while global_step < total_steps:
            probe = ActivationProbe(device, model) if act_bytes is None else None
            if probe:
                probe.before_fetch()
            t_fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            data_seconds = time.perf_counter() - t_fetch
            x, y = batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tr.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with prepared.forward_context(), amp(), probe.forward() if probe else contextlib.nullcontext():
                out = train_model(x)
                loss = F.cross_entropy(out, y)
            if probe:
                probe.before_backward(out, loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if probe:
                probe.after_step()
                act_bytes, act_peak = probe.activation_bytes, probe.peak_bytes
            loss_sum += loss.detach().double() * y.numel()
            correct += (out.detach().argmax(dim=1) == y).sum()
            seen += y.numel()
            meter.add(y.numel(), data_seconds)
            if not meter.running:
                meter.start()  # after the epoch's first step: start-up and autotuning left out
            global_step += 1
            batch_index += 1
            bar.update(1)
            if global_step % tr.log_every == 0 or global_step == total_steps:
                running = loss_sum.item() / max(seen, 1)
                check_loss(running, f"at epoch {epoch + 1}, step {global_step}")
                bar.set_postfix(loss=f"{running:.4f}")
                if writer:
                    writer.add_scalar("train/loss_running", running, global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
        meter.stop()
        bar.close()
        stop = global_step >= total_steps
        epoch_done = batch_index >= steps_per_epoch
        seen_total, loss_total, correct_total = distributed.all_reduce_sum(
            [float(seen), loss_sum.item(), float(correct.item())], device, dist_info
        )
        train_loss = loss_total / max(seen_total, 1)
        check_loss(train_loss, f"in epoch {epoch + 1}")
        lr = optimizer.param_groups[0]["lr"]
        state_rng = rng_state()
        val = evaluate(
            train_model, loaders.val, device, amp(), tr.channels_last, tr.max_val_steps, dist_info
        )
        img_s = meter.img_per_s
        if img_s is not None:
            img_s *= dist_info.world_size  # every process trains its share of the global batch
        metrics = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": 100.0 * correct_total / max(seen_total, 1),
            **val,
            "img_per_s": img_s,
            "data_wait_fraction": meter.data_fraction,
            "peak_mem_gib": peak_memory_gib(device),
            "act_mem_gib": None if act_bytes is None else act_bytes / GIB,
            "act_peak_gib": None if act_peak is None else act_peak / GIB,
            "epoch_time_s": time.perf_counter() - epoch_t0,
            "method": method,
            "method_settings": prepared.settings,
            "model": cfg.model.name,
            "data": info.name,
            "batch_size": tr.batch_size,
            "amp": amp_mode,
            "world_size": dist_info.world_size,
            "device": str(device),
        }
        if epoch_done:
            scheduler.step()
        if dist_info.is_main:
            _report(metrics, writer, run_dir, global_step)
            if meter.data_fraction > 0.3:
                log.warning(
                    f"the input pipeline sets the pace: {100 * meter.data_fraction:.0f}% of the "
                    "training time was spent waiting for batches (try data.on_gpu=true or more "
                    "data.workers)"
                )
        rngs = _gather_rng(state_rng, dist_info)
        if tr.checkpoint and dist_info.is_main:
            checkpoints.save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "epoch": epoch + 1 if epoch_done else epoch,
                    "batch_in_epoch": 0 if epoch_done else batch_index,
                    "step": global_step,
                    "rng": rngs,
                    "metrics": metrics,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                },
                run_dir / "last.pt",
            )
        if epoch_done:
            epoch += 1
    if writer:
        writer.close()
    return {**metrics, "run_dir": str(run_dir)}


def _gather_rng(state: dict[str, Any], dist_info: distributed.DistInfo) -> Any:
    """Each process's RNG state, so a resumed DDP run draws the same numbers on every rank."""
    if not dist_info.enabled:
        return state
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _report(metrics: dict[str, Any], writer: Any, run_dir: Path, step: int) -> None:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    log.info(
        f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f}% | "
        f"val loss {metrics['val_loss']:.4f} top-1 {metrics['val_acc1']:.2f}% top-5 {metrics['val_acc5']:.2f}% | "
        f"{fmt(metrics['img_per_s'], '.1f')} img/s | activations {fmt(metrics['act_mem_gib'], '.4f')} GiB "
        f"(first batch), peak {metrics['peak_mem_gib']:.3f} GiB"
    )
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "lr", "img_per_s",
                    "peak_mem_gib", "act_mem_gib", "act_peak_gib", "data_wait_fraction"):
            if metrics.get(key) is not None:
                writer.add_scalar(f"epoch/{key}", metrics[key], metrics["epoch"])
        writer.flush()


# ---------------------------------------------------------------------------------------------
# Hydra entry point


def _argv_for_rank() -> None:
    """Under torchrun only rank 0 keeps the run folder; the others get a throw-away one."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    sys.argv = [a for a in sys.argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='division-rank-')}", "hydra.output_subdir=null"]


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    _argv_for_rank()

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> float | None:
        result = train(cfg, HydraConfig.get().runtime.output_dir)
        return result.get("val_acc1")

    run()


if __name__ == "__main__":
    main()
