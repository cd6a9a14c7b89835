"""BatchNorm-ReLU-pool fused into one autograd node: the same numbers, bit for bit, as the modules one by one,
with the ReLU output no longer kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clinicadl_app.group.networks import build_network
from clinicadl_app.group.networks.random import RandomSpec, random_cnn


def step(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, every gradient and BatchNorm buffer after one training step, and the bytes autograd saved."""
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes() if tensor.device.type != "meta" else 0)
        return tensor

    torch.manual_seed(0)  # the same dropout masks
    model.train()
    model.zero_grad(set_to_none=True)
    inputs = inputs.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(inputs)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    state = {f"grad:{name}": p.grad for name, p in model.named_parameters()}
    state.update({f"buffer:{name}": b.clone() for name, b in model.named_buffers()})
    state["grad:input"] = inputs.grad
    return output.detach(), state, sum(saved)


def plain(model: nn.Module) -> nn.Module:
    """The same network with its convolution blocks run module by module."""
    copied = copy.deepcopy(model)
    copied.convolutions = nn.Sequential(*copied.convolutions)
    return copied


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_3d_blocks_match_the_modules_bit_for_bit_and_keep_less(layout, momentum):
    torch.manual_seed(0)
    shape = (1, 33, 41, 27)  # odd sizes: the pooling pads before each axis
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=layout)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.momentum = momentum
    reference = plain(model)
    inputs = torch.rand(3, *shape).contiguous(memory_format=layout)
    for _ in range(2):  # the second step uses running statistics updated by the first
        out, state, kept = step(model, inputs)
        out_ref, state_ref, kept_ref = step(reference, inputs)
        assert torch.equal(out, out_ref)
        for name in state_ref:
            assert torch.equal(state[name], state_ref[name]), name
    first_relu_output = 3 * 8 * 33 * 41 * 27 * 4  # bytes of the largest ReLU output
    assert kept_ref - kept >= first_relu_output


def test_2d_random_network_matches_and_evaluation_and_recalibration_use_the_modules():
    torch.manual_seed(1)
    model = random_cnn((1, 37, 29), 3, 0.0, RandomSpec(n_convblocks=3, n_conv=2))
    reference = plain(model)
    inputs = torch.rand(4, 1, 37, 29)
    out, state, _ = step(model, inputs)
    out_ref, state_ref, _ = step(reference, inputs)
    assert torch.equal(out, out_ref) and all(torch.equal(state[n], state_ref[n]) for n in state_ref)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))
        model.train()
        reference.train()
        model(inputs)  # recalibration: train mode without gradients
        reference(inputs)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers(), strict=True))


def test_autocast_and_hooks_fall_back_to_the_modules():
    """bfloat16 autocast and a hook on a block (as Grad-CAM sets) see every module run."""
    torch.manual_seed(2)
    model = build_network("Conv5_FC3", (1, 20, 24, 20), 2)
    seen = []
    model.convolutions[2].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    step(model, torch.rand(2, 1, 20, 24, 20))
    assert seen == [torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(model, torch.rand(2, 1, 20, 24, 20))
    assert seen == [torch.float32, torch.bfloat16]
