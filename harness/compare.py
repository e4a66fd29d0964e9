"""What the demo ends with: the trained method next to the same model unconverted, on one batch.

Activation memory of one training step (measured as every epoch measures it) and img/s of a few
forward + backward passes, for copies of the trained model and of the same architecture and weights
with stock layers, on the same batch, both eager also when training ran compiled (a compile would
take longer than the few steps measured). Logged and returned.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

import models

from .build import Run
from .loop import Batch, to_device, train_step
from .measure import ActivationProbe, synchronize
from .methods import PreparedModel

MIB = 2.0**20


def _measure(run: Run, prepared: PreparedModel, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    model = prepared.model
    model.train()
    probe = ActivationProbe(run.device, model)
    probe.before_fetch()
    train_step(model, Batch(x.clone(), y), None, None, run.amp_dtype, prepared.forward_context, probe)
    synchronize(run.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, Batch(x, y), None, None, run.amp_dtype, prepared.forward_context)
    synchronize(run.device)
    return {"activation_mib": (probe.activation_bytes or 0) / MIB,
            "img_per_s": steps * len(x) / (time.perf_counter() - t0)}


def compare_with_vanilla(run: Run, steps: int = 3) -> dict[str, Any]:
    run.loaders.set_epoch(0)
    x, y = to_device(run, next(iter(run.loaders.train)))
    trained = PreparedModel(copy.deepcopy(run.prepared.model), run.prepared.method,
                            run.prepared.forward_context)
    stock = models.build_model(run.cfg.model.name, num_classes=run.info.num_classes,
                               in_channels=run.info.in_channels).to(run.device)
    stock.load_state_dict(run.state.model.state_dict())
    if run.cfg.trainer.channels_last:
        stock = stock.to(memory_format=torch.channels_last)
    ours = _measure(run, trained, x, y, steps)
    base = _measure(run, PreparedModel(stock, "vanilla"), x, y, steps)
    ratio = base["activation_mib"] / max(ours["activation_mib"], 1e-12)
    name = run.prepared.method
    eager = "" if run.cfg.trainer.compile == "off" else ", both eager (uncompiled)"
    run.log.info(
        f"on one batch of {len(x)}{eager}: activation memory {name} {ours['activation_mib']:.2f} MiB, "
        f"stock {base['activation_mib']:.2f} MiB ({ratio:.1f}x smaller); forward + backward "
        f"{name} {ours['img_per_s']:.1f} img/s, stock {base['img_per_s']:.1f} img/s"
    )
    return {name: ours, "vanilla": base, "activation_ratio": ratio}
