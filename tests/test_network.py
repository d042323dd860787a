"""The DRN: network shapes, the bidirectional call, the model file and predictions in LPS mm."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from combireg import Geometry, Image
from combireg.errors import CombiregError
from combireg.filters import smooth_and_resize
from combireg.network import (
    DrnModel,
    RegistrationUNet,
    internal_geometry,
    load_model,
    save_model,
    to_internal_grid,
)
from combireg.warp import identity_grid, normalised_per_mm, warp_normalised
from tests.conftest import image_from_world_function, oblique_direction, smooth_pattern


# tiny tensors: threads only cost on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_model(channels: int = 2, shape=(12, 14, 10), seed: int = 0, scale: float = 0.0) -> DrnModel:
    torch.manual_seed(seed)
    net = RegistrationUNet(channels, (4, 8, 8))
    if scale:
        with torch.no_grad():  # a head that is not ~0, so outputs are informative
            net.head.weight.normal_(0.0, scale)
    return DrnModel(net, shape, (1.0, 99.0), "(Seed 0)\n", {"epochs": 0})


def test_forward_shape_and_bidirectional_call():
    torch.manual_seed(0)
    net = RegistrationUNet(2, (4, 8, 8))
    source, target = torch.rand(1, 2, 17, 20, 15), torch.rand(1, 2, 17, 20, 15)  # odd sizes on purpose
    with torch.no_grad():
        u_st = net(source, target)
        both = net.predict_both(source, target)
        u_ts = net(target, source)
    assert u_st.shape == (1, 3, 17, 20, 15)
    torch.testing.assert_close(both[0], u_st, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(both[1], u_ts, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(u_st, u_ts)  # the order of the inputs matters
    # the head starts near zero: an untrained network predicts ~identity (normalised units)
    assert float(u_st.abs().max()) < 1e-3
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))


def test_default_network_is_small_and_configurable():
    default = RegistrationUNet()
    assert default.config == {"channels": 2, "features": [8, 16, 32, 32]}
    assert 100_000 < default.num_parameters() < 1_000_000
    deeper = RegistrationUNet(1, (4, 8, 16, 16, 16))
    assert len(deeper.encoder) == 5 and len(deeper.decoder) == 4
    assert deeper.num_parameters() < default.num_parameters()


def test_internal_geometry_keeps_the_field_of_view(oblique_geometry):
    grid = internal_geometry(oblique_geometry, (6, 9, 11))
    assert grid.shape == (6, 9, 11)
    corners = np.array([[0, 0, 0], [s - 1 for s in oblique_geometry.size]], dtype=float)
    inner = np.array([[0, 0, 0], [s - 1 for s in grid.size]], dtype=float)
    np.testing.assert_allclose(grid.index_to_world(inner), oblique_geometry.index_to_world(corners), atol=1e-9)
    # hence the same normalised coordinates and normalised units on both grids
    np.testing.assert_allclose(normalised_per_mm(grid), normalised_per_mm(oblique_geometry), atol=1e-12)


def test_to_internal_grid_in_world_coordinates(oblique_geometry):
    centre = oblique_geometry.world_grid().reshape(-1, 3).mean(0)
    target = image_from_world_function(oblique_geometry, lambda p: smooth_pattern(p, centre))
    grid = internal_geometry(oblique_geometry, (12, 14, 16))
    # same field of view: one smoothing-and-resizing pass
    sigma = [0.5 * g / s if g > s else 0.0 for g, s in zip(reversed(grid.spacing), reversed(oblique_geometry.spacing))]
    expected = smooth_and_resize(target.data[None], sigma, grid.shape)[0]
    torch.testing.assert_close(to_internal_grid(target, grid), expected)
    # another grid (rotated, finer): a linear function of world position is reproduced inside
    direction = oblique_direction(-25.0) @ np.diag([1.0, -1.0, 1.0])
    other = Geometry((40, 36, 30), origin=tuple(centre - direction @ (np.array([0.8, 0.9, 1.1]) * [19.5, 17.5, 14.5])),
                     spacing=(0.8, 0.9, 1.1), direction=tuple(direction.ravel()))
    weights = np.array([0.3, -0.2, 0.1])
    linear = image_from_world_function(other, lambda p: (p @ weights).astype(np.float32))
    moved = to_internal_grid(linear, grid)[0].numpy()
    points = grid.world_grid()
    inside = other.contains_index(other.world_to_index(points.reshape(-1, 3)), tol=-9.0).reshape(grid.shape)
    assert inside.sum() > 50
    np.testing.assert_allclose(moved[inside], (points @ weights)[inside], atol=1e-3)


def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path):
    model = _tiny_model(scale=0.05, seed=3)
    model.training = {"epochs": 3, "history": [{"epoch": 1, "train_loss": 0.5, "validation_loss": None}]}
    path = save_model(model, tmp_path / "sub" / "m.pt")
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "combireg-drn" and raw["format_version"] == 1
    assert raw["internal_shape"] == [12, 14, 10] and raw["channels"] == 2
    assert raw["config"] == {"channels": 2, "features": [4, 8, 8]}
    loaded = load_model(path)
    assert loaded.internal_shape == model.internal_shape
    assert loaded.normalization_percentiles == (1.0, 99.0)
    assert loaded.parameters == "(Seed 0)\n" and loaded.training["epochs"] == 3
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])
    geometry = Geometry((20, 18, 16), spacing=(1.5, 1.7, 2.0))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    points = geometry.world_grid()
    target = Image(torch.from_numpy(np.stack([smooth_pattern(points, centre), smooth_pattern(points, centre + 3)])),
                   geometry)
    source = Image(torch.from_numpy(np.stack([smooth_pattern(points, centre + 1), smooth_pattern(points, centre - 2)])),
                   geometry)
    a = model.predict_normalised(source, target)
    b = loaded.predict_normalised(source, target)
    assert float(a[0].abs().max()) > 1e-4  # not trivially zero
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class _ConstantNet(RegistrationUNet):
    """Predicts fixed normalised vectors: ``forward`` for f(S, T), ``backward`` for f(T, S)."""

    def __init__(self, forward, backward):
        super().__init__(1, (2,))
        self.vectors = (torch.as_tensor(forward, dtype=torch.float32), torch.as_tensor(backward, dtype=torch.float32))

    def predict_both(self, source, target):
        shape = (source.shape[0], 3) + tuple(source.shape[2:])
        return tuple(v.view(1, 3, 1, 1, 1).expand(shape).clone() for v in self.vectors)


def test_predict_returns_lps_mm_fields_on_the_target_and_source_grids(oblique_geometry):
    """A translation d: target T(x) = f(x), source S(y) = f(y - d), so u = d and v = -d."""
    target_geometry = oblique_geometry
    direction = oblique_direction(-30.0)
    centre = target_geometry.world_grid().reshape(-1, 3).mean(0)
    size, spacing = np.array([48, 56, 42]), np.array([1.7, 1.4, 1.9])  # covers the target's field of view
    source_geometry = Geometry(tuple(size), origin=tuple(centre + [1.0, -2.0, 0.5] - direction @ (spacing * (size - 1) / 2)),
                               spacing=tuple(spacing), direction=tuple(direction.ravel()))
    d = np.array([2.5, -1.5, 3.0])
    target = image_from_world_function(target_geometry, lambda p: smooth_pattern(p, centre))
    source = image_from_world_function(source_geometry, lambda p: smooth_pattern(p - d, centre))
    shape = (14, 16, 18)
    grid = internal_geometry(target_geometry, shape)
    to_norm = normalised_per_mm(grid)
    model = DrnModel(_ConstantNet(to_norm @ d, to_norm @ -d), shape, (0.0, 100.0))
    forward, backward = model.predict(source, target)
    assert forward.shape == target_geometry.shape + (3,) and forward.dtype == np.float32
    assert backward.shape == source_geometry.shape + (3,)
    np.testing.assert_allclose(forward, np.broadcast_to(d, forward.shape), atol=1e-4)
    np.testing.assert_allclose(backward, np.broadcast_to(-d, backward.shape), atol=1e-4)
    # the same normalised field is what training's warp uses: it aligns the internal-grid images
    f_n, _, used = model.predict_normalised(source, target)
    assert used.same_grid(grid)
    src, tgt, _ = model.prepare(source, target)
    warped = warp_normalised(src, f_n, identity_grid(shape))
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))

    def correlation(a, b):
        a, b = a[interior].flatten(), b[interior].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    # (min/max normalisation differs between the sides, so compare correlations)
    wrong = warp_normalised(src, -f_n, identity_grid(shape))
    assert correlation(warped, tgt) > 0.99  # measured 0.997 (smoothing differs a little between sides)
    assert correlation(src, tgt) < 0.85 and correlation(wrong, tgt) < 0.6


def test_channel_mismatch_is_a_user_error():
    model = _tiny_model(channels=2)
    geometry = Geometry((10, 10, 10))
    image = Image(torch.rand(1, 10, 10, 10), geometry)
    with pytest.raises(CombiregError, match=r"source has 1 channel\(s\) but the DRN model was trained on 2"):
        model.predict(image, Image(torch.rand(2, 10, 10, 10), geometry))
    with pytest.raises(CombiregError, match="target has 1 channel"):
        model.predict(Image(torch.rand(2, 10, 10, 10), geometry), image)


def test_bad_model_files(tmp_path, monkeypatch):
    import combireg.network as network

    def expect(path, message):
        with pytest.raises(CombiregError, match=message) as info:
            load_model(path)
        assert "\n" not in str(info.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    expect(garbage, "not a combireg DRN model file .not a PyTorch file")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3), "epoch": 4}, other)
    expect(other, "not a combireg DRN model .format None")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    expect(listing, "holds a list")
    good = save_model(_tiny_model(), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1500])
    expect(truncated, "not a combireg DRN model file")
    content = torch.load(good, weights_only=True)
    torch.save({**content, "format_version": 99}, tmp_path / "future.pt")
    expect(tmp_path / "future.pt", "format version 99 .* not supported .* reads version 1")
    torch.save({**content, "state_dict": {}}, tmp_path / "empty.pt")
    expect(tmp_path / "empty.pt", "inconsistent DRN model file")
    torch.save({**content, "channels": 3}, tmp_path / "channels.pt")
    expect(tmp_path / "channels.pt", "inconsistent DRN model file")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"format": "combireg-drn", "x": Evil()}, tmp_path / "evil.pt")
    expect(tmp_path / "evil.pt", "holds more than weights")
    expect(tmp_path / "missing.pt", "no such DRN model file")
    expect(tmp_path, "is a directory")
    monkeypatch.setattr(network, "shipped_model_path", lambda: tmp_path / "models" / "drn_default.pt")
    expect("drn", "shipped DRN model is not installed")
    (tmp_path / "models").mkdir()
    save_model(_tiny_model(), tmp_path / "models" / "drn_default.pt")
    assert load_model("drn").internal_shape == (12, 14, 10)




def test_shipped_model_is_small_and_registers_the_sample_cases():
    """The shipped DRN alone (no instance optimisation) more than halves the landmark error of
    both sample pairs (2 mm; it was trained on other simulated pairs at 3 mm)."""
    from combireg import io, register
    from combireg.landmarks import compute_tre, read_landmarks
    from combireg.network import shipped_model_path
    from tests.conftest import ROOT

    path = shipped_model_path()
    assert path.is_file() and path.stat().st_size < 5e6
    model = load_model("drn")
    assert model.training["epochs"] >= 1 and model.training["data"]["kind"] == "synth"
    for case in ("case0000", "case0001"):
        folder = ROOT / "data_samples" / case
        source = io.read_channels([folder / "source_t1.nii.gz", folder / "source_t2.nii.gz"])
        target = io.read_channels([folder / "target_t1.nii.gz", folder / "target_t2.nii.gz"])
        result = register(source, target, ROOT / "params" / "drn_only.txt", init=model)
        tre = compute_tre(result.displacement_lps_mm, result.target_geometry,
                          read_landmarks(folder / "target_landmarks.fcsv"),
                          read_landmarks(folder / "source_landmarks.fcsv")).statistics
        assert tre["mean"] < 0.5 * tre["initial_mean"], (case, tre["mean"], tre["initial_mean"])
