"""What a network is trained to do: targets, loss, prediction tables, metrics and part-to-image ensembling.

Part-level results become image-level results by soft voting (classification: probabilities weighted by
each part's validation balanced accuracy, parts under the selection threshold left out) or by the mean
(regression), as ClinicaDL does; the weights come from validation results only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from clinicadl_app.core.errors import UsageError
from clinicadl_app.group import metrics as M
from clinicadl_app.layouts.caps import KEYS

PART = {"image": None, "patch": "patch_id", "roi": "roi_id", "slice": "slice_id"}


@dataclass
class Classification:
    classes: list[str]
    loss_name: str = "CrossEntropyLoss"
    class_weights: list[float] | None = None
    name: str = "classification"

    @property
    def output_size(self) -> int:
        return len(self.classes)

    @property
    def label_code(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def default_selection(self) -> tuple[str, ...]:
        return ("loss", "BA")

    def target(self, label: object) -> torch.Tensor:
        return torch.tensor(self.label_code[str(label)], dtype=torch.long)

    def loss(self) -> nn.Module:
        weight = torch.tensor(self.class_weights, dtype=torch.float32) if self.class_weights else None
        return nn.CrossEntropyLoss(weight=weight)

    def rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
        proba = torch.softmax(outputs.float(), 1).numpy()
        columns = {"true_label": targets.numpy(), "predicted_label": proba.argmax(1)}
        columns.update({f"proba{i}": proba[:, i] for i in range(proba.shape[1])})
        return columns

    def metrics(self, table: pd.DataFrame) -> dict[str, float]:
        proba = table[[f"proba{i}" for i in range(self.output_size)]].to_numpy()
        return M.classification(table.true_label.to_numpy(), proba, self.classes)

    def ensemble(self, parts: pd.DataFrame, part_column: str, weights: dict[int, float]) -> pd.DataFrame:
        columns = [f"proba{i}" for i in range(self.output_size)]
        weighted = parts.copy()
        w = weighted[part_column].map(weights).fillna(0.0).to_numpy()
        if not (w > 0).any():
            w = np.ones(len(weighted))
        weighted[columns] = weighted[columns].to_numpy() * w[:, None]
        weighted["weight"] = w
        grouped = weighted.groupby(KEYS, sort=True)
        proba = grouped[columns].sum().div(grouped["weight"].sum(), axis=0)
        table = proba.reset_index()
        table.insert(2, "true_label", grouped.true_label.first().to_numpy())
        table.insert(3, "predicted_label", proba.to_numpy().argmax(1))
        return table

    def part_weights(self, parts: pd.DataFrame, part_column: str, threshold: float) -> dict[int, float]:
        """Each part's balanced accuracy on validation; parts below `threshold` get no vote."""
        weights = {}
        for part, group in parts.groupby(part_column):
            ba = M.classification(group.true_label.to_numpy(),
                                  group[[f"proba{i}" for i in range(self.output_size)]].to_numpy(),
                                  self.classes)["BA"]
            weights[int(part)] = ba if not math.isnan(ba) and ba >= threshold else 0.0
        return weights


@dataclass
class Regression:
    loss_name: str = "MSELoss"
    mean: float = 0.0
    std: float = 1.0
    """Targets are standardised with the training set's mean and sd; predictions are reported in label units."""
    name: str = "regression"
    output_size: int = 1

    def default_selection(self) -> tuple[str, ...]:
        return ("loss",)

    def target(self, label: object) -> torch.Tensor:
        return torch.tensor([(float(label) - self.mean) / self.std], dtype=torch.float32)

    def loss(self) -> nn.Module:
        return {"MSELoss": nn.MSELoss, "L1Loss": nn.L1Loss, "HuberLoss": nn.HuberLoss}[self.loss_name]()

    def rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
        scale = lambda t: t.float().numpy()[:, 0] * self.std + self.mean  # noqa: E731
        return {"true_label": scale(targets), "predicted_label": scale(outputs)}

    def metrics(self, table: pd.DataFrame) -> dict[str, float]:
        return M.regression(table.true_label.to_numpy(), table.predicted_label.to_numpy())

    def ensemble(self, parts: pd.DataFrame, part_column: str, weights: dict[int, float]) -> pd.DataFrame:
        return parts.groupby(KEYS, sort=True)[["true_label", "predicted_label"]].mean().reset_index()

    def part_weights(self, parts: pd.DataFrame, part_column: str, threshold: float) -> dict[int, float]:
        return {int(p): 1.0 for p in parts[part_column].unique()}


@dataclass
class Reconstruction:
    loss_name: str = "MSELoss"
    name: str = "reconstruction"
    output_size: int = 0

    def default_selection(self) -> tuple[str, ...]:
        return ("loss",)

    def target(self, label: object) -> torch.Tensor:
        return torch.zeros(0)  # the target is the input itself

    def loss(self) -> nn.Module:
        return {"MSELoss": nn.MSELoss, "L1Loss": nn.L1Loss, "HuberLoss": nn.HuberLoss}[self.loss_name]()

    def rows(self, outputs: torch.Tensor, inputs: torch.Tensor) -> dict[str, np.ndarray]:
        per_item = [M.reconstruction([i], [o]) for i, o in zip(inputs, outputs, strict=True)]
        return {key: np.array([m[key] for m in per_item]) for key in ("MAE", "RMSE", "PSNR", "SSIM")}

    def metrics(self, table: pd.DataFrame) -> dict[str, float]:
        return {key: float(table[key].mean()) for key in ("MAE", "RMSE", "PSNR", "SSIM")}

    def ensemble(self, parts: pd.DataFrame, part_column: str, weights: dict[int, float]) -> pd.DataFrame:
        return parts.groupby(KEYS, sort=True)[["MAE", "RMSE", "PSNR", "SSIM"]].mean().reset_index()

    def part_weights(self, parts: pd.DataFrame, part_column: str, threshold: float) -> dict[int, float]:
        return {int(p): 1.0 for p in parts[part_column].unique()}


Task = Classification | Regression | Reconstruction


def make_task(name: str, labels: pd.DataFrame, column: str, loss: str, class_weights: bool,
              classes: list[str] | None = None) -> Task:
    """The task, with what it learns from the training labels (classes, weights, target scaling)."""
    if name == "classification":
        classes = classes or sorted(map(str, labels[column].unique()))
        weights = None
        if class_weights:
            counts = labels[column].astype(str).value_counts()
            weights = [float(len(labels) / (len(classes) * counts.get(c, 1))) for c in classes]
        return Classification(classes, loss or "CrossEntropyLoss", weights)
    if name == "regression":
        values = pd.to_numeric(labels[column], errors="coerce")
        if values.isna().any():
            words = ", ".join(sorted(set(labels[column][values.isna()].astype(str)))[:5])
            raise UsageError(f"column '{column}' holds {words}: a regression network needs numbers; train a "
                             "classifier ([train] network_task), or choose a numeric column")
        return Regression(loss or "MSELoss", float(values.mean()), float(values.std() or 1.0))
    return Reconstruction(loss or "MSELoss")
