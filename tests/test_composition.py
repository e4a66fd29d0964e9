"""A converted model with PyTorch's other memory tools: activation checkpointing (timm's
set_grad_checkpointing runs torch.utils.checkpoint) and FSDP2 (fully_shard; two CPU processes, gloo)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import division
from division.saved import SavedBytes

torchvision = pytest.importorskip("torchvision")
fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD = 2


def checkpointed_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One step with each residual stage of a ResNet recomputed in backward (non-reentrant
    checkpoint): the gradients, and the bytes autograd saved in forward."""
    from torch.utils.checkpoint import checkpoint

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = checkpoint(stage, x, use_reentrant=False)
        return model.fc(torch.flatten(model.avgpool(x), 1))

    model.zero_grad(set_to_none=True)
    counter = SavedBytes(exclude=model.parameters())
    torch.manual_seed(2)
    with counter.counting():
        loss = F.cross_entropy(forward(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), counter.total


def test_checkpointed_stages_of_a_converted_model_recompute_its_records() -> None:
    """Under torch.utils.checkpoint a converted stage saves only its input, as a stock one does, and
    its records are made again in backward: exact mode gives stock's gradients bit for bit, DIVISION
    its usual noise; outside the stages the stem still saves records."""
    torch.manual_seed(0)
    stock = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.arange(4)
    g0, saved0 = checkpointed_step(stock, x, y)
    g1, saved1 = checkpointed_step(division.convert_model(copy.deepcopy(stock), division.DivisionConfig(backward_mode="exact")), x, y)
    g2, saved2 = checkpointed_step(division.convert_model(copy.deepcopy(stock)), x, y)
    assert torch.equal(g0, g1)
    assert torch.isfinite(g2).all() and F.cosine_similarity(g2, g0, dim=0) > 0.5 and not torch.allclose(g2, g0, rtol=1e-3)
    assert saved2 < saved0 / 2  # the stem's records; the stages' inputs the same as stock's


def _sharded_grads(rank: int, store: str, out: str) -> None:
    """One step of ResNet-18, stock and converted (exact, division), each block and the whole model
    sharded; rank 0 writes the full gradients and stock's, computed unsharded on each rank's batch."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    stock = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for mode in ("stock", "exact", "division"):
        model = copy.deepcopy(stock)
        if mode != "stock":
            model = division.convert_model(model, division.DivisionConfig(backward_mode=mode))
        for block in (model.layer1, model.layer2, model.layer3, model.layer4, model):
            fsdp.fully_shard(block, mesh=mesh)
        torch.manual_seed(2)
        F.cross_entropy(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        results[mode] = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
    if rank == 0:
        reference = [torch.zeros_like(p) for p in stock.parameters()]
        for xs, ys in zip(x.chunk(WORLD), y.chunk(WORLD)):  # each rank's batch: its own BN statistics
            stock.zero_grad()
            F.cross_entropy(stock(xs), ys).backward()
            reference = [r + p.grad / WORLD for r, p in zip(reference, stock.parameters())]
        results["unsharded"] = torch.cat([r.flatten() for r in reference])
        torch.save(results, out)
    dist.destroy_process_group()


def test_a_converted_model_shards_with_fsdp2(tmp_path: Path) -> None:
    """Exact mode under FSDP2 is stock under FSDP2 bit for bit (the layers run on the unsharded
    weights FSDP gathers); DIVISION's gradient is its usual noise around them."""
    out = tmp_path / "grads.pt"
    mp.spawn(_sharded_grads, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD)
    grads = torch.load(out)
    assert torch.equal(grads["exact"], grads["stock"])
    assert torch.allclose(grads["stock"], grads["unsharded"], rtol=1e-4, atol=1e-6)
    division_grad = grads["division"]
    assert torch.isfinite(division_grad).all() and not torch.allclose(division_grad, grads["stock"], rtol=1e-3)
    assert F.cosine_similarity(division_grad, grads["stock"], dim=0) > 0.5
