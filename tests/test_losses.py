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


@pytest.mark.parametrize("shape, window", [((1, 3, 40, 9, 33), 5), ((2, 1, 30, 31, 12), (3, 5, 7)), ((1, 2, 8, 60, 5), 9)])
def test_box_filter_by_shifted_sums_is_the_matrix_operator_and_its_adjoint(shape, window):
    # Long axes take shifted sums, short ones the banded matrix (filters._sums_cheaper): both
    # must be the truncated box and its transpose.
    from combireg.filters import box_matrix, separable_filter

    x = torch.rand(shape, dtype=torch.float64)
    windows = (window,) * 3 if isinstance(window, int) else window
    mats = [box_matrix(n, w).double() for n, w in zip(shape[2:], windows)]
    torch.testing.assert_close(box_filter(x, window), separable_filter(x, *mats), atol=1e-12, rtol=0)
    torch.testing.assert_close(box_filter(x, window, transpose=True), separable_filter(x, *[m.T for m in mats]),
                               atol=1e-12, rtol=0)
    y = torch.rand(shape, dtype=torch.float64)
    # <B x, y> = <x, B^T y>
    assert float((box_filter(x, window) * y).sum()) == pytest.approx(float((x * box_filter(y, window, transpose=True)).sum()),
                                                                     rel=1e-12)
    xg = torch.rand((1, 1, 26, 4, 11), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, 3), (xg,))


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


# --------------------------------------------------------------------------------------------
# Mutual information
# --------------------------------------------------------------------------------------------


def _smooth_volume(seed, shape=(16, 18, 20), dtype=torch.float64):
    """Smoothed noise rescaled to [0, 1]: an image with structure at several intensities."""
    noise = torch.rand((1, 1) + shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x = gaussian_blur(noise, (2.0, 2.0, 2.0))
    return (x - x.min()) / (x.max() - x.min())


def _cubic_bspline(d):
    d = d.abs()
    return torch.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, torch.where(d < 2, (2 - d) ** 3 / 6, torch.zeros_like(d)))


def _dense_mutual_information(warped, target, mask, bins):
    """Reference: -MI from dense (voxels x bins) Parzen matrices, differentiated by autograd."""
    def window(v):
        x = 1 + v.clamp(0, 1).reshape(-1, 1) * (bins - 3)
        return _cubic_bspline(x - torch.arange(bins, dtype=v.dtype))

    m = torch.ones_like(warped) if mask is None else mask.expand_as(warped)
    p = (window(warped) * m.reshape(-1, 1)).T @ window(target) / m.sum()
    plogp = lambda q: (q * torch.log(q.clamp_min(1e-30))).sum()  # noqa: E731
    return -(plogp(p) - plogp(p.sum(1)) - plogp(p.sum(0)))


@pytest.mark.parametrize("masked", [False, True])
def test_mutual_information_value_and_gradient_match_a_dense_reference(masked):
    g = torch.Generator().manual_seed(7)
    target = torch.rand(1, 1, 6, 7, 8, generator=g, dtype=torch.float64)
    warped = (torch.rand(1, 1, 6, 7, 8, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    mask = torch.rand(1, 1, 6, 7, 8, generator=g, dtype=torch.float64) if masked else None
    ref = _dense_mutual_information(warped, target, mask, 10)
    (g_ref,) = torch.autograd.grad(ref, warped)
    value = losses.mutual_information(warped, target, mask, bins=10)
    (g_val,) = torch.autograd.grad(value, warped)
    assert float(value) == pytest.approx(float(ref), rel=1e-10)
    np.testing.assert_allclose(g_val.numpy(), g_ref.numpy(), rtol=1e-7, atol=1e-14)


def test_mutual_information_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(8)
    target = torch.rand(1, 2, 4, 5, 6, generator=g, dtype=torch.float64)
    # inside (0, 1): the clamp at the ends of the range has a kink there
    warped = (0.05 + 0.9 * torch.rand(1, 2, 4, 5, 6, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(1, 1, 4, 5, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: losses.mutual_information(w, target, mask, bins=8), (warped,))


def test_mutual_information_is_lowest_for_aligned_images():
    x = _smooth_volume(0)
    identical = float(losses.mutual_information(x, x))
    shifted = float(losses.mutual_information(torch.roll(x, 3, dims=4), x))
    unrelated = float(losses.mutual_information(torch.rand(x.shape, generator=torch.Generator().manual_seed(1),
                                                           dtype=x.dtype), x))
    assert identical < -1.0  # nats: a sharp joint histogram
    assert identical < shifted - 1.0
    assert shifted < unrelated
    assert -np.log(32) <= identical and unrelated == pytest.approx(0.0, abs=0.02)


def test_mutual_information_ignores_monotone_intensity_remapping():
    x = _smooth_volume(2)
    reference = float(losses.mutual_information(x, x))
    # decreasing: the symmetric bins and kernel mirror the histogram exactly
    assert float(losses.mutual_information(1 - x, x)) == pytest.approx(reference, rel=1e-9)
    assert float(losses.mutual_information(x, 1 - x)) == pytest.approx(reference, rel=1e-9)
    # increasing, nonlinear: the Parzen estimate changes only as values move between bins
    # (measured 6 %), against 73 % lost by a 2-voxel shift
    assert float(losses.mutual_information(x ** 2, x)) == pytest.approx(reference, rel=0.1)
    assert float(losses.mutual_information(x, x ** 2)) == pytest.approx(reference, rel=0.1)
    assert float(losses.mutual_information(torch.roll(x, 2, dims=4), x)) > 0.5 * reference
    # while the metrics that compare intensities see a large change
    assert float(losses.mse(x ** 2, x)) > 0.01 and float(losses.global_ncc(1 - x, x)) > 1.9


def test_mutual_information_ignores_voxels_with_weight_zero():
    x = _smooth_volume(3)
    mask = torch.ones_like(x)
    mask[..., :7] = 0.0
    garbage = x.clone()
    garbage[..., :7] = torch.rand(garbage[..., :7].shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    garbage.requires_grad_()
    masked = losses.mutual_information(garbage, x, mask)
    assert float(masked) == pytest.approx(float(losses.mutual_information(x, x, mask)), rel=1e-12)
    assert float(masked) < float(losses.mutual_information(garbage, x)) - 0.3  # the garbage counts unmasked
    (grad,) = torch.autograd.grad(masked, garbage)
    assert float(grad[..., :7].abs().max()) == 0.0 and float(grad[..., 7:].abs().max()) > 0.0
    # the weights are a weighted histogram: weight 2 everywhere is weight 1 everywhere
    assert float(losses.mutual_information(garbage, x, 2 * mask)) == pytest.approx(float(masked), rel=1e-12)


def test_mutual_information_averages_channels_and_checks_bins():
    a, b = _smooth_volume(5), _smooth_volume(6)
    both = losses.mutual_information(torch.cat([a, b], 1), torch.cat([a, a], 1), bins=16)
    each = [float(losses.mutual_information(w, a, bins=16)) for w in (a, b)]
    assert float(both) == pytest.approx(np.mean(each), rel=1e-12)
    with pytest.raises(ValueError, match="bins >= 4"):
        losses.mutual_information(a, a, bins=3)


def test_weighted_similarity_combines_all_metrics_with_mi():
    a, b = _smooth_volume(9, dtype=torch.float32), _smooth_volume(10, dtype=torch.float32)
    names = ("MSE", "NCC", "GlobalNCC", "MI")
    total, terms = losses.weighted_similarity(a, b, names, (0.1, 0.2, 0.3, 0.4), window=5, bins=16)
    assert terms["MI"] == pytest.approx(float(losses.mutual_information(a, b, bins=16)), rel=1e-6)
    assert terms["MI"] != pytest.approx(float(losses.mutual_information(a, b)), rel=1e-3)  # bins reached MI
    assert float(total) == pytest.approx(sum(w * terms[n] for w, n in zip((0.1, 0.2, 0.3, 0.4), names)), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Bending energy
# --------------------------------------------------------------------------------------------

def test_bending_regulariser_matches_autograd_reference():
    g = torch.Generator().manual_seed(8)
    u = torch.rand(1, 3, 6, 7, 8, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.5
    spacing = (0.8, 1.3, 2.5)
    ref = sum(((torch.diff(u, n=2, dim=dim) * (scale[a] / spacing[a]).view(1, 3, 1, 1, 1)) ** 2).mean() * 3
              for a, dim in enumerate((4, 3, 2)))
    (g_ref,) = torch.autograd.grad(ref, u)
    value = losses.bending_regulariser(u, scale, spacing)
    (g_val,) = torch.autograd.grad(value, u)
    assert float(value.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    np.testing.assert_allclose(g_val.numpy(), g_ref.numpy(), rtol=1e-10, atol=1e-14)


def _world_field(geometry, function):
    from combireg import warp

    x = geometry.world_grid() - np.asarray(geometry.origin)
    normalised = function(x) @ warp.normalised_per_mm(geometry).T  # float64 throughout
    return torch.as_tensor(np.moveaxis(normalised, -1, 0)[None].copy())


def test_bending_regulariser_is_zero_for_affine_world_fields_on_an_oblique_grid(oblique_geometry):
    from combireg import warp

    g = oblique_geometry
    matrix = np.array([[0.05, 0.02, -0.01], [0.0, -0.04, 0.03], [0.02, 0.01, 0.06]])
    affine = _world_field(g, lambda x: x @ matrix.T + np.array([3.0, -2.0, 1.0]))
    value = losses.bending_regulariser(affine, warp.gradient_scale(g).double(), g.spacing)
    assert float(value) == pytest.approx(0.0, abs=1e-12)
    assert float(losses.gradient_regulariser(affine, warp.gradient_scale(g).double())) > 1e-3


def test_bending_regulariser_is_in_physical_units_on_any_spacing():
    from combireg import warp
    from combireg.geometry import Geometry

    # u = (k x_L^2, 0, 0) in world mm on axis-aligned grids: d^2 u_L / dx_L^2 = 2k, so the value
    # is (2k)^2 whatever the spacing (the second difference of a quadratic is exact).
    k = 0.01
    values = []
    for spacing in ((1.0, 1.0, 1.0), (2.0, 1.5, 4.0)):
        geometry = Geometry((20, 18, 12), origin=(-10.0, 5.0, 3.0), spacing=spacing)
        field = _world_field(geometry, lambda x: np.stack([k * x[..., 0] ** 2, 0 * x[..., 0], 0 * x[..., 0]], -1))
        values.append(float(losses.bending_regulariser(field, warp.gradient_scale(geometry).double(), spacing)))
    assert values == pytest.approx([(2 * k) ** 2] * 2, rel=1e-9)


def test_regularisers_in_one_pass_equal_the_two_terms():
    g = torch.Generator().manual_seed(9)
    u = torch.rand(1, 3, 7, 6, 9, generator=g, dtype=torch.float64).requires_grad_()
    spacing = (1.5, 1.2, 2.0)
    half_extent = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    scale = half_extent[None, :] / torch.tensor(spacing, dtype=torch.float64)[:, None]
    total, first, second = losses.regularisers(u, scale, spacing, 0.05, 2.0)
    (g_total,) = torch.autograd.grad(total, u)
    first_ref = losses.gradient_regulariser(u, scale)
    second_ref = losses.bending_regulariser(u, scale, spacing)
    (g_ref,) = torch.autograd.grad(0.05 * first_ref + 2.0 * second_ref, u)
    assert (first, second) == pytest.approx((float(first_ref.detach()), float(second_ref.detach())), rel=1e-12)
    assert float(total.detach()) == pytest.approx(0.05 * first + 2.0 * second, rel=1e-12)
    np.testing.assert_allclose(g_total.numpy(), g_ref.numpy(), rtol=1e-10, atol=1e-15)


# -------------------------------------------------------------------- normalised gradient fields
def _autograd_ngf(warped, target, spacing, mask=None, eta=losses.NGF_EDGE_FRACTION):
    """NGF written out with autograd: central differences in 1/mm, eps = eta * mean |grad|."""
    steps = (0.5, 0.5, 0.5) if spacing is None else (0.5 / spacing[2], 0.5 / spacing[1], 0.5 / spacing[0])

    def gradient(x):
        return [(x[:, :, 2:, 1:-1, 1:-1] - x[:, :, :-2, 1:-1, 1:-1]) * steps[0],
                (x[:, :, 1:-1, 2:, 1:-1] - x[:, :, 1:-1, :-2, 1:-1]) * steps[1],
                (x[:, :, 1:-1, 1:-1, 2:] - x[:, :, 1:-1, 1:-1, :-2]) * steps[2]]

    def norm(g):
        squared = sum(c * c for c in g)
        eps = eta * squared.detach().sqrt().mean(dim=(2, 3, 4), keepdim=True)
        return squared + eps * eps

    a, b = gradient(warped), gradient(target.detach())
    cos2 = sum(x * y for x, y in zip(a, b)) ** 2 / (norm(a) * norm(b))
    if mask is None:
        return 1.0 - cos2.mean()
    weight = mask.expand_as(warped)[:, :, 1:-1, 1:-1, 1:-1]
    return 1.0 - (cos2 * weight).sum() / weight.sum()


@pytest.mark.parametrize("spacing", [None, (0.8, 1.3, 2.5)])
@pytest.mark.parametrize("masked", [False, True])
def test_ngf_value_and_gradient_match_autograd(spacing, masked):
    warped = torch.cat([_smooth_volume(11), _smooth_volume(12)], 1).requires_grad_()
    target = torch.cat([_smooth_volume(13), _smooth_volume(14)], 1)
    mask = (_smooth_volume(15) > 0.4).double() if masked else None
    value = losses.normalised_gradient_fields(warped, target, mask, spacing=spacing)
    (grad,) = torch.autograd.grad(3.0 * value, warped)
    reference = _autograd_ngf(warped, target, spacing, mask)
    (grad_ref,) = torch.autograd.grad(3.0 * reference, warped)
    assert float(value) == pytest.approx(float(reference), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), grad_ref.numpy(), rtol=1e-9, atol=1e-14)


def test_ngf_ignores_contrast_inversion_and_linear_intensity_changes():
    # What makes it a cross-sequence metric: a T2-like inverted, rescaled target scores as the original.
    a, b = _smooth_volume(16), _smooth_volume(17)
    plain = float(losses.normalised_gradient_fields(a, b))
    assert float(losses.normalised_gradient_fields(a, 2.0 - 3.0 * b)) == pytest.approx(plain, rel=1e-10)
    assert float(losses.normalised_gradient_fields(0.2 * a + 5.0, b)) == pytest.approx(plain, rel=1e-10)
    # MSE sees the inversion as a large difference.
    assert float(losses.mse(a, 1.0 - a)) > 10 * float(losses.mse(a, a + 0.01))


def test_ngf_is_lowest_for_aligned_images():
    image = _smooth_volume(18, shape=(20, 20, 20))
    inverted = 1.0 - image
    values = [float(losses.normalised_gradient_fields(torch.roll(image, shift, dims=4), inverted))
              for shift in (0, 1, 2, 3)]
    # Aligned is not 0: eps discounts weak edges (0.42 here, then 0.52, 0.67, 0.76).
    assert values == sorted(values) and values[3] - values[0] > 0.3


def test_ngf_measures_angles_between_world_gradients_on_an_oblique_anisotropic_grid(oblique_geometry):
    # Two intensity ramps I = n1 . x and J = n2 . x in world mm: central differences are exact, each
    # gradient's magnitude is constant (so eps = eta |grad|), and the loss is 1 - cos^2 / (1 + eta^2)^2
    # whatever the grid's spacing and direction. In voxel units the anisotropic grid tilts the angle.
    g = oblique_geometry
    x = g.world_grid()
    n1, n2 = np.array([1.0, 0.5, -0.3]), np.array([0.2, 1.0, 0.7])
    ramps = [torch.as_tensor(np.ascontiguousarray((x @ n)[None, None])) for n in (n1, n2)]
    cos2 = (n1 @ n2) ** 2 / ((n1 @ n1) * (n2 @ n2))
    eta = losses.NGF_EDGE_FRACTION
    value = float(losses.normalised_gradient_fields(*ramps, spacing=g.spacing))
    assert value == pytest.approx(1.0 - cos2 / (1.0 + eta**2) ** 2, rel=1e-9)
    assert abs(float(losses.normalised_gradient_fields(*ramps)) - value) > 0.01


def test_ngf_precomputed_target_gradients_are_equal_and_small_grids_are_handled():
    a, b = _smooth_volume(19), _smooth_volume(20)
    spacing = (1.5, 1.0, 2.0)
    direct = losses.normalised_gradient_fields(a, b, spacing=spacing)
    cached = losses.normalised_gradient_fields(a, b, spacing=spacing,
                                               target_gradients=losses.gradient_directions(b, spacing))
    assert float(cached) == float(direct)
    total, terms = losses.weighted_similarity(a, b, ("MSE", "NGF"), (0.5, 0.5), window=5, spacing=spacing)
    assert terms["NGF"] == pytest.approx(float(direct), rel=1e-12)
    # No interior voxel along a 2-voxel axis: nothing measured, nothing moved.
    thin = losses.normalised_gradient_fields(a[:, :, :2].clone().requires_grad_(), b[:, :, :2])
    assert float(thin) == 1.0 and not thin.requires_grad
    with pytest.raises(ValueError, match="N, C, Z, Y, X"):
        losses.normalised_gradient_fields(a[0], b[0])
