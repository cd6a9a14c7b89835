"""Architectures match ClinicaDL's (names, shapes), take their sizes from the input, and fail clearly."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from clinicadl_app.group.networks import ArchitectureError, PretrainedWeightsError, build_network
from clinicadl_app.group.networks.layers import CropMaxUnpool, PadMaxPool
from clinicadl_app.group.networks.pretrained import TORCHVISION_NAMES
from clinicadl_app.group.networks.shapes import output_shape

from .conftest import torchvision_names


def test_conv5_fc3_has_clinicadl_layout_at_full_size():
    model = build_network("Conv5_FC3", (1, 169, 208, 179), 2)
    state = model.state_dict()
    assert state["convolutions.0.weight"].shape == (8, 1, 3, 3, 3)
    assert state["convolutions.16.weight"].shape == (128, 64, 3, 3, 3)
    assert state["fc.2.weight"].shape == (1300, 128 * 6 * 7 * 6)
    assert state["fc.6.weight"].shape == (2, 50)
    assert sum(p.numel() for p in model.parameters()) == 42_293_972


@pytest.mark.parametrize("name", ["Conv5_FC3", "Conv4_FC3", "Stride_Conv5_FC3"])
@pytest.mark.parametrize("shape", [(1, 33, 40, 27), (3, 64, 50)])
def test_sizes_come_from_the_input(name, shape):
    model = build_network(name, shape, 3).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 3)
    autoencoder = build_network(name, shape, 3, autoencoder=True).eval()
    assert autoencoder(torch.rand(2, *shape)).shape == (2, *shape)


def test_resnet18_for_slices_and_refusal_on_volumes(tmp_path):
    model = build_network("resnet18", (3, 208, 179), 2).eval()
    assert model(torch.rand(2, 3, 208, 179)).shape == (2, 2)
    weights = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, weights)
    again = build_network("resnet18", (3, 208, 179), 2, pretrained_weights=weights)
    assert torch.equal(again.state_dict()["convolutions.0.weight"], model.state_dict()["convolutions.0.weight"])
    with pytest.raises(ArchitectureError, match="2D slices"):
        build_network("resnet18", (1, 50, 50, 50), 2)


def test_resnet18_starts_from_torchvision_weights_and_sums_them_for_one_channel(tmp_path):
    source = build_network("resnet18", (3, 64, 56), 5).eval()
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)  # no tensor keeps the value a fresh network would draw
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision_names(source.state_dict()), weights)
    rgb = build_network("resnet18", (3, 64, 56), 2, pretrained_weights=weights).eval()
    theirs, ours = source.state_dict(), rgb.state_dict()
    loaded = [name for name in ours if any(name.startswith(prefix) for _, prefix in TORCHVISION_NAMES)]
    assert len(loaded) == len(ours) - 2 and all(torch.equal(ours[name], theirs[name]) for name in loaded)
    assert not torch.equal(ours["fc.fc_out.bias"], theirs["fc.fc_out.bias"][:2])
    grey = build_network("resnet18", (1, 64, 56), 2, pretrained_weights=weights).eval()
    image = torch.rand(2, 1, 64, 56)
    with torch.no_grad():
        expected = rgb.convolutions(image.expand(-1, 3, -1, -1))
        assert torch.allclose(grey.convolutions(image), expected, rtol=1e-4, atol=1e-5)


def test_pretrained_weights_refusals(tmp_path):
    garbage, unrelated = tmp_path / "garbage.pth", tmp_path / "unrelated.pth"
    garbage.write_bytes(b"not a state dict")
    torch.save({"encoder.weight": torch.ones(3)}, unrelated)
    for path, reason in ((tmp_path / "absent.pth", "no such file"), (garbage, "not a torch state dict"),
                         (unrelated, "no tensor matches")):
        with pytest.raises(PretrainedWeightsError, match=reason) as refused:
            build_network("resnet18", (3, 64, 56), 2, pretrained_weights=path)
        assert str(path) in str(refused.value) and "pretrained_weights" in str(refused.value)
    with pytest.raises(ArchitectureError, match="resnet18 only.*transfer_path"):
        build_network("Conv5_FC3", (1, 40, 48, 40), 2, pretrained_weights=unrelated)


def test_unknown_and_custom_architectures():
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        build_network("VGG", (1, 20, 20, 20), 2)
    custom = build_network("tests.test_networks:tiny", (1, 20, 20, 20), 2)
    assert custom(torch.rand(1, 1, 20, 20, 20)).shape == (1, 2)
    with pytest.raises(ArchitectureError, match="maps"):
        build_network("tests.test_networks:tiny", (1, 20, 20, 20), 5)


def tiny(in_shape, output_size, dropout):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20 * 20 * 20, 2))


@pytest.mark.parametrize("shape", [(2, 3, 17, 20, 9), (1, 4, 8, 8, 8), (2, 2, 15, 6)])
def test_in_place_pooling_equals_clinicadl_padding(shape):
    x = torch.relu(torch.randn(shape))
    dims = len(shape) - 2
    reference = PadMaxPool(2, 2, dims)(x)
    fast = PadMaxPool(2, 2, dims, nonnegative=True)(x)
    assert torch.equal(reference, fast)
    pooled, indices, pad = PadMaxPool(2, 2, dims, return_indices=True)(x)
    restored = CropMaxUnpool(2, 2, dims)(pooled, indices, pad)
    assert restored.shape == x.shape and torch.equal(restored.amax(), x.amax())


def _meta_shape(module: torch.nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    meta = copy.deepcopy(module).to("meta").eval()  # eval: BatchNorm accepts one value per channel
    with torch.no_grad():
        return tuple(meta(torch.empty(1, *in_shape, device="meta")).shape[1:])


@pytest.mark.parametrize("name,shape", [
    *[(n, s) for n in ("Conv5_FC3", "Conv4_FC3", "Stride_Conv5_FC3", "random")
      for s in ((1, 169, 208, 179), (1, 50, 50, 50), (1, 33, 41, 27), (3, 208, 179), (1, 7, 9, 5))],
    ("resnet18", (3, 208, 179)), ("resnet18", (3, 33, 47)), ("resnet18", (1, 64, 65)),
])
def test_shapes_by_arithmetic_equal_the_meta_device(name, shape):
    """Heads are sized without running the network (no meta device in inference-only runs): the same sizes."""
    model = build_network(name, shape, 3)
    for part in (model.convolutions, model):
        assert output_shape(part, shape) == _meta_shape(part, shape), part.__class__.__name__
    pools = [PadMaxPool(2, 2, len(shape) - 1), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True),
             torch.nn.Conv2d(shape[0], 4, 5, stride=3, padding=2, dilation=2)]
    for layer in pools if len(shape) == 3 else pools[:1]:
        assert output_shape(layer, shape) == _meta_shape(layer, shape), layer


def test_an_input_that_does_not_fit_is_refused_by_arithmetic_too():
    with pytest.raises(ArchitectureError, match="does not fit inputs of shape"):
        build_network("tests.test_networks:tiny", (1, 10, 10, 10), 2)
    with pytest.raises(ArchitectureError, match="does not fit inputs of shape"):
        build_network("tests.test_networks:unpadded", (1, 4, 4, 4), 2)


def unpadded(in_shape, output_size, dropout):
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 5), torch.nn.Flatten(), torch.nn.Linear(2, output_size))


def test_building_the_built_in_classifiers_runs_nothing_on_the_meta_device():
    """The meta device's first use imports torch's dynamo (1-2 s), which a predict run would pay for nothing."""
    code = ("import sys; from clinicadl_app.group.networks import build_network; "
            "[build_network(n, s, 2) for n, s in [('Conv5_FC3', (1, 169, 208, 179)), ('Stride_Conv5_FC3', (1, 50, 50, 50)),"
            " ('random', (1, 40, 40, 40)), ('resnet18', (3, 208, 179))]]; print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
