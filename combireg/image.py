"""An image = a tensor plus the grid it lives on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Geometry

__all__ = ["Image"]


@dataclass
class Image:
    """A multi-channel 3-D image with its world geometry.

    Parameters
    ----------
    data : torch.Tensor, (C, Z, Y, X)
        Voxel values, one leading channel axis.
    geometry : Geometry
        The grid; ``geometry.shape`` must equal ``data.shape[1:]``.
    """

    data: torch.Tensor
    geometry: Geometry

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor):
            self.data = torch.as_tensor(np.asarray(self.data))
        if self.data.ndim == 3:
            self.data = self.data[None]
        if self.data.ndim != 4:
            raise ValueError(f"image data must be (C, Z, Y, X), got shape {tuple(self.data.shape)}")
        if tuple(self.data.shape[1:]) != self.geometry.shape:
            raise ValueError(
                f"data shape {tuple(self.data.shape[1:])} does not match geometry shape {self.geometry.shape}"
            )

    @property
    def num_channels(self) -> int:
        return int(self.data.shape[0])

    def channel(self, k: int) -> "Image":
        return Image(self.data[k : k + 1], self.geometry)

    def numpy(self) -> np.ndarray:
        """Voxel values as a float32 numpy array ``(C, Z, Y, X)``."""
        return self.data.detach().cpu().numpy()
