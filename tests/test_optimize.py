"""The optimiser's own pieces: Adam, and that the IO loop's speed-ups keep its results."""
from __future__ import annotations

import torch

from combireg.optimize import Adam


def test_adam_is_bit_identical_to_torch_adam():
    """Same tensors, same steps: the hand-written Adam equals torch.optim.Adam bit for bit."""
    torch.manual_seed(3)
    start = [torch.randn(1, 3, 5, 6, 7), torch.randn(4, 9)]
    ours = [p.clone().requires_grad_(True) for p in start]
    theirs = [p.clone().requires_grad_(True) for p in start]
    a = Adam(ours, lr=0.01)
    b = torch.optim.Adam(theirs, lr=0.01)
    for step in range(25):
        for params, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            loss = (params[0] ** 3).sin().sum() + (params[1] * (step + 1)).cos().square().sum()
            loss.backward()
            opt.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    assert all(p.grad is not None for p in ours)
    a.zero_grad()
    assert all(p.grad is None for p in ours)
