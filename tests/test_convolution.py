"""A channels-last float32 3D convolution in training takes its bias gradient as a sum: the same gradients as the
module's, for every stride and padding the networks use, with frozen parameters, and only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clinicadl_app.group.networks.fused import run_layer

CHANNELS_LAST = torch.channels_last_3d


def gradients(conv: nn.Conv3d, x: torch.Tensor, through_run_layer: bool) -> tuple:
    """Output, weight, bias and input gradients, and the output's autograd node."""
    conv.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = run_layer(conv, x) if through_run_layer else conv(x)
    # a weighting that gives every output channel a non-zero bias gradient
    (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    return out.detach(), conv.weight.grad, conv.bias.grad, x.grad, out.grad_fn


@pytest.mark.parametrize(("in_channels", "stride", "input_grad"), [(1, 1, False), (8, 1, True), (4, 2, True)])
def test_gradients_match_the_module(in_channels, stride, input_grad):
    torch.manual_seed(0)
    conv = nn.Conv3d(in_channels, 16, 3, padding=1, stride=stride).to(memory_format=CHANNELS_LAST)
    x = torch.randn(3, in_channels, 9, 12, 7).contiguous(memory_format=CHANNELS_LAST).requires_grad_(input_grad)
    *ours, grad_fn = gradients(conv, x, through_run_layer=True)
    *module, grad_fn_module = gradients(copy.deepcopy(conv), x, through_run_layer=False)
    assert "_Convolution" in type(grad_fn).__name__ and "Convolution" in type(grad_fn_module).__name__
    assert type(grad_fn) is not type(grad_fn_module)
    for name, actual, expected in zip(("output", "weight", "bias", "input"), ours, module, strict=True):
        if expected is None:
            assert actual is None, name
            continue
        assert float(expected.abs().max()) > 0.1, name  # a real gradient, not rounding noise
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_a_frozen_convolution_gets_no_gradient_and_passes_one_back():
    torch.manual_seed(1)
    conv = nn.Conv3d(8, 8, 3, padding=1).to(memory_format=CHANNELS_LAST).requires_grad_(False)
    x = torch.randn(2, 8, 6, 7, 5).contiguous(memory_format=CHANNELS_LAST).requires_grad_(True)
    out = run_layer(conv, x)
    out.sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None
    expected = torch.autograd.grad(conv(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("case", ["contiguous model", "no gradients", "hook", "autocast"])
def test_the_module_runs_where_the_sum_does_not_apply(case):
    """A contiguous model stays bit for bit the module's (even its one-channel first layer, whose input and
    kernel are contiguous in both layouts); hooks must see a module; autocast casts inside the module."""
    conv = nn.Conv3d(1, 8, 3, padding=1)
    if case != "contiguous model":
        conv = conv.to(memory_format=CHANNELS_LAST)
    x = torch.randn(2, 1, 6, 7, 5).contiguous(memory_format=CHANNELS_LAST)
    if case == "hook":
        conv.register_forward_hook(lambda *args: None)
    with torch.set_grad_enabled(case != "no gradients"), torch.autocast("cpu", enabled=case == "autocast"):
        out = run_layer(conv, x)
    assert out.grad_fn is None if case == "no gradients" else "_Convolution" not in type(out.grad_fn).__name__
