"""combireg.deformations: the simulator's analytic deformations and their inverses (moved here
from test_synth.py with the code they test)."""
import numpy as np

from combireg import deformations


def test_inverse_of_strong_deformation_is_exact():
    rng = np.random.default_rng(0)
    centre = np.array([5.0, -3.0, 2.0])
    psi = deformations.Deformation(
        (deformations.RadialField(centre, 10.0, 1.6),
         deformations.FourierField.random(rng, max_amplitude=2.0, wavelength_mm=(60.0, 160.0))),
        deformations.Rigid(deformations.rotation_matrix(np.array([3.0, -4.0, 2.0])), np.zeros(3),
                           np.array([2.0, -1.0, 3.0])),
    )
    y = centre + rng.uniform(-40, 40, size=(5000, 3))
    y[:10] = centre + rng.normal(scale=0.5, size=(10, 3))  # near the centre, where the map bends most
    p, residual = psi.inverse(y)
    assert residual.max() < 1e-3
    assert np.abs(psi(p) - y).max() < 1e-3


def test_radial_field_jacobian_matches_finite_differences():
    rng = np.random.default_rng(1)
    fields = [deformations.RadialField(np.array([1.0, 2.0, 3.0]), 12.0, -0.5),
              deformations.FourierField.random(rng, max_amplitude=1.5, wavelength_mm=(40.0, 80.0))]
    p = rng.uniform(-20, 20, size=(20, 3))
    for f in fields:
        eps = 1e-2  # the Fourier field is evaluated in float32: a larger step avoids round-off
        numeric = np.stack([(f(p + eps * e) - f(p - eps * e)) / (2 * eps) for e in np.eye(3)], axis=2)
        np.testing.assert_allclose(f.jacobian(p), numeric, atol=1e-4)
