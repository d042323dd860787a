"""Tiny synthetic datasets in the layouts combireg reads as they are downloaded.

Each pair's true forward field is a constant shift ``d`` (LPS mm): the target is the source
sampled at ``x + d``, target landmarks ``x`` correspond to source landmarks ``x + d``, label maps
move the same way. No real challenge data: everything is drawn here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from combireg import Geometry, io
from tests.conftest import image_from_world_function, oblique_direction, smooth_pattern

#: (i, j, k) voxel indices of the landmarks of every case, inside all the grids below.
LANDMARK_INDEX = np.array([[6.0, 6.0, 5.0], [12.0, 9.0, 8.0], [9.0, 12.0, 10.0], [14.0, 7.0, 6.0]])


def tiny_geometry(oblique: bool = True) -> Geometry:
    direction = tuple(oblique_direction().ravel()) if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return Geometry((20, 18, 16), origin=(-15.0, -12.0, 10.0), spacing=(2.0, 1.8, 2.2), direction=direction)


def _channel(geometry: Geometry, k: int, shift=None):
    """Channel k: a different smooth pattern per channel (a sequence), sampled at x + shift."""
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    offset = np.array([3.0 * k, -2.0 * k, 1.0 * k])
    d = None if shift is None else np.broadcast_to(np.asarray(shift, np.float32), geometry.world_grid().shape)
    return image_from_world_function(geometry, lambda p: smooth_pattern(p + offset, centre) * (1 + 0.3 * k), d)


def _labels(geometry: Geometry, shift=None) -> np.ndarray:
    """Two blobs (labels 1 and 4) and a slab (label 9) in world coordinates, sampled at x + shift."""
    points = geometry.world_grid() + (0 if shift is None else np.asarray(shift))
    centre = geometry.world_grid().reshape(-1, 3).mean(0)
    r = points - centre
    out = np.zeros(geometry.shape, np.uint8)
    out[np.linalg.norm(r - [5.0, 0.0, 0.0], axis=-1) < 7.0] = 1
    out[np.linalg.norm(r + [6.0, 2.0, 0.0], axis=-1) < 6.0] = 4
    out[(np.abs(r[..., 2] - 4.0) < 2.5) & (out == 0)] = 9
    return out


def make_brats_reg(folder: Path, shifts: dict) -> Path:
    """``folder/BraTSReg_NNN/BraTSReg_NNN_{00_0000,01_0042}_{t1,t1ce,t2,flair}.nii.gz`` and the
    two ``_landmarks.csv`` (``Landmark,X,Y,Z``, LPS), as the challenge ships its training data."""
    geometry = tiny_geometry(oblique=False)  # BraTS-Reg images are in SRI-24 space: no oblique direction
    for name, shift in shifts.items():
        case = folder / name
        case.mkdir(parents=True)
        for k, seq in enumerate(("t1", "t1ce", "t2", "flair")):
            io.write_image(case / f"{name}_00_0000_{seq}.nii.gz", _channel(geometry, k, shift))  # baseline = target
            io.write_image(case / f"{name}_01_0042_{seq}.nii.gz", _channel(geometry, k))  # follow-up = source
        points = geometry.index_to_world(LANDMARK_INDEX)
        for timepoint, pts in (("00_0000", points), ("01_0042", points + np.asarray(shift))):
            rows = "".join(f"{i + 1},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f}\n" for i, p in enumerate(pts))
            (case / f"{name}_{timepoint}_landmarks.csv").write_text("Landmark,X,Y,Z\n" + rows)
    return folder


def make_learn2reg(folder: Path, shifts: dict, *, keypoints_for: tuple = ()) -> Path:
    """``folder/TOY_dataset.json`` with ``imagesTr``, ``labelsTr`` and (for the subjects in
    ``keypoints_for``) ``keypointsTr`` voxel-index CSVs; ``registration_val`` pairs each
    subject's ``_0000`` (fixed = target) with its ``_0001`` (moving = source)."""
    geometry = tiny_geometry()
    for sub in ("imagesTr", "labelsTr", "keypointsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    training, pairs = [], []
    for subject, shift in shifts.items():
        for mod, d in (("0000", shift), ("0001", None)):
            stem = f"TOY_{subject}_{mod}"
            io.write_image(folder / "imagesTr" / f"{stem}.nii.gz", _channel(geometry, 0, d))
            io.write_image(folder / "labelsTr" / f"{stem}.nii.gz", _labels(geometry, d), geometry, dtype=np.uint8)
            entry = {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"}
            if subject in keypoints_for:
                world = geometry.index_to_world(LANDMARK_INDEX) + (0 if d is not None else np.asarray(shift))
                index = geometry.world_to_index(world)
                (folder / "keypointsTr" / f"{stem}.csv").write_text(
                    "".join(f"{i:.5f},{j:.5f},{k:.5f}\n" for i, j, k in index))
                entry["keypoints"] = f"./keypointsTr/{stem}.nii.gz"  # as some tasks' JSON names them
            training.append(entry)
        pairs.append({"fixed": f"./imagesTr/TOY_{subject}_0000.nii.gz", "moving": f"./imagesTr/TOY_{subject}_0001.nii.gz"})
    doc = {"name": "TOY", "release": "0.1", "pairings": "paired", "modality": {"0": "MR", "1": "MR"},
           "provided_data": {"0": ["image", "label", "keypoints"]}, "registration_direction": {"fixed": 0, "moving": 1},
           "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": list(geometry.size)},
           "labels": {"0": {"1": "blob", "4": "other blob", "9": "slab"}},
           "numTraining": len(training), "training": training, "test": [],
           "numRegistration_val": len(pairs), "registration_val": pairs}
    (folder / "TOY_dataset.json").write_text(json.dumps(doc, indent=2))
    return folder / "TOY_dataset.json"
