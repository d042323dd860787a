"""combireg.device.resolve_device and the --device option of run, train and batch.

CUDA's presence is patched where the answer matters, so these tests say the same on a GPU
machine; the CLI test that really needs "no CUDA" is skipped where there is one.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from combireg.cli.main import main
from combireg.device import resolve_device
from combireg.errors import CombiregError
from tests.conftest import ROOT

SAMPLE = ROOT / "data_samples" / "case0000"
TINY = "(NumberOfResolutions 1)\n(ImagePyramidSchedule 8 8 8)\n(MaximumNumberOfIterations 2)\n"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda_and_says_so(no_cuda, caplog):
    with caplog.at_level("INFO", logger="combireg.device"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "using cpu" in caplog.text
    assert resolve_device(None) == torch.device("cpu")


def test_auto_is_cuda_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(" CUDA ") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cpu", "CPU", torch.device("cpu")])
def test_cpu(name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name,message", [
    ("cuda", "no CUDA device is available"),
    ("cuda:1", "no CUDA device is available"),
    ("cuda:x", "expected cuda or cuda:N"),
    ("tpu", "expected one of auto, cpu, cuda"),
])
def test_bad_or_missing_devices_are_one_line_errors(no_cuda, name, message):
    with pytest.raises(CombiregError, match=message) as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


def test_run_device_auto_registers_on_the_cpu(no_cuda, tmp_path):
    (tmp_path / "tiny.txt").write_text(TINY)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(SAMPLE / "source_t1.nii.gz"), str(SAMPLE / "target_t1.nii.gz"),
                                    "-p", str(tmp_path / "tiny.txt"), "-o", str(out), "--device", "auto", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
@pytest.mark.parametrize("command", ["run", "train", "batch"])
def test_device_cuda_without_a_gpu_is_exit_2_one_line(tmp_path, command):
    out = tmp_path / "out"
    args = {
        "run": ["run", str(SAMPLE / "source_t1.nii.gz"), str(SAMPLE / "target_t1.nii.gz"), "-o", str(out)],
        "train": ["train", "--synth", "2", "-o", str(out / "model.pt")],
        "batch": ["batch", str(ROOT / "data_samples" / "manifest.csv"), "-o", str(out)],
    }[command]
    res = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("combireg: error: --device cuda requested but no CUDA device is available")
    assert res.output.count("\n") == 1
    assert not out.exists()


def test_train_device_auto_without_cuda_trains_on_the_cpu(no_cuda, tmp_path):
    from combireg.network import load_model

    (tmp_path / "tiny.txt").write_text("(InternalGridSize 12 12 12)\n(NetworkFeatures 2 4)\n(NumberOfEpochs 1)\n"
                                       "(ValidationFraction 0.0)\n(TestFraction 0.0)\n")
    out = tmp_path / "model.pt"
    res = CliRunner().invoke(main, ["train", "--manifest", str(ROOT / "data_samples" / "manifest.csv"),
                                    "-p", str(tmp_path / "tiny.txt"), "-o", str(out), "--device", "auto", "-q"])
    assert res.exit_code == 0, res.output
    assert load_model(out).training["device"] == "cpu"
