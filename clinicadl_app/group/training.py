"""The training loop of one network on one fold: evaluation, model selection, early stopping, checkpoints.

Fast on the CPU: the faster memory layout for this machine (runtime.choose_memory_format), optional
bfloat16 autocast, batched evaluation, no re-evaluation of the training set unless asked (ClinicaDL spends
~40 % of its epoch on it); BatchNorm statistics recomputed before each evaluation (evaluation.py).

State is saved atomically after every epoch, by a background thread while the next batch computes (the
optimiser's step waits for it); a killed run resumes at the next epoch, and with
--deterministic on the CPU ends with the same weights as an uninterrupted run.

Data-parallel (torchrun, srun): each process takes an interleaved share of every global batch, so N processes
see the batches one process would (DistributedSampler, seeded as the single-process shuffle); gradients are
averaged by DistributedDataParallel; evaluation and BatchNorm recalibration are sharded the same way and
gathered, so every process takes the same decisions (best model, early stop); only the main process writes.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from clinicadl_app.core.allocator import prefault
from clinicadl_app.core.atomic import BackgroundSaves, write_tsv
from clinicadl_app.core.config import Train
from clinicadl_app.core.distributed import World
from clinicadl_app.group.data import PartDataset
from clinicadl_app.group.evaluation import Evaluator, recompute_batchnorm
from clinicadl_app.group.metrics import better
from clinicadl_app.group.runtime import Device, choose_memory_format, first_activation_bytes, loader, memory_format
from clinicadl_app.group.tasks import Reconstruction, Task
from clinicadl_app.layouts.maps import Maps

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, settings: Train) -> torch.optim.Optimizer:
    """torch's fused kernels: one pass over each tensor instead of one per operation (Conv5_FC3's classifier holds
    42 M weights; Adam's step 0.10 -> 0.035 s on this 2-core CPU), the same update within float32 rounding."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "SGD":
        return torch.optim.SGD(parameters, lr=settings.learning_rate, momentum=0.9,
                               weight_decay=settings.weight_decay, fused=True)
    kind = torch.optim.AdamW if settings.optimizer == "AdamW" else torch.optim.Adam
    return kind(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=True)


@dataclass
class State:
    """What a checkpoint holds besides weights and optimiser: enough to continue exactly."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    patience_loss: float | None = None
    stale: int = 0
    rows: list[dict] = field(default_factory=list)
    stopped: bool = False


class Trainer:
    """Trains one network (one fold, one part position in multi-network mode) into the MAPS."""

    def __init__(self, *, model: nn.Module, task: Task, settings: Train, maps: Maps, fold: int,
                 network: int | None, selection: tuple[str, ...], device: Device, evaluator: Evaluator,
                 train_evaluator: Evaluator | None = None, report: Callable[[dict], None] | None = None,
                 world: World | None = None):
        """`evaluator` reads the validation images' rows, `train_evaluator` the training images' (needed with
        evaluate_train: the two sets differ in size and order)."""
        self.model, self.task, self.settings, self.maps = model, task, settings, maps
        self.fold, self.network, self.selection, self.device = fold, network, selection, device
        self.evaluator, self.train_evaluator = evaluator, train_evaluator
        self.report = report
        self.world = world or World()
        if self.world.distributed and settings.sync_batchnorm:
            from clinicadl_app.group.sync_batchnorm import convert

            self.model = model = convert(model)
        self.model.to(device.device, memory_format=choose_memory_format(
            model, settings, device, max(1, settings.batch_size // self.world.size), self.world))
        self.trainable: nn.Module = self.model
        """What the training steps call: the model, or its DistributedDataParallel wrapper."""
        if self.world.distributed:
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            # a 1-channel input's weights are both contiguous and channels-last: DDP's stride check is moot
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

            self.trainable = DistributedDataParallel(
                self.model, device_ids=[device.device.index] if device.device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # no copy of every gradient into the communication buffers
        self.optimizer = make_optimizer(self.model, settings)
        # float16 needs loss scaling; its scale is training state, checkpointed with the optimiser's
        self.scaler = torch.amp.GradScaler(device.device.type) if device.amp_dtype == torch.float16 else None
        self.criterion = task.loss().to(device.device)
        self.state = State()
        self.saves = BackgroundSaves()

    # --- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.world.main:
            return
        payload = {
            "model": self._weights(), "optimizer": self.optimizer.state_dict(),
            "state": copy.deepcopy(self.state.__dict__), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            payload["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler:
            payload["scaler"] = self.scaler.state_dict()
        self.saves.save(payload, self.maps.checkpoint(self.fold, self.network))

    def _weights(self) -> dict[str, torch.Tensor]:
        """The state dict for a background save: buffers copied (a training forward changes BatchNorm's), the
        parameters and the optimiser's state shared (only the optimiser's step changes them, and it waits for
        the saves)."""
        buffers = {name for name, _ in self.model.named_buffers()}
        return {name: tensor.clone() if name in buffers else tensor for name, tensor in self.model.state_dict().items()}

    def resume(self) -> bool:
        path = self.maps.checkpoint(self.fold, self.network)
        if not self.world.broadcast(path.exists()):
            return False
        # our own checkpoint, written by this MAPS: optimiser and RNG states need full unpickling
        payload = torch.load(path, map_location=self.device.device, weights_only=False)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        self.state = State(**payload["state"])
        torch.set_rng_state(payload["torch_rng"])
        np.random.set_state(payload["numpy_rng"])
        random.setstate(payload["python_rng"])
        if "cuda_rng" in payload and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        log.info("split-%d%s: resuming after epoch %d", self.fold, self._network_name, self.state.epoch)
        return True

    @property
    def _network_name(self) -> str:
        return "" if self.network is None else f" network-{self.network}"

    def save_model(self, metric: str) -> None:
        if not self.world.main:
            return
        payload = {"model": self._weights(), "epoch": self.state.epoch, "step": self.state.step,
                   "name": self.settings.architecture, "metric": metric, "value": self.state.best[metric]}
        self.saves.save(payload, self.maps.model(self.fold, metric, self.network))

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self, train: PartDataset, validation, train_eval) -> None:
        try:
            self._fit(train, validation, train_eval)
        finally:  # every checkpoint and model on disk before anything reads them
            self.saves.close()

    def _fit(self, train: PartDataset, validation, train_eval) -> None:
        settings = self.settings
        self.resume()
        writer = self._tensorboard() if self.world.main else None
        log_path = self.maps.training_log(self.fold, self.network)
        if self.state.rows and self.world.main:
            write_tsv(log_path, pd.DataFrame(self.state.rows))
        fmt = memory_format(self.model)
        if self.device.device.type == "cpu" and self.state.epoch < settings.epochs:
            # the first step's fresh memory touched before it; 3x the first activation stays under what Conv5_FC3's
            # step uses (3.7x), so the peak does not grow
            prefault(3 * first_activation_bytes(self.model, max(1, settings.batch_size // self.world.size),
                                                self.device))
        while self.state.epoch < settings.epochs and not self.state.stopped:
            epoch = self.state.epoch
            train.epoch = epoch
            if self.world.distributed:  # dropout differs per process, and a resume on any number of them
                key = [settings.seed, self.fold, self.network or 0, epoch, self.world.rank]
                torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            losses, seen, wait, busy = [], 0, 0.0, 0.0
            batches = loader(train, settings.batch_size, settings, self.device, epoch=epoch, world=self.world)
            n_batches, per_batch, n_inputs = len(batches), batches.batch_size or 1, len(batches.sampler)
            group = settings.accumulation_steps * per_batch
            tick = time.perf_counter()
            for index, batch in enumerate(batches):
                ready = time.perf_counter()
                wait += ready - tick
                inputs = batch["input"].to(self.device.device, non_blocking=True).contiguous(memory_format=fmt)
                target = inputs if isinstance(self.task, Reconstruction) else batch["target"].to(self.device.device)
                last = index + 1 == n_batches
                stepping = (index + 1) % settings.accumulation_steps == 0 or last
                with self._synchronising(stepping):
                    with self.device.autocast():
                        out = self.trainable(inputs)
                    loss = self.criterion(out.float(), target.float() if isinstance(self.task, Reconstruction)
                                          else target)
                    # each input weighs as in one batch of the whole group, the epoch's last shorter group too
                    in_group = min(group, n_inputs - index // settings.accumulation_steps * group)
                    scaled = loss * (len(inputs) / in_group)
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if stepping:
                    self.step()
                losses.append(float(loss.detach()) * len(inputs))
                seen += len(inputs) * self.world.size
                tick = time.perf_counter()
                busy += tick - ready
                steps_due = settings.evaluation_steps and self.state.step % settings.evaluation_steps == 0
                if last or (steps_due and (index + 1) % settings.accumulation_steps == 0):
                    summed = sum(share for share in self.world.gather(sum(losses)))  # every process's inputs
                    self._evaluate(validation, train_eval, epoch, summed / max(seen, 1),
                                   seen / max(busy + wait, 1e-9), wait / max(busy + wait, 1e-9), writer, log_path)
                    losses, seen, wait, busy = [], 0, 0.0, 0.0
                    self.model.train()
                    tick = time.perf_counter()
                    if self.state.stopped:
                        break
            self.state.epoch = epoch + 1
            self.save_checkpoint()
        if writer:
            writer.close()

    def step(self) -> None:
        self.saves.wait()  # the checkpoint and models being written read the weights this step changes
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def _synchronising(self, stepping: bool):
        """Gradients are averaged across processes only at the batch that updates the weights."""
        if stepping or not self.world.distributed:
            return nullcontext()
        return self.trainable.no_sync()  # type: ignore[operator]

    def _evaluate(self, *args) -> None:
        """Evaluation must not touch the training's random stream (dropout in the BatchNorm pass, loader
        seeds): evaluating more or less often leaves the training itself unchanged."""
        devices = list(range(torch.cuda.device_count())) if self.device.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._evaluate_now(*args)

    def _evaluate_now(self, validation, train_eval, epoch: int, train_loss: float, speed: float,
                      wait_share: float, writer, log_path: Path) -> None:
        settings = self.settings
        start = time.perf_counter()
        recompute_batchnorm(self.model, train_eval, settings.batchnorm_recompute, settings, self.device, self.world)
        result = self.evaluator.evaluate(self.model, validation)
        row: dict[str, object] = {"epoch": epoch, "step": self.state.step, "loss_train": train_loss,
                                  "images_per_second": round(speed, 3), "data_wait_share": round(wait_share, 4)}
        if settings.evaluate_train:
            if self.train_evaluator is None:
                raise ValueError("evaluate_train needs the training rows' evaluator")
            on_train = self.train_evaluator.evaluate(self.model, train_eval)
            row.update({f"{k}_train": v for k, v in on_train.metrics.items()})
        row.update({f"{k}_validation": v for k, v in result.metrics.items()})
        row["evaluation_seconds"] = round(time.perf_counter() - start, 2)
        self.state.rows.append(row)
        if self.world.main:
            write_tsv(log_path, pd.DataFrame(self.state.rows))
        if writer:
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, self.state.step)
        for metric in self.selection:
            value = result.metrics.get(metric)
            if value is not None and better(metric, value, self.state.best.get(metric)):
                self.state.best[metric] = value
                self.state.best_epoch[metric] = epoch
                self.save_model(metric)
        log.info("split-%d%s epoch %d step %d: loss %.4f, validation %s (%.2f inputs/s, %.0f%% waiting for data)",
                 self.fold, self._network_name, epoch, self.state.step, train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k in self.selection or k == "loss"),
                 speed, 100 * wait_share)
        previous = self.state.patience_loss
        if previous is None or result.loss < previous - settings.tolerance:
            self.state.patience_loss = result.loss
            self.state.stale = 0
        else:
            self.state.stale += 1
            if settings.patience and self.state.stale >= settings.patience:
                log.info("split-%d%s: early stop at epoch %d step %d (no validation loss decrease over %g in %d "
                         "evaluation(s))", self.fold, self._network_name, epoch, self.state.step, settings.tolerance,
                         self.state.stale)
                self.state.stopped = True
        if self.report:
            self.report(result.metrics)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            return None
        return SummaryWriter(str(self.maps.tensorboard(self.fold, self.network)))
