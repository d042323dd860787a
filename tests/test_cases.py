"""combireg.cases: manifests, BraTS-Reg folders and Learn2Reg JSON as the same Case rows."""
import numpy as np
import pytest

from combireg.cases import (
    Case,
    load_case,
    read_brats_reg,
    read_cases,
    read_learn2reg,
    read_manifest,
    read_training_manifest,
)
from combireg.errors import CombiregError
from tests.conftest import ROOT
from tests.datasets import LANDMARK_INDEX, make_brats_reg, make_learn2reg, tiny_geometry

SAMPLES = ROOT / "data_samples"


# ------------------------------------------------------------------------------ manifests
def test_manifest_paths_are_relative_to_the_manifest():
    cases = read_manifest(SAMPLES / "manifest.csv")
    assert [c.id for c in cases] == ["case0000", "case0001"]
    assert cases[0].source == (SAMPLES / "case0000/source_t1.nii.gz", SAMPLES / "case0000/source_t2.nii.gz")
    assert cases[0].has_landmarks and not cases[0].has_labels
    assert not cases[1].missing_files()


def test_a_manifest_needs_only_id_source_target(tmp_path):
    (tmp_path / "m.csv").write_text('id,source,target\na,"s1.nii.gz,s2.nii.gz",t.nii.gz\n')
    (case,) = read_manifest(tmp_path / "m.csv")
    assert case.source == (tmp_path / "s1.nii.gz", tmp_path / "s2.nii.gz") and case.target_landmarks is None
    assert not case.has_landmarks and case.files() == [tmp_path / "s1.nii.gz", tmp_path / "s2.nii.gz", tmp_path / "t.nii.gz"]
    assert read_training_manifest(tmp_path / "m.csv") == [("a", list(case.source), list(case.target))]


def test_optional_column_pairs(tmp_path):
    header = "id,source,target,target_landmarks,source_landmarks,target_labels,source_labels,target_mask,source_mask\n"
    (tmp_path / "m.csv").write_text(header + "a,s,t,,,tl.nii.gz,sl.nii.gz,,\nb,s,t,t.fcsv,s.fcsv,,,tm.nii.gz,sm.nii.gz\n")
    a, b = read_manifest(tmp_path / "m.csv")
    assert a.has_labels and not a.has_landmarks and a.target_labels == tmp_path / "tl.nii.gz"
    assert b.has_landmarks and not b.has_labels and b.source_mask == tmp_path / "sm.nii.gz"


@pytest.mark.parametrize("text,message", [
    ("", "lacks column"),
    ("id,source\nx,a\n", r"lacks column\(s\) target"),
    ("id,source,target,target_landmarks\nx,a,b,c\n", "has column target_landmarks but not source_landmarks"),
    ("id,source,target,target_landmarks,source_landmarks\n", "no cases"),
    ("id,source,target,target_landmarks,source_landmarks\na,s,,l,l\n", "empty field"),
    ("id,source,target,target_landmarks,source_landmarks\na,s,t,,l\n", "m.csv:2: give both target_landmarks and "
                                                                       "source_landmarks or neither"),
    ("id,source,target,target_labels,source_labels\na,s,t,l,\n", "give both target_labels"),
    ("id,source,target,target_landmarks,source_landmarks\na,s,t,l,l\na,s,t,l,l\n", "duplicate case id"),
    ("id,source,target,target_landmarks,source_landmarks\n../x,s,t,l,l\n", "case id"),
])
def test_bad_manifests(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(CombiregError, match=message):
        read_manifest(tmp_path / "m.csv")


# ------------------------------------------------------------------------------ BraTS-Reg
def test_brats_reg_folder_as_downloaded(tmp_path):
    """Baseline (_00_) = fixed = target, follow-up (_01_) = source; t1, t1ce, t2, flair as channels;
    Landmark,X,Y,Z files in LPS."""
    shift = (2.0, -1.0, 0.5)
    make_brats_reg(tmp_path / "train", {"BraTSReg_001": shift, "BraTSReg_002": (0.0, 1.0, 1.0)})
    (tmp_path / "train" / "notes.txt").write_text("not a case")
    cases = read_cases(tmp_path / "train")
    assert [c.id for c in cases] == ["BraTSReg_001", "BraTSReg_002"]
    case = cases[0]
    assert [p.name for p in case.target] == [f"BraTSReg_001_00_0000_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]
    assert [p.name for p in case.source] == [f"BraTSReg_001_01_0042_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]
    assert case.target_landmarks.name == "BraTSReg_001_00_0000_landmarks.csv" and case.has_landmarks
    source, target, target_lm, source_lm = load_case(case)
    assert source.num_channels == target.num_channels == 4
    np.testing.assert_allclose(target_lm.points_lps_mm, tiny_geometry(oblique=False).index_to_world(LANDMARK_INDEX),
                               atol=1e-3)
    np.testing.assert_allclose(source_lm.points_lps_mm - target_lm.points_lps_mm, np.tile(shift, (4, 1)), atol=1e-3)
    assert read_brats_reg(tmp_path / "train" / "BraTSReg_002")[0].id == "BraTSReg_002"  # one case folder


def test_brats_reg_without_baseline_landmarks_or_a_sequence(tmp_path):
    make_brats_reg(tmp_path, {"BraTSReg_140": (1.0, 0.0, 0.0)})
    (tmp_path / "BraTSReg_140" / "BraTSReg_140_00_0000_landmarks.csv").unlink()  # validation data: follow-up only
    (tmp_path / "BraTSReg_140" / "BraTSReg_140_01_0042_t2.nii.gz").unlink()
    (case,) = read_brats_reg(tmp_path)
    assert not case.has_landmarks
    with pytest.raises(CombiregError, match=r"missing file .*BraTSReg_140_01_\*_t2.nii.gz"):
        load_case(case)


def test_not_a_brats_reg_folder(tmp_path):
    with pytest.raises(CombiregError, match="no BraTSReg_"):
        read_cases(tmp_path)
    with pytest.raises(CombiregError, match="--pairs chooses Learn2Reg pairs"):
        read_cases(SAMPLES / "manifest.csv", pairs="val")


# ------------------------------------------------------------------------------ Learn2Reg
def test_learn2reg_json_as_downloaded(tmp_path):
    """registration_val pairs: fixed = target, moving = source; labels from the entries,
    keypoints (voxel indices) from keypointsTr even where the JSON names them .nii.gz."""
    shift = (1.5, -1.0, 2.0)
    json_path = make_learn2reg(tmp_path, {"0001": shift, "0002": (0.0, 2.0, 0.0)}, keypoints_for=("0001",))
    cases = read_cases(json_path)
    assert [c.id for c in cases] == ["0001_0000-0001_0001", "0002_0000-0002_0001"]
    first, second = cases
    assert first.target == (tmp_path / "imagesTr" / "TOY_0001_0000.nii.gz",)
    assert first.source == (tmp_path / "imagesTr" / "TOY_0001_0001.nii.gz",)
    assert first.has_labels and first.target_labels == tmp_path / "labelsTr" / "TOY_0001_0000.nii.gz"
    assert first.has_landmarks and first.target_landmarks.suffix == ".csv" and first.landmark_space == "index"
    assert second.has_labels and not second.has_landmarks  # no keypoints for subject 0002: Dice only
    _, target, target_lm, source_lm = load_case(first)
    geometry = tiny_geometry()
    np.testing.assert_allclose(target_lm.points_lps_mm, geometry.index_to_world(LANDMARK_INDEX), atol=1e-3)
    np.testing.assert_allclose(source_lm.points_lps_mm - target_lm.points_lps_mm, np.tile(shift, (4, 1)), atol=1e-3)
    assert target_lm.labelled and target_lm.labels == ["1", "2", "3", "4"]  # row by row, no order warning
    lines = first.source_landmarks.read_text().splitlines()
    first.source_landmarks.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(CombiregError, match="has 4 points but .* has 3; they correspond row by row"):
        load_case(first)


def test_learn2reg_labels_by_convention_and_other_pair_lists(tmp_path):
    import json

    json_path = make_learn2reg(tmp_path, {"0001": (1.0, 0.0, 0.0)})
    doc = json.loads(json_path.read_text())
    for entry in doc["training"]:
        entry.pop("label")  # Learn2Reg's evaluation finds labelsTr/ beside imagesTr/
    doc["training_paired_images"] = [{"fixed": "./imagesTr/TOY_0001_0001.nii.gz", "moving": "./imagesTr/TOY_0001_0000.nii.gz"}]
    json_path.write_text(json.dumps(doc))
    (case,) = read_learn2reg(json_path)
    assert case.has_labels and case.source_labels == tmp_path / "labelsTr" / "TOY_0001_0001.nii.gz"
    (flipped,) = read_learn2reg(json_path, pairs="training")
    assert flipped.id == "0001_0001-0001_0000"
    (tmp_path / "pairs.csv").write_text("fixed,moving\n./imagesTr/TOY_0001_0001.nii.gz,./imagesTr/TOY_0001_0000.nii.gz\n")
    assert read_cases(json_path, pairs=str(tmp_path / "pairs.csv"))[0].id == "0001_0001-0001_0000"
    with pytest.raises(CombiregError, match=r"no 'registration_test' pairs \(available: val, training"):
        read_learn2reg(json_path, pairs="test")
    with pytest.raises(CombiregError, match="give val, test, training or a CSV"):
        read_learn2reg(json_path, pairs="nonsense")
    (tmp_path / "other.json").write_text('{"markups": []}')
    with pytest.raises(CombiregError, match="not a Learn2Reg dataset JSON"):
        read_cases(tmp_path / "other.json")


def test_one_case_type_for_every_layout():
    assert Case("a", (), ()).files() == []
