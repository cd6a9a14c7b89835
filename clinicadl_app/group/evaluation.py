"""Evaluation in eval mode, batched, without gradients, and the BatchNorm recalibration before it.

BatchNorm statistics are recomputed on training images (in train mode, current weights) before each
evaluation: with few batches per epoch, the running averages lag far behind the weights, and eval-mode
outputs stay constant for several epochs although the network already separates the classes. Data-parallel
processes share both passes (interleaved shares, gathered), so each holds the whole result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from clinicadl_app.core.config import Train
from clinicadl_app.core.distributed import World
from clinicadl_app.group.runtime import Device, loader, memory_format, model_in_shape, shard
from clinicadl_app.group.tasks import PART, Reconstruction, Task
from clinicadl_app.layouts.caps import KEYS


@dataclass
class Evaluation:
    parts: pd.DataFrame
    images: pd.DataFrame
    loss: float
    metrics: dict[str, float]


@dataclass
class Evaluator:
    task: Task
    mode: str
    device: Device
    batch_size: int
    settings: Train
    records: pd.DataFrame
    """participant_id, session_id of each image of the datasets evaluated."""
    part_weights: dict[int, float] | None = None
    world: World | None = None
    """Processes that share the evaluation: each evaluates its shard, and all get the whole table."""

    def outputs(self, model: nn.Module, dataset) -> tuple[pd.DataFrame, float]:
        """Part-level prediction table and mean loss, in eval mode, batched, without gradients."""
        model.eval()
        criterion = self.task.loss()
        criterion.to(self.device.device)
        columns: dict[str, list] = {"image": [], "part": []}
        extra: dict[str, list] = {}
        total, count = 0.0, 0
        fmt = memory_format(model)
        with torch.no_grad():
            for batch in loader(shard(dataset, self.world), self.batch_size, self.settings, self.device):
                inputs = batch["input"].to(self.device.device, non_blocking=True).contiguous(memory_format=fmt)
                with self.device.autocast():
                    out = model(inputs)
                target = inputs if isinstance(self.task, Reconstruction) else batch["target"].to(self.device.device)
                loss = criterion(out.float(), target.float() if isinstance(self.task, Reconstruction) else target)
                total += float(loss) * len(inputs)
                count += len(inputs)
                rows = self.task.rows(out.float().cpu(), target.cpu())
                for key, value in rows.items():
                    extra.setdefault(key, []).extend(np.asarray(value).tolist())
                columns["image"].extend(batch["image"].tolist())
                columns["part"].extend(batch["part"].tolist())
        if self.world is not None and self.world.distributed:
            shares = self.world.gather((columns, extra, total, count))
            columns = {key: [v for share in shares for v in share[0][key]] for key in columns}
            extra = {key: [v for share in shares for v in share[1][key]] for key in extra}
            total, count = sum(share[2] for share in shares), sum(share[3] for share in shares)
        table = self.records.iloc[columns["image"]][KEYS].reset_index(drop=True)
        part_column = PART[self.mode]
        if part_column:
            table[part_column] = columns["part"]
        for key, value in extra.items():
            table[key] = value
        sort = KEYS + ([part_column] if part_column else [])
        return table.sort_values(sort).reset_index(drop=True), total / max(count, 1)

    def evaluate(self, model: nn.Module, dataset, weights_from_self: bool = True) -> Evaluation:
        parts, loss = self.outputs(model, dataset)
        return self.summarise(parts, loss, weights_from_self)

    def summarise(self, parts: pd.DataFrame, loss: float, weights_from_self: bool = True) -> Evaluation:
        part_column = PART[self.mode]
        if part_column:
            weights = self.part_weights
            if weights is None or weights_from_self:
                weights = self.task.part_weights(parts, part_column, self.settings.selection_threshold)
            images = self.task.ensemble(parts, part_column, weights)
        else:
            images = parts
        metrics = {"loss": loss, **self.task.metrics(images)}
        return Evaluation(parts, images, loss, metrics)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, dataset, n_images: int, settings: Train, device: Device,
                        world: World | None = None) -> None:
    """Replace BatchNorm running statistics by their exact average over training inputs, with current weights.

    Several processes share the pass as they share a training batch: each takes its interleaved part of every
    batch. Synchronised layers then see the single-process batches; plain ones average their statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or n_images <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    chosen = list(range(len(dataset)))
    if len(chosen) > n_images:
        generator = torch.Generator().manual_seed(settings.seed)
        chosen = torch.randperm(len(dataset), generator=generator)[:n_images].tolist()
    model.train()
    fmt = memory_format(model)
    if world is not None and world.distributed:
        _recompute_sharded(model, dataset, chosen, norms, settings, device, world)
    else:
        for batch in loader(Subset(dataset, chosen), settings.batch_size, settings, device):
            with device.autocast():
                model(batch["input"].to(device.device).contiguous(memory_format=fmt))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _recompute_sharded(model: nn.Module, dataset, chosen: list[int], norms: list[nn.Module], settings: Train,
                       device: Device, world: World) -> None:
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from clinicadl_app.group.sync_batchnorm import SyncBatchNorm

    synced = any(isinstance(m, SyncBatchNorm) for m in norms)
    fmt = memory_format(model)
    passes = 0
    for start in range(0, len(chosen), settings.batch_size):
        mine = chosen[start:start + settings.batch_size][world.rank::world.size]
        if not mine and not synced:
            continue
        if mine:
            inputs = default_collate([dataset[i]["input"] for i in mine])
        else:  # a synchronised layer's collective needs every process, even one with nothing left
            inputs = torch.zeros((0, *model_in_shape(model)))
        with device.autocast():
            model(inputs.to(device.device).contiguous(memory_format=fmt))
        passes += 1
    if synced:
        return
    weight = torch.tensor([float(passes)], device=device.device)
    dist.all_reduce(weight)
    for m in norms:  # each process averaged its own batches: the mean over all batches of all processes
        for buffer in (m.running_mean, m.running_var):
            buffer.mul_(passes)
            dist.all_reduce(buffer)
            buffer.div_(weight.item())
