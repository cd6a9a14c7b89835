"""Augmentation draws reproducibly per item and never changes shapes; every attribution method returns a
non-negative map of the input's shape that is larger where the model looks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clinicadl_app.core.config import Train
from clinicadl_app.core.errors import UsageError
from clinicadl_app.group import augment
from clinicadl_app.group.attribution import attribute, grad_cam_layer
from clinicadl_app.group.networks import build_network


@pytest.mark.parametrize("names", [("Noise",), ("Erasing",), ("CropPad",), ("Smoothing",), ("Motion", "Ghosting"),
                                   ("Spike",), ("BiasField",), ("Flip",)])
@pytest.mark.parametrize("shape", [(1, 24, 28, 20), (3, 40, 36)])
def test_augmentations_are_seeded_and_keep_shape(names, shape):
    transform = augment.build(names)
    x = torch.rand(shape)
    first, again = augment.seeded(transform, x, 7), augment.seeded(transform, x, 7)
    assert first.shape == x.shape and torch.equal(first, again)
    others = [augment.seeded(transform, x, seed) for seed in range(8)]
    assert any(not torch.equal(other, x) for other in others), "the transform must change some inputs"
    state = torch.get_rng_state()
    augment.seeded(transform, x, 3)
    assert torch.equal(state, torch.get_rng_state()), "the global random stream is untouched"


def test_unknown_augmentation_is_refused_by_the_configuration():
    with pytest.raises((ValueError, TypeError)):
        from clinicadl_app.core.config_file import coerce

        coerce(Train, "data_augmentation", ["Rotate"])


class LeftEye(nn.Module):
    """Class 1 grows with the mean of the left half of the image."""

    in_shape = (1, 8, 8, 8)

    def __init__(self):
        super().__init__()
        self.convolutions = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        features = self.convolutions(x)
        left = features[:, :, :4].mean((2, 3, 4))
        return self.fc(left)


@pytest.mark.parametrize("method", ["gradients", "grad-cam", "integrated-gradients", "occlusion"])
def test_attribution_methods_point_where_the_model_looks(method):
    torch.manual_seed(0)
    model = LeftEye().eval()
    x = torch.rand(1, 1, 8, 8, 8)
    values = attribute(model, method, x, target=1, layer=0)
    assert values.shape == x.shape and (values >= 0).all() and values.sum() > 0
    if method != "grad-cam":  # Grad-CAM weighs whole feature maps: it localises only through the features
        assert values[..., :4, :, :].sum() > values[..., 4:, :, :].sum()


@pytest.mark.parametrize("method", ["integrated-gradients", "occlusion"])
def test_batched_attribution_equals_one_input_at_a_time(method):
    """Occlusion's copies (and integrated gradients' steps on a GPU: benchmarks/gpu_check.py) go through the
    model `batch` at a time: each input's map must stay its own, as computed alone."""
    torch.manual_seed(0)
    model = LeftEye().eval()
    x = torch.rand(2, 1, 8, 8, 8)
    batched = attribute(model, method, x, target=torch.tensor([1, 0]), layer=0, batch=8)
    alone = torch.cat([attribute(model, method, x[i:i + 1], target=target, layer=0) for i, target in ((0, 1), (1, 0))])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(batched[0], batched[1])


def test_grad_cam_layers_are_convolutions_or_residual_stages():
    """-1 is the last stage's output on a ResNet (what Grad-CAM explains there), not its stem convolution."""
    conv = build_network("Conv5_FC3", (1, 40, 48, 40), 2)
    assert grad_cam_layer(conv, -1) is [m for m in conv.convolutions if isinstance(m, nn.Conv3d)][-1]
    resnet = build_network("resnet18", (3, 64, 56), 2).eval()
    assert grad_cam_layer(resnet, -1) is resnet.convolutions[7] and grad_cam_layer(resnet, 0) is resnet.convolutions[0]
    with pytest.raises(UsageError, match="--layer 5: the network has 5 convolution layers or stages"):
        grad_cam_layer(resnet, 5)
    with pytest.raises(UsageError, match="grad-cam needs"):
        grad_cam_layer(nn.Sequential(nn.Flatten(), nn.Linear(8, 2)), -1)
    image = torch.rand(2, 3, 64, 56)
    first, again = (attribute(resnet, "grad-cam", image, target=1, layer=-1) for _ in range(2))
    assert first.shape == image.shape and first.sum() > 0 and torch.equal(first, again)
