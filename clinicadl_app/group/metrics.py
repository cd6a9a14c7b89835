"""Metrics over a whole set (never a running average of batch values), as ClinicaDL reports them.

Undefined ratios (a class absent from the set) are NaN rather than an error or a made-up number.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

LOWER_IS_BETTER = {"loss", "MAE", "RMSE", "MSE", "LR_minus"}


def names(task: str) -> set[str]:
    """Every validation metric a task reports (the loss included), for checking a setting before training."""
    if task == "classification":
        found = classification(np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]]), ["a", "b"])
    elif task == "regression":
        found = regression(np.array([1.0, 2.0]), np.array([1.5, 2.5]))
    else:
        found = dict.fromkeys(("MAE", "RMSE", "PSNR", "SSIM"))
    return {"loss", *found}


def better(metric: str, value: float, best: float | None) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def _binary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    tn = int(((y_pred == 0) & (y_true == 0)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "PPV": ppv,
        "NPV": npv,
        "F1_score": _ratio(2 * tp, 2 * tp + fp + fn),
        "MK": ppv + npv - 1,
        "LR_plus": _ratio(sensitivity, 1 - specificity),
        "LR_minus": _ratio(1 - sensitivity, specificity),
    }


def _macro(values: list[float]) -> float:
    """The mean over the classes where a value is defined; NaN, without numpy's warning, when none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def classification(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, float]:
    """y_true: class indices; proba: (n, k) probabilities. Binary metrics take class 1 as positive;
    with more classes each is computed one-vs-rest and averaged (macro), with per-class AUC as well."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = proba.argmax(1)
    k = proba.shape[1]
    result: dict[str, float] = {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else math.nan,
        "BA": float(np.mean([(y_pred[y_true == c] == c).mean() for c in range(k) if (y_true == c).any()]))
        if len(y_true) else math.nan,
        "MCC": float(skm.matthews_corrcoef(y_true, y_pred)) if len(set(y_true)) > 1 else math.nan,
    }
    if k == 2:
        result.update(_binary(y_true, y_pred))
        result["AUC"] = float(skm.roc_auc_score(y_true, proba[:, 1])) if len(set(y_true)) == 2 else math.nan
    else:
        per_class = [_binary((y_true == c).astype(int), (y_pred == c).astype(int)) for c in range(k)]
        for key in per_class[0]:
            result[key] = _macro([m[key] for m in per_class])
        aucs = []
        for c, name in enumerate(classes):
            positive = (y_true == c).astype(int)
            auc = float(skm.roc_auc_score(positive, proba[:, c])) if 0 < positive.sum() < len(positive) else math.nan
            result[f"AUC-{name}"] = auc
            aucs.append(auc)
        result["AUC"] = _macro(aucs)
    return result


def regression(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    error = np.asarray(y_pred, float) - np.asarray(y_true, float)
    result = {"MAE": float(np.abs(error).mean()), "MSE": float((error**2).mean()),
              "RMSE": float(np.sqrt((error**2).mean()))}
    result["R2"] = float(skm.r2_score(y_true, y_pred)) if len(y_true) > 1 else math.nan
    return result


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int = 7, sigma: float = 1.5) -> float:
    """Structural similarity of two images (C, *spatial), 2D or 3D, with a Gaussian window."""
    dims = x.dim() - 1
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    conv = F.conv3d if dims == 3 else F.conv2d
    x, y = x.float().unsqueeze(0), y.float().unsqueeze(0)
    channels = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:
        for axis in range(dims):
            shape = [1] * dims
            shape[axis] = window
            kernel = g.view(1, 1, *shape).repeat(channels, 1, *([1] * dims))
            t = conv(t, kernel, groups=channels)
        return t

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def reconstruction(targets: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, float]:
    """Per image, then averaged over the set."""
    values: dict[str, list[float]] = {"MAE": [], "RMSE": [], "PSNR": [], "SSIM": []}
    for target, output in zip(targets, outputs, strict=True):
        target, output = target.float(), output.float()
        error = output - target
        mse = float((error**2).mean())
        data_range = float(target.max() - target.min()) or 1.0
        values["MAE"].append(float(error.abs().mean()))
        values["RMSE"].append(math.sqrt(mse))
        values["PSNR"].append(10 * math.log10(data_range**2 / mse) if mse > 0 else math.inf)
        values["SSIM"].append(ssim(target, output, data_range))
    return {key: float(np.mean(v)) if v else math.nan for key, v in values.items()}


def bootstrap(y_true: np.ndarray, scores: np.ndarray, kind: str, groups: np.ndarray | None = None, n: int = 1000,
              seed: int = 0) -> dict[str, tuple]:
    """95 % percentile bootstrap intervals, resampling participants (`groups`: one id per row; a participant's
    sessions are drawn together, as the splits are made) or rows when `groups` is None; vectorised: each
    resample weighs every row by how often its participant was drawn.

    kind "classification": y_true class indices, scores (m, k) probabilities -> accuracy, BA, sensitivity,
    specificity and AUC (binary); kind "regression": scores the predictions -> MAE, RMSE, R2.
    """
    y_true = np.asarray(y_true)
    m = len(y_true)
    codes = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(m)
    units = int(codes.max()) + 1 if m else 0
    if units < 2:
        return {}
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(units, np.full(units, 1.0 / units), size=n)  # (n, units): times each unit is drawn
    weight = drawn[:, codes].astype(float)  # (n, m)
    total = weight.sum(1)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "classification":
            proba = np.asarray(scores)
            k = proba.shape[1]
            hit = (proba.argmax(1) == y_true).astype(float)
            out["accuracy"] = (weight * hit).sum(1) / total
            recalls = [(weight * hit * (y_true == c)).sum(1) / (weight * (y_true == c)).sum(1) for c in range(k)]
            out["BA"] = np.nanmean(np.stack(recalls), 0) if k else np.full(n, np.nan)
            if k == 2:
                out["sensitivity"], out["specificity"] = recalls[1], recalls[0]
                positive, negative = y_true == 1, y_true == 0
                score = proba[:, 1]
                # weighted Mann-Whitney: each (positive, negative) pair counts w_i * w_j
                order = np.sign(score[positive][:, None] - score[negative][None, :]) / 2 + 0.5
                pairs = np.einsum("bi,ij,bj->b", weight[:, positive], order, weight[:, negative])
                out["AUC"] = pairs / (weight[:, positive].sum(1) * weight[:, negative].sum(1))
        else:
            predicted = np.asarray(scores, float)
            truth = y_true.astype(float)
            error = predicted - truth
            out["MAE"] = (weight * np.abs(error)).sum(1) / total
            out["RMSE"] = np.sqrt((weight * error**2).sum(1) / total)
            mean = (weight * truth).sum(1, keepdims=True) / total[:, None]
            out["R2"] = 1 - (weight * error**2).sum(1) / (weight * (truth - mean) ** 2).sum(1)
    intervals = {}
    for name, values in out.items():
        finite = values[np.isfinite(values)]
        if len(finite) >= n // 2:
            intervals[name] = (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
    return intervals
