"""Architectures match ClinicaDL's (names, shapes), take their sizes from the input, and fail clearly."""

from __future__ import annotations

import pytest
import torch

from clinicadl_app.group.networks import ArchitectureError, build_network
from clinicadl_app.group.networks.layers import CropMaxUnpool, PadMaxPool


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
