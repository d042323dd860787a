import numpy as np
import pytest
import torch
import torch.nn.functional as F

from combireg import losses
from combireg.filters import box_filter, gaussian_blur


def test_box_filter_matches_avg_pool():
    x = torch.rand(1, 2, 11, 9, 13)
    ref = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    np.testing.assert_allclose(box_filter(x, 5).numpy(), ref.numpy(), atol=1e-6)


def test_gaussian_blur_keeps_constants_and_smooths():
    x = torch.ones(1, 1, 10, 12, 14)
    np.testing.assert_allclose(gaussian_blur(x, (1.0, 2.0, 0.0)).numpy(), 1.0, atol=1e-6)
    noise = torch.randn(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, (1.5, 1.5, 1.5)).std() < 0.3 * noise.std()


def test_mse_and_ncc_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 12, 12, 12, generator=g)
    assert float(losses.mse(a, a)) == 0.0
    assert float(losses.mse(a, a + 0.5)) == pytest.approx(0.25)
    # NCC is invariant to local affine intensity changes: 2a + 1 scores (almost) perfectly
    assert float(losses.local_ncc(2 * a + 1, a, window=5)) < 1e-3
    assert float(losses.global_ncc(2 * a + 1, a)) < 1e-5
    b = torch.rand(1, 2, 12, 12, 12, generator=g)
    assert float(losses.local_ncc(b, a, window=5)) > 0.5
    assert float(losses.global_ncc(-a, a)) == pytest.approx(2.0, abs=1e-4)


def test_local_ncc_precomputed_stats_are_equal():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 2, 10, 11, 12, generator=g)
    direct = losses.local_ncc(a, b, window=7)
    cached = losses.local_ncc(a, b, window=7, target_stats=losses.local_stats(b, 7))
    assert float(direct) == pytest.approx(float(cached), rel=1e-6)


def test_weighted_similarity_sums_terms():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 1, 1, 10, 10, 10, generator=g)
    total, terms = losses.weighted_similarity(a, b, ("MSE", "NCC"), (0.3, 0.7), window=5)
    assert float(total) == pytest.approx(0.3 * terms["MSE"] + 0.7 * terms["NCC"], rel=1e-6)


def test_masked_mse():
    a = torch.zeros(1, 1, 4, 4, 4)
    b = torch.zeros(1, 1, 4, 4, 4)
    b[..., 0] = 1.0
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[..., 1:] = 1.0
    assert float(losses.mse(a, b, mask)) == 0.0


def _autograd_local_ncc(warped, target, stats, window, mask=None):
    """Reference: the same formula written with autograd-differentiable tensor ops."""
    cc = losses._local_cc2(warped, target, *stats, window)[0]
    if mask is None:
        return 1.0 - cc.mean()
    m = mask.expand_as(cc)
    return 1.0 - (cc * m).sum() / m.sum()


@pytest.mark.parametrize("masked", [False, True])
def test_local_ncc_hand_written_gradient_matches_autograd(masked):
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 2, 9, 10, 11, generator=g, dtype=torch.float64)
    warped = torch.rand(1, 2, 9, 10, 11, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.rand(1, 1, 9, 10, 11, generator=g, dtype=torch.float64) if masked else None
    stats = losses.local_stats(target, 5)
    ref = _autograd_local_ncc(warped, target, stats, 5, mask)
    (g_ref,) = torch.autograd.grad(ref, warped)
    fused = losses.local_ncc(warped, target, mask, window=5, target_stats=stats)
    (g_fused,) = torch.autograd.grad(fused, warped)
    assert float(fused) == pytest.approx(float(ref), rel=1e-10)
    np.testing.assert_allclose(g_fused.numpy(), g_ref.numpy(), rtol=1e-6, atol=1e-12)


def test_masked_local_ncc_ignores_what_the_mask_excludes():
    g = torch.Generator().manual_seed(6)
    target = torch.rand(1, 1, 12, 12, 12, generator=g, dtype=torch.float64)
    warped = target.clone()
    warped[..., 6:] = torch.rand(1, 1, 12, 12, 6, generator=g, dtype=torch.float64)  # disagree on one half
    mask = torch.zeros(1, 1, 12, 12, 12, dtype=torch.float64)
    mask[..., :3] = 1.0  # far enough (window 5) from the disagreeing half
    assert float(losses.local_ncc(warped, target, mask, window=5)) == pytest.approx(0.0, abs=1e-4)
    assert float(losses.local_ncc(warped, target, window=5)) > 0.2


def test_gradient_regulariser_matches_autograd_reference():
    g = torch.Generator().manual_seed(4)
    u = torch.rand(1, 3, 6, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.5
    ref = sum(((torch.diff(u, dim=dim) * scale[a].view(1, 3, 1, 1, 1)) ** 2).mean() * 3
              for a, dim in enumerate((4, 3, 2)))
    (g_ref,) = torch.autograd.grad(ref, u)
    value = losses.gradient_regulariser(u, scale)
    (g_val,) = torch.autograd.grad(value, u)
    assert float(value) == pytest.approx(float(ref), rel=1e-12)
    np.testing.assert_allclose(g_val.numpy(), g_ref.numpy(), rtol=1e-10, atol=1e-14)


def test_smooth_and_resize_equals_blur_then_interpolate():
    from combireg.filters import smooth_and_resize

    x = torch.rand(1, 2, 17, 20, 23, generator=torch.Generator().manual_seed(5))
    sigma = (1.0, 2.0, 0.5)
    ref = F.interpolate(gaussian_blur(x, sigma), size=(9, 7, 12), mode="trilinear", align_corners=True)
    np.testing.assert_allclose(smooth_and_resize(x, sigma, (9, 7, 12)).numpy(), ref.numpy(), atol=1e-5)
