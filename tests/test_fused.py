"""BatchNorm-ReLU-pool fused into one autograd node: the same numbers as the modules one by one (bit for bit
with torch's kernels in contiguous memory; within float32 rounding in channels-last memory, where the node pools
before normalising and folds few channels), with the ReLU output no longer kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clinicadl_app.group.networks import build_network, fused
from clinicadl_app.group.networks.autoencoder import AutoEncoder
from clinicadl_app.group.networks.fused import ConvBlocks, _statistics, folding
from clinicadl_app.group.networks.layers import PadMaxPool
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
def test_3d_blocks_match_the_modules_and_keep_less(layout, momentum):
    """Contiguous: torch's kernels, bit for bit. Channels-last: pooled before normalising, within rounding."""
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
        step_matches(layout, (out, state), (out_ref, state_ref))
    first_relu_output = 3 * 8 * 33 * 41 * 27 * 4  # bytes of the largest ReLU output
    assert kept_ref - kept >= first_relu_output


def close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Within float32 rounding of a sum over many voxels, relative to the tensor's largest value; a gradient that
    is zero in exact arithmetic (a convolution's bias before BatchNorm) is rounding noise in both."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 + 2e-5 * scale, msg=lambda m: f"{name}: {m}")


def states_close(state: dict[str, torch.Tensor], state_ref: dict[str, torch.Tensor]) -> None:
    """Every gradient and buffer close(). A convolution's bias gradient before BatchNorm is zero in exact
    arithmetic, so both are rounding noise whose size depends on the order of the sum (one thread or two):
    there both must be zero within 1e-3 of the largest gradient of that convolution's weight."""
    for name, expected in state_ref.items():
        weight = state_ref.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
        bound = 1e-3 * float(weight.abs().max()) if weight is not None else 0.0
        if float(expected.abs().max()) < bound:
            assert float(state[name].abs().max()) < bound, f"{name}: {state[name]} is not zero within {bound:.2g}"
        else:
            close(state[name], expected, name)


def step_matches(layout: torch.memory_format, ours: tuple, reference: tuple) -> None:
    """One step's (output, state): contiguous, torch's kernels bit for bit; channels-last, within rounding."""
    (out, state), (out_ref, state_ref) = ours, reference
    if layout == torch.contiguous_format:
        assert torch.equal(out, out_ref) and all(torch.equal(state[n], state_ref[n]) for n in state_ref)
    else:
        close(out, out_ref)
        states_close(state, state_ref)


def steps_close(model: nn.Module, reference: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """Two training steps (the second with running statistics the first updated) give the same output, gradients
    and buffers within rounding; the bytes autograd saved in each."""
    for _ in range(2):
        out, state, kept = step(model, inputs)
        out_ref, state_ref, kept_ref = step(reference, inputs)
        close(out, out_ref)
        states_close(state, state_ref)
    return kept, kept_ref


def test_folded_statistics_are_exact_for_a_large_offset():
    """Mean of the halves' means and mean of their variances plus the variance of their means: no cancellation
    even when the mean is a thousand standard deviations away from zero."""
    torch.manual_seed(3)
    x = (1000 + torch.randn(2, 8, 10, 12, 14) * torch.linspace(0.5, 2, 8).view(1, 8, 1, 1, 1))
    x[..., ::2] += 3  # the voxels paired in a folded row (neighbours along the last axis) differ
    x = x.contiguous(memory_format=torch.channels_last_3d)
    assert folding(x) == 2
    assert folding(x.contiguous()) == 1 and folding(x[:1, :, :3, :5, :7].contiguous(memory_format=torch.channels_last_3d)) == 1
    mean, var = _statistics(x, 2)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3, 4), correction=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-3, atol=0)


def test_statistics_from_many_unequal_blocks_match_float64(monkeypatch):
    """The blocks' statistics are combined exactly: blocks of 11 rows (in 3D with 8 channels the first
    one constant, a background; the last one shorter, one row with 4 channels) give the whole tensor's mean and variance, a thousand standard deviations
    from zero, in 2D and 3D, folded or not."""
    monkeypatch.setattr(fused, "_BLOCK_BYTES", 11 * 16 * 4)
    torch.manual_seed(4)
    for shape, k in (((2, 8, 10, 12, 14), 2), ((3, 16, 9, 13), 1), ((2, 4, 6, 10, 7), 4)):
        x = 1000 + torch.randn(*shape) * torch.linspace(0.5, 2, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
        x[:1, :, :1, :2] = 1000  # a constant background (14 rows in the first shape: a whole block)
        x = x.contiguous(memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)
        assert folding(x) == k and (x.numel() // 16) % 11
        mean, var = _statistics(x, k)
        dims = (0, *range(2, len(shape)))
        expected_var, expected_mean = torch.var_mean(x.double(), dim=dims, correction=0)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), expected_var, rtol=1e-3, atol=0)


def test_statistics_of_a_large_block_do_not_drift():
    """Over a million rows, one float32 pass of torch's channels-last kernel drifts (its variance 2e-4 off
    here, 0.8 % over Conv5_FC3's first block); cache-sized blocks combined in float64 stay within 2e-5."""
    torch.manual_seed(5)
    x = (torch.randn(2, 8, 100, 100, 100) + 1.5).contiguous(memory_format=torch.channels_last_3d)
    mean, var = _statistics(x, 2)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3, 4), correction=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=2e-5, atol=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=2e-5, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_few_channels_in_channels_last_are_folded_and_match_the_modules(momentum):
    torch.manual_seed(4)
    shape = (1, 32, 40, 26)  # an even number of voxels: the first block's 8 channels are folded
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=torch.channels_last_3d)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.momentum = momentum
    reference = plain(model)
    inputs = torch.rand(3, *shape).contiguous(memory_format=torch.channels_last_3d)
    assert folding(model.convolutions[0](inputs)) == 2
    kept, kept_ref = steps_close(model, reference, inputs)
    assert kept_ref - kept >= 3 * 8 * 32 * 40 * 26 * 4
    with torch.no_grad():  # BatchNorm recalibration: train mode without gradients, folded too
        model(inputs)
        reference(inputs)
    for (name, buffer), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
        close(buffer, expected, name)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_2d_random_network_matches_in_training_evaluation_and_recalibration(layout):
    """Contiguous: torch's kernels, bit for bit. Channels-last: the 8-channel blocks folded, within rounding."""
    torch.manual_seed(1)
    model = random_cnn((1, 37, 30), 3, 0.0, RandomSpec(n_convblocks=3, n_conv=2))
    model = model.to(memory_format=layout)
    reference = plain(model)
    inputs = torch.rand(4, 1, 37, 30).contiguous(memory_format=layout)
    assert folding(model.convolutions[0](inputs)) == (2 if layout == torch.channels_last else 1)
    same = torch.equal if layout == torch.contiguous_format else lambda a, b: close(a, b) is None
    out, state, _ = step(model, inputs)
    out_ref, state_ref, _ = step(reference, inputs)
    step_matches(layout, (out, state), (out_ref, state_ref))
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert same(model(inputs), reference(inputs))
        model.train()
        reference.train()
        model(inputs)  # recalibration: train mode without gradients
        reference(inputs)
    assert all(same(a, b) for a, b in zip(model.buffers(), reference.buffers(), strict=True))


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


def test_a_hook_on_the_convolution_sees_its_output_intact_after_backward():
    """The folded backward writes dx over the convolution's output, unless something may hold that output."""
    torch.manual_seed(5)
    shape = (1, 32, 40, 26)
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=torch.channels_last_3d)
    inputs = torch.rand(2, *shape).contiguous(memory_format=torch.channels_last_3d)
    kept = []
    model.convolutions[0].register_forward_hook(lambda module, args, output: kept.append(output))
    reference = plain(model)
    out, state, _ = step(model, inputs)
    out_ref, state_ref, _ = step(reference, inputs)
    close(state["grad:convolutions.0.weight"], state_ref["grad:convolutions.0.weight"])
    with torch.no_grad():
        assert torch.equal(kept[0], model.convolutions[0](inputs))


def test_the_backward_allocates_nothing_as_large_as_the_first_convolution_output():
    """The pooled gradient goes back one image at a time: a zeroed tensor the size of the whole batch's first
    activation, allocated in every backward, was often taken from fresh pages (+0.6-1.7 GiB peak in training)."""
    from torch.profiler import profile

    torch.manual_seed(6)
    shape, batch = (1, 32, 40, 26), 3
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=torch.channels_last_3d)
    inputs = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last_3d)
    loss = model(inputs).sum()
    first = batch * 8 * shape[1] * shape[2] * shape[3] * 4  # bytes of the first convolution's float32 output
    with profile(profile_memory=True) as prof:
        loss.backward()
    allocated: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("aten::"):
            allocated[event.name] = max(allocated.get(event.name, 0), event.cpu_memory_usage)
    assert allocated["aten::max_pool3d_with_indices_backward"] > 0  # the pooling's backward was seen
    assert max(allocated.values()) < first, sorted(allocated.items(), key=lambda item: -item[1])[:3]


def test_negative_batchnorm_weights_pool_the_minimum_in_training_recalibration_and_evaluation():
    """Where a BatchNorm weight is negative, the window's largest normalised value comes from x's smallest: the
    channels-last node pools -x there. Half the channels negative, biases spread around zero (ReLU masks)."""
    torch.manual_seed(6)
    shape = (1, 32, 40, 26)
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.weight[::2] *= -1.5
                module.bias.uniform_(-0.5, 0.5)
    reference = plain(model)
    inputs = torch.rand(3, *shape).contiguous(memory_format=torch.channels_last_3d)
    steps_close(model, reference, inputs)
    model.eval()
    reference.eval()
    with torch.no_grad():
        evaluated = model(inputs)
        close(evaluated, reference(inputs))
        assert torch.equal(evaluated, model(inputs))  # inference is repeatable
        model.train()
        reference.train()
        model(inputs)  # recalibration
        reference(inputs)
    for (name, buffer), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
        close(buffer, expected, name)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


class ChannelsLastConvolution(nn.Conv3d):
    """Where the CPU has no bfloat16 instructions, torch's emulated bfloat16 convolution returns contiguous
    memory (and the modules run): this one returns channels-last memory on every CPU, as oneDNN's does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last_3d)


def test_bfloat16_autocast_in_channels_last_is_fused_and_as_close_to_float32_as_the_modules():
    """Under the CPU's bfloat16 autocast, a channels-last block (8 channels: folded) runs the node, with the ReLU
    output not kept: its output, gradients and running statistics are as close to float32 as torch's own
    bfloat16 modules (the convolution's bias before BatchNorm has no gradient in exact arithmetic: not compared)."""
    torch.manual_seed(7)
    shape = (1, 32, 40, 26)
    model = build_network("Conv5_FC3", shape, 2).to(memory_format=torch.channels_last_3d)
    convolution = ChannelsLastConvolution(1, 8, 3, padding=1).to(memory_format=torch.channels_last_3d)
    convolution.load_state_dict(model.convolutions[0].state_dict())
    block = type(model.convolutions)(convolution, *model.convolutions[1:4])  # BatchNorm, ReLU, pooling
    modules, exact = nn.Sequential(*copy.deepcopy(block)), nn.Sequential(*copy.deepcopy(block))
    inputs = torch.rand(3, *shape).contiguous(memory_format=torch.channels_last_3d)
    out_exact, state_exact, _ = step(exact, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state, kept = step(block, inputs)
        out_modules, state_modules, kept_modules = step(modules, inputs)
    assert kept_modules - kept >= 3 * 8 * 32 * 40 * 26 * 2  # at least the bfloat16 ReLU output
    assert relative(out, out_exact) <= 1.25 * relative(out_modules, out_exact) + 1e-4
    for name in set(state_exact) - {"grad:0.bias"}:
        error, error_modules = relative(state[name], state_exact[name]), relative(state_modules[name], state_exact[name])
        assert error <= 1.25 * error_modules + 1e-4, (name, error, error_modules)
    for network in (block, modules, exact):
        network.eval()
    with torch.no_grad():
        expected = exact(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            evaluated = block(inputs)
            assert torch.equal(evaluated, block(inputs))  # inference is repeatable
            assert relative(evaluated, expected) <= 1.25 * relative(modules(inputs), expected) + 1e-4


def test_a_bfloat16_convolution_over_two_voxels_of_depth_runs_in_float32():
    """torch 2.13's bfloat16 3D convolution (oneDNN on AVX512-BF16) leaves its weight gradient undefined where
    the input is 2 voxels deep (NaN, or another value at each call): ConvBlocks runs such a layer in float32,
    so the gradient is finite, the same every time, and float32's. Memory full of NaN is freed before each call
    so that a read of memory the kernel did not write shows."""
    torch.manual_seed(8)
    convolution = nn.Conv3d(16, 32, 3, padding=1)
    blocks = ConvBlocks(convolution, nn.BatchNorm3d(32), nn.ReLU(), PadMaxPool(2, 2)).to(
        memory_format=torch.channels_last_3d)
    inputs = torch.randn(4, 16, 2, 6, 5).contiguous(memory_format=torch.channels_last_3d)

    def gradient(amp: bool) -> torch.Tensor:
        freed = [torch.full((2**20,), float("nan")) for _ in range(4)]
        del freed
        blocks.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = blocks(inputs)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return convolution.weight.grad.clone()

    expected = gradient(amp=False)
    for _ in range(3):
        close(gradient(amp=True), expected, "convolution weight")


def test_an_autoencoder_over_two_voxels_of_depth_has_defined_gradients_in_bfloat16():
    """The same for the autoencoder's own loops: its last encoder convolution and first transposed convolution
    see 2 voxels of depth (Conv5_FC3 on 32 voxels), and every weight gradient is finite and repeatable."""
    torch.manual_seed(9)
    model = AutoEncoder(build_network("Conv5_FC3", (1, 32, 40, 36), 2)).to(memory_format=torch.channels_last_3d)
    inputs = torch.rand(2, 1, 32, 40, 36).contiguous(memory_format=torch.channels_last_3d)

    def gradients() -> list[torch.Tensor]:
        freed = [torch.full((2**20,), float("nan")) for _ in range(4)]
        del freed
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (model(inputs).float() - inputs).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    first = gradients()
    assert all(bool(g.isfinite().all()) for g in first)
    for again in (gradients(), gradients()):
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
