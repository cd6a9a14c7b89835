"""The optimisers the trainer builds, with --weight_decay: one step on a zero loss gradient leaves only the
decay, whose effect each optimiser defines differently (worked out by hand)."""

from __future__ import annotations

import pytest
import torch

from clinicadl_app.core.config import Train
from clinicadl_app.group.training import make_optimizer

LR, DECAY = 0.01, 0.5


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_weight_decay_is_what_each_optimiser_means_by_it(name):
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, Train(optimizer=name, learning_rate=LR, weight_decay=DECAY))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for old, new in zip(before, model.parameters(), strict=True):
        # Adam: L2 in the gradient, normalised by Adam into a step of lr against the sign; AdamW: decoupled
        # decay; SGD: the first momentum step is the plain gradient wd * p
        expected = old - LR * torch.sign(old) if name == "Adam" else old * (1 - LR * DECAY)
        assert torch.allclose(new.detach(), expected, atol=1e-6), name
    plain = make_optimizer(model, Train(optimizer=name, learning_rate=LR, weight_decay=0.0))
    assert all(group["weight_decay"] == 0.0 for group in plain.param_groups)
