"""Voxel maps of a model's decision (captum) or of its reconstruction error, on parts or whole images, put
back into the image grid.

Part-based models are explained part by part, each part with the model that decided on it (one network per
part in multi-network mode), for the image-level class; a part's map is scaled by its share of the image's
weighted vote relative to an equal share, so parts that do not vote add nothing and equal weights change
nothing. Overlaps are averaged (images/stitching.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clinicadl_app.core.errors import UsageError
from clinicadl_app.group.data import PartDataset
from clinicadl_app.images.stitching import Canvas

RECONSTRUCTION_ERROR = "reconstruction-error"
RECONSTRUCTION = "reconstruction"
"""Not a method users pick: the stitched output of an autoencoder, for the report's example figure."""


def grad_cam_layer(model: nn.Module, index: int) -> nn.Module:
    """The feature extractor's convolutions, or a ResNet's residual stages (whose output is what Grad-CAM
    explains there, not the convolution inside), numbered 0 first, -1 last."""
    extractor = getattr(model, "convolutions", None)
    if not isinstance(extractor, nn.Sequential):
        raise UsageError(f"grad-cam needs a network whose feature extractor is .convolutions, as ClinicaDL's; "
                         f"{type(model).__name__} has none: use the other --methods")
    layers = [m for m in extractor if any(isinstance(c, nn.Conv3d | nn.Conv2d) for c in m.modules())]
    try:
        return layers[index]
    except IndexError:
        raise UsageError(f"--layer {index}: the network has {len(layers)} convolution layers or stages; use 0 to "
                         f"{len(layers) - 1}, or -1 for the last") from None


def attribute(model: nn.Module, method: str, inputs: torch.Tensor, target: torch.Tensor | int | None,
              layer: int, batch: int = 1) -> torch.Tensor:
    """Attribution of each input voxel, same shape as `inputs`, non-negative. `target`: the class explained
    (one, or one per input); None for a single output (regression). `batch`: how many inputs one forward may
    take (the training batch, which fits): occlusion's perturbed copies (and, on a GPU, integrated gradients'
    steps) go through the model that many at a time, not one by one (occlusion of a 2 mm image 19.5 -> 4.4 s,
    a 1 mm image 66 -> 50 s, Conv5_FC3 on 2 AVX-512 cores)."""
    from captum import attr

    model.eval()
    inputs = inputs.clone().requires_grad_(True)
    if method == "gradients":
        return attr.Saliency(model).attribute(inputs, target=target, abs=True).detach()
    if method == "grad-cam":
        grad_cam = attr.LayerGradCam(model, grad_cam_layer(model, layer))
        cam = grad_cam.attribute(inputs, target=target, relu_attributions=True)
        mode = "trilinear" if inputs.dim() == 5 else "bilinear"
        up = attr.LayerAttribution.interpolate(cam.detach(), tuple(inputs.shape[2:]), interpolate_mode=mode)
        return up.expand_as(inputs).clamp(min=0)
    if method == "integrated-gradients":
        # on a GPU the path's steps go `batch` at a time (single images leave it idle); on a CPU one input at a
        # time, which is faster there (Conv5_FC3, 1 mm, 2 AVX-512 cores: 31 s at 1, 37 s at 8, 42 s at 16)
        steps = max(batch, len(inputs)) if inputs.device.type == "cuda" else len(inputs)
        values = attr.IntegratedGradients(model).attribute(inputs, target=target, n_steps=16,
                                                            internal_batch_size=steps)
        return values.detach().abs()
    if method == "occlusion":
        window = tuple([inputs.shape[1]] + [max(1, s // 6) for s in inputs.shape[2:]])
        stride = tuple([1] + [max(1, s // 6) for s in inputs.shape[2:]])
        values = attr.Occlusion(model).attribute(inputs.detach(), target=target, sliding_window_shapes=window,
                                                 strides=stride, baselines=0,
                                                 perturbations_per_eval=max(1, batch // len(inputs)))
        return values.abs()
    raise UsageError(f"unknown interpretation method {method}")


def explain(model: nn.Module, method: str, inputs: torch.Tensor, target: torch.Tensor | None,
            layer: int, batch: int = 1) -> torch.Tensor:
    """A voxel map per input, same shape as `inputs`."""
    if method in (RECONSTRUCTION_ERROR, RECONSTRUCTION):
        model.eval()
        with torch.no_grad():
            output = model(inputs)
        return (output - inputs).abs() if method == RECONSTRUCTION_ERROR else output
    return attribute(model, method, inputs, target, layer, batch)


def vote_factors(weights: dict[int, float] | None) -> dict[int, float] | None:
    """Each part's vote relative to an equal share; None when parts are not weighed."""
    if not weights:
        return None
    values = np.array(list(weights.values()), dtype=float)
    if not (values > 0).any():  # the vote falls back to equal weights (tasks.ensemble)
        return {part: 1.0 for part in weights}
    return {part: float(w / values.mean()) for part, w in weights.items()}


def image_map(models, dataset: PartDataset, index: int, method: str, target: int | None, layer: int,
              factors: dict[int, float] | None, device: torch.device, batch: int) -> Canvas:
    """The map of image `index` of `dataset`: every part explained and placed back."""
    spec, positions = dataset.spec, len(dataset.parts)
    canvas = Canvas(tuple(dataset.store.image(index).shape[1:]))
    for network, model, _ in models:
        chosen = list(range(positions)) if network is None else [dataset.parts.index(network)]
        for start in range(0, len(chosen), batch):
            chunk = chosen[start:start + batch]
            inputs = torch.stack([dataset[index * positions + p]["input"] for p in chunk]).to(device)
            targets = None if target is None else torch.full((len(chunk),), target, dtype=torch.long)
            values = explain(model, method, inputs, targets, layer, batch)
            values = values.mean(1).cpu().numpy()  # over channels (rgb slices)
            for position, part_map in zip(chunk, values, strict=True):
                part = spec.ids[dataset.parts[position]]
                region, placed = spec.place(part, part_map)
                canvas.add(region, placed, 1.0 if factors is None else factors.get(part, 0.0))
    return canvas
