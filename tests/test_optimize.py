"""The optimiser's own pieces: Adam, and that the IO loop's speed-ups keep its results."""
from __future__ import annotations

import pytest
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


def test_warm_up_scales_the_first_steps_of_every_level():
    """WarmUpIterations W: Adam's first step (about LearningRate at every voxel, whatever the
    gradient) is 1/W of it; with W = 0 it is the full step."""
    import numpy as np

    from combireg import Geometry
    from combireg.optimize import optimise_fields
    from combireg.params import default_settings

    geometry = Geometry((24, 20, 16), origin=(5.0, -3.0, 2.0), spacing=(1.5, 1.2, 2.0))
    generator = torch.Generator().manual_seed(0)
    source = torch.rand((1, 1) + geometry.shape, generator=generator)
    target = torch.rand((1, 1) + geometry.shape, generator=generator)
    for warm_up in (0, 4):
        settings = default_settings().replace(num_levels=1, pyramid_spacing=(2.0,), ncc_window_mm=(6.0,),
                                              iterations=(1,), learning_rate=(0.01,), pre_alignment="none",
                                              warm_up_iterations=warm_up)
        fields = optimise_fields(source, target, geometry, settings, inverse=False)
        largest = float(fields.forward.abs().max())
        expected = 0.01 / max(warm_up, 1)
        assert np.isclose(largest, expected, rtol=1e-3), (warm_up, largest)


def test_bending_term_smooths_the_field_and_is_reported():
    """BendingEnergyWeight > 0 adds beta * bending to the loss: on random images (pure noise for
    the similarity to chase) the field ends with much less bending energy, and the level report
    says how much was left; without it no "bending" term is reported."""
    from combireg import Geometry
    from combireg.losses import bending_regulariser
    from combireg.optimize import optimise_fields
    from combireg.params import default_settings
    from combireg.warp import gradient_scale

    geometry = Geometry((24, 20, 16), origin=(5.0, -3.0, 2.0), spacing=(1.5, 1.2, 2.0))
    generator = torch.Generator().manual_seed(1)
    source = torch.rand((1, 1) + geometry.shape, generator=generator)
    target = torch.rand((1, 1) + geometry.shape, generator=generator)
    energy = {}
    for beta in (0.0, 20.0):
        settings = default_settings().replace(num_levels=1, pyramid_spacing=(1.5,), ncc_window_mm=(6.0,),
                                              iterations=(20,), learning_rate=(0.01,), pre_alignment="none",
                                              regularization_weight=(0.0,), bending_weight=(beta,))
        fields = optimise_fields(source, target, geometry, settings, inverse=False)
        level = fields.levels[-1]
        assert ("bending" in level.terms) == (beta > 0)
        energy[beta] = float(bending_regulariser(fields.forward, gradient_scale(fields.geometry),
                                                 fields.geometry.spacing))
        if beta:
            assert level.terms["bending"] == pytest.approx(energy[beta], rel=0.2)
    assert energy[20.0] < 0.2 * energy[0.0]
