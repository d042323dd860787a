"""Analytic deformations with exact inverses: the ground-truth maps of the simulator.

A :class:`Deformation` maps template points ``p`` (world LPS mm) to ``psi(p) = T(p + sum_i
w_i(p))``: a sum of smooth displacement terms (:class:`RadialField`, a tumour's push or a
cavity's pull; :class:`FourierField`, a smooth random field) and an optional rigid
:class:`Rigid` applied last. Every term has its analytic Jacobian, so ``psi`` is inverted
numerically (damped Newton, :meth:`Deformation.inverse`) to a known residual.
:mod:`combireg.synth` builds its pre- and post-operative maps from these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RadialField", "FourierField", "Rigid", "Deformation", "rotation_matrix", "unit_vectors", "apply_linear"]

_INVERSE_TOLERANCE_MM = 1e-4  # Newton stops here


@dataclass(frozen=True)
class RadialField:
    """Radial displacement about a centre: ``w(p) = a R^2 (p - c) / (|p - c|^2 + R^2)``.

    ``a > 0`` pushes tissue away from ``c`` (mass effect), ``a < 0`` pulls it in (collapse).
    The radial profile ``r -> r + a R^2 r / (r^2 + R^2)`` peaks at ``r = R`` with ``|a| R / 2``
    mm and stays strictly increasing for ``-1 < a < 8``, so the map is invertible.

    Parameters
    ----------
    centre : ndarray, (3,)
        Centre ``c``, LPS mm.
    radius : float
        ``R`` in mm.
    amplitude : float
        ``a`` (dimensionless), signed.
    """

    centre: np.ndarray
    radius: float
    amplitude: float

    @property
    def peak_mm(self) -> float:
        """Largest displacement magnitude (reached at distance ``R`` from the centre)."""
        return abs(self.amplitude) * self.radius / 2.0

    def _gain(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v = p - self.centre
        denom = np.einsum("ni,ni->n", v, v) + self.radius**2
        return v, denom, self.amplitude * self.radius**2 / denom

    def __call__(self, p: np.ndarray) -> np.ndarray:
        v, _, h = self._gain(p)
        return h[:, None] * v

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """``dw/dp``, shape ``(N, 3, 3)``: ``h I - 2 h / (r^2 + R^2) v v^T``."""
        v, denom, h = self._gain(p)
        jac = (-2.0 * h / denom)[:, None, None] * v[:, :, None] * v[:, None, :]
        jac[:, [0, 1, 2], [0, 1, 2]] += h[:, None]
        return jac


@dataclass(frozen=True)
class FourierField:
    """A smooth random field ``w(p) = sum_k A_k sin(omega_k . p + phi_k)`` with ``D`` components.

    Why a few random plane waves rather than an interpolated coarse grid: it is infinitely
    smooth, its magnitude and gradient have simple bounds (``sum |A_k|`` and
    ``sum |A_k| |omega_k|``), and evaluating it and its Jacobian is two small matrix products.

    Parameters
    ----------
    wave_vectors : ndarray, (K, 3)
        ``omega_k`` in rad/mm.
    phases : ndarray, (K,)
    amplitudes : ndarray, (K, D)
    """

    wave_vectors: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, *, max_amplitude: float, wavelength_mm: tuple[float, float],
               n_modes: int = 6, n_components: int = 3) -> "FourierField":
        """A field whose magnitude never exceeds ``max_amplitude`` (any unit)."""
        directions = unit_vectors(rng, n_modes)
        wavelengths = rng.uniform(*wavelength_mm, size=n_modes)
        wave_vectors = directions * (2.0 * np.pi / wavelengths)[:, None]
        phases = rng.uniform(0.0, 2.0 * np.pi, size=n_modes)
        if n_components == 3:
            amps = unit_vectors(rng, n_modes)
        else:
            amps = rng.choice([-1.0, 1.0], size=(n_modes, n_components))
        # Random share of the budget per mode; the shares sum to 1 so |w| <= max_amplitude.
        share = rng.dirichlet(np.full(n_modes, 2.0))
        amps = amps / np.linalg.norm(amps, axis=1, keepdims=True) * (share * max_amplitude)[:, None]
        return cls(wave_vectors, phases, amps)

    @property
    def max_amplitude(self) -> float:
        return float(np.linalg.norm(self.amplitudes, axis=1).sum())

    @property
    def max_gradient(self) -> float:
        """Upper bound of the spectral norm of the Jacobian."""
        return float((np.linalg.norm(self.amplitudes, axis=1) * np.linalg.norm(self.wave_vectors, axis=1)).sum())

    def _theta(self, p: np.ndarray) -> np.ndarray:
        # Why float32: sin/cos and the products run 2-5x faster, and the phase error (~1e-6 rad
        # for points within a few hundred mm) moves the field by ~1e-6 mm, far below the 0.01 mm
        # the inverse is checked to.
        return apply_linear(p.astype(np.float32), self.wave_vectors.astype(np.float32)) + self.phases.astype(np.float32)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.einsum("nk,kd->nd", np.sin(self._theta(p)), self.amplitudes.astype(np.float32)).astype(np.float64)

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        """``dw/dp``, shape ``(N, D, 3)``."""
        k, d = self.amplitudes.shape
        outer = (self.amplitudes[:, :, None] * self.wave_vectors[:, None, :]).reshape(k, d * 3)
        jac = np.einsum("nk,kd->nd", np.cos(self._theta(p)), outer.astype(np.float32))
        return jac.astype(np.float64).reshape(-1, d, 3)


@dataclass(frozen=True)
class Rigid:
    """``T(q) = M (q - o) + o + t``: rotation ``M`` about centre ``o``, then translation ``t``."""

    rotation: np.ndarray
    centre: np.ndarray
    translation: np.ndarray

    def apply(self, q: np.ndarray) -> np.ndarray:
        return apply_linear(q - self.centre, self.rotation) + self.centre + self.translation

    def inverse_apply(self, y: np.ndarray) -> np.ndarray:
        return apply_linear(y - self.centre - self.translation, self.rotation.T) + self.centre


@dataclass(frozen=True)
class Deformation:
    """``psi(p) = T(p + sum_i w_i(p))``, with an optional rigid ``T`` applied last.

    Parameters
    ----------
    fields : tuple
        Displacement terms, each callable on ``(N, 3)`` points with a ``jacobian`` method.
    rigid : Rigid or None
    """

    fields: tuple
    rigid: Rigid | None = None

    def displacement(self, p: np.ndarray) -> np.ndarray:
        """The non-rigid part ``w(p)``, ``(N, 3)`` mm."""
        out = np.zeros_like(p)
        for f in self.fields:
            out += f(p)
        return out

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Forward map of template points ``(N, 3)`` into the simulated image (LPS mm)."""
        p = np.asarray(p, dtype=np.float64).reshape(-1, 3)
        q = p + self.displacement(p)
        return self.rigid.apply(q) if self.rigid is not None else q

    def _jacobian(self, p: np.ndarray) -> np.ndarray:
        jac = np.zeros((len(p), 3, 3))
        jac[:, [0, 1, 2], [0, 1, 2]] = 1.0
        for f in self.fields:
            jac += f.jacobian(p)
        return jac

    def inverse(self, y: np.ndarray, *, tol: float = _INVERSE_TOLERANCE_MM,
                max_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """Solve ``psi(p) = y`` for each point.

        Returns
        -------
        p : ndarray, (N, 3)
            Template points.
        residual : ndarray, (N,)
            ``|psi(p) - y|`` in mm (rigid maps preserve length, so it is measured before ``T``).
        """
        y = np.asarray(y, dtype=np.float64).reshape(-1, 3)
        q = self.rigid.inverse_apply(y) if self.rigid is not None else y.copy()
        p = q - self.displacement(q)  # one fixed-point step: a good start for Newton
        res = p + self.displacement(p) - q
        norm = np.linalg.norm(res, axis=1)
        active = np.flatnonzero(norm > tol)
        for _ in range(max_iter):
            if active.size == 0:
                break
            pa, ra, na = self._newton_step(p[active], q[active], res[active], norm[active])
            p[active], res[active], norm[active] = pa, ra, na
            active = active[na > tol]
        return p, norm

    def _newton_step(self, p: np.ndarray, q: np.ndarray, res: np.ndarray,
                     norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = _solve3(self._jacobian(p), res)
        t = np.ones(len(p))
        new_p = p - step
        new_res = new_p + self.displacement(new_p) - q
        new_norm = np.linalg.norm(new_res, axis=1)
        # Why the backtracking: far from the solution a full Newton step can overshoot near the
        # tumour centre, where the radial field bends fastest; halving restores descent.
        for _ in range(8):
            bad = np.flatnonzero(new_norm >= norm)
            if bad.size == 0:
                break
            t[bad] *= 0.5
            new_p[bad] = p[bad] - t[bad, None] * step[bad]
            new_res[bad] = new_p[bad] + self.displacement(new_p[bad]) - q[bad]
            new_norm[bad] = np.linalg.norm(new_res[bad], axis=1)
        return new_p, new_res, new_norm


def _solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve many 3x3 systems ``a x = b`` with Cramer's rule (vectorised, much faster than
    batched LAPACK for millions of tiny systems). Jacobians here are well conditioned."""
    c0 = np.cross(a[:, 1], a[:, 2])
    c1 = np.cross(a[:, 2], a[:, 0])
    c2 = np.cross(a[:, 0], a[:, 1])
    det = np.einsum("ni,ni->n", a[:, 0], c0)
    # Rows of inv(a)^T are c0, c1, c2 / det; so inv(a) @ b = (c0 b0 + c1 b1 + c2 b2) / det.
    return (c0 * b[:, :1] + c1 * b[:, 1:2] + c2 * b[:, 2:3]) / det[:, None]


def apply_linear(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x @ m.T`` for tall ``x`` (N, 3) and small ``m`` (K, 3), e.g. many points through a 3x3 matrix.

    Why not ``@``: for very tall, 3-wide operands OpenBLAS is several times slower than three
    broadcast multiply-adds (and spawns threads for nothing).
    """
    return x[:, 0:1] * m[:, 0] + x[:, 1:2] * m[:, 1] + x[:, 2:3] * m[:, 2]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random unit vectors (rows), uniformly distributed on the sphere."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` from angles (degrees) about the world x, y, z axes."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
