"""BatchNorm whose training statistics span every process's share of the global batch, on CPUs as on GPUs.

torch's nn.SyncBatchNorm runs only on GPUs; data-parallel training on CPUs (gloo) needs the same layer. This
one sums each channel's count, sum and sum of squares over the processes with torch's differentiable
all_reduce (torch.distributed._functional_collectives), so its gradients, like torch's, flow to every
process's inputs. Its state dict is a BatchNorm's: models trained with it load into the plain networks that
predict and interpret build.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        # torch's differentiable collective (torch.distributed.nn.functional's successor): backward sums too
        from torch.distributed._functional_collectives import all_reduce

        channels = input.shape[1]
        if input.numel():
            wide = input if input.dtype == torch.float64 else input.float()
            var_local, mean_local = torch.var_mean(wide, [0, *range(2, input.dim())], correction=0)
            n = input.numel() / channels
            mean_local, var_local = mean_local.double(), var_local.double()
            local = torch.cat([n * mean_local, n * (var_local + mean_local * mean_local), mean_local.new_full((1,), n)])
        else:  # a process with no input in this batch (the end of a sharded pass) still takes part
            local = torch.zeros(2 * channels + 1, dtype=torch.float64, device=input.device)
        # per-process moments combined in float64 (Chan et al.): E[x^2] - mean^2 stays exact
        total = all_reduce(local, "sum", dist.group.WORLD)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0)
        shape = (1, channels, *([1] * (input.dim() - 2)))
        return torch.addcmul(shift.to(input.dtype).view(shape), input, scale.to(input.dtype).view(shape))


def convert(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of `module` replaced by a SyncBatchNorm holding the same parameters and statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        synced = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced.to(next(iter(module.state_dict().values())).device) if module.state_dict() else synced
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
