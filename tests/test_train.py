"""Training the DRN: the loss, the split, checkpoints and --resume, the parameter file, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from combireg import Geometry, Image
from combireg.cases import read_training_manifest
from combireg.cli.main import main
from combireg.errors import CombiregError
from combireg.losses import gradient_regulariser, weighted_similarity
from combireg.network import load_model
from combireg.paramfile import parse_text
from combireg.params import (
    default_training_settings,
    load_training_settings,
    training_settings_from_map,
)
from combireg.train import (
    checkpoint_path,
    curve_path,
    drn_loss,
    split_cases,
    train_drn,
)
from combireg.training_data import TrainingData, images_data, synth_data
from combireg.warp import identity_grid, warp_normalised
from tests.conftest import ROOT, smooth_pattern

TINY = dict(internal_size=(16, 16, 16), features=(4, 8), learning_rate=3e-3)
TINY_FILE = """// tiny settings for tests
(InternalGridSize 16 16 16)
(NetworkFeatures 4 8)
(NumberOfEpochs 2)
(LearningRate 0.003)
"""


# tiny tensors: threads only cost on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(n: int, seed: int = 0) -> list[tuple[Image, Image]]:
    """Translated copies of a smooth pattern on an anisotropic grid: S(y) = f(y - d)."""
    geometry = Geometry((20, 18, 16), origin=(4.0, -3.0, 7.0), spacing=(2.0, 2.2, 2.4))
    points = geometry.world_grid()
    centre = points.reshape(-1, 3).mean(0)
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        d = rng.uniform(-3.0, 3.0, 3)
        target = Image(torch.from_numpy(smooth_pattern(points, centre))[None], geometry)
        source = Image(torch.from_numpy(smooth_pattern(points - d, centre))[None], geometry)
        pairs.append((source, target))
    return pairs


def _settings(**changes):
    return default_training_settings().replace(**{**TINY, **changes})


def test_loss_is_eq1_and_symmetric():
    settings = _settings(metrics=("MSE", "NCC"), metric_weights=(0.3, 0.7), regularization_weight=0.4)
    data = images_data(_pairs(1), settings)
    pair = data.pairs[0]
    s, t = pair.source[None], pair.target[None]
    torch.manual_seed(0)
    u, v = 0.02 * torch.randn(1, 3, 16, 16, 16), 0.02 * torch.randn(1, 3, 16, 16, 16)
    loss, terms = drn_loss(u, v, s, t, pair.scale, settings)
    grid = identity_grid((16, 16, 16))
    sim_f, _ = weighted_similarity(warp_normalised(s, u, grid), t, ("MSE", "NCC"), (0.3, 0.7), window=5)
    sim_b, _ = weighted_similarity(warp_normalised(t, v, grid), s, ("MSE", "NCC"), (0.3, 0.7), window=5)
    reg = gradient_regulariser(u, pair.scale) + gradient_regulariser(v, pair.scale)
    torch.testing.assert_close(loss, sim_f + sim_b + 0.4 * reg)
    assert set(terms) == {"forward_MSE", "forward_NCC", "backward_MSE", "backward_NCC", "regularisation"}
    # swapping source and target (and the fields) gives the same loss: both orders are trained
    swapped, _ = drn_loss(v, u, t, s, pair.scale, settings)
    torch.testing.assert_close(swapped, loss)


def test_a_few_training_steps_lower_the_loss(tmp_path):
    settings = _settings(epochs=20, validation_fraction=0.0, test_fraction=0.0, augmentation=False)
    data = images_data(_pairs(1), settings)
    pair = data.pairs[0]
    zero = torch.zeros(1, 3, 16, 16, 16)
    identity_loss = float(drn_loss(zero, zero, pair.source[None], pair.target[None], pair.scale, settings)[0])
    summary = train_drn(data, settings, tmp_path / "m.pt")
    losses = [h["train_loss"] for h in summary.history]  # one step per epoch (one pair)
    assert len(losses) == 20 and summary.selection == "training"
    assert losses[0] == pytest.approx(identity_loss, abs=1e-4)  # the head starts at ~0: the identity
    assert identity_loss == pytest.approx(0.2248, abs=1e-3)
    assert losses[-1] < 0.95 * losses[0]  # measured 0.2248 -> 0.2026 in 20 steps
    assert sum(b > a for a, b in zip(losses, losses[1:])) <= 2  # (measured: monotone)
    model = load_model(tmp_path / "m.pt")
    assert model.training["epochs"] == 20 and model.training["best_epoch"] == summary.best_epoch == 20
    assert "(LearningRate 0.003)" in model.parameters
    assert curve_path(tmp_path / "m.pt").read_bytes()[:4] == b"\x89PNG"


def test_split_is_seeded_and_80_10_10():
    ids = [f"c{i}" for i in range(10)]
    split = split_cases(ids, 0.1, 0.1, seed=0)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [8, 1, 1]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert split == split_cases(ids, 0.1, 0.1, seed=0)
    assert split != split_cases(ids, 0.1, 0.1, seed=1)
    assert [len(v) for v in split_cases(ids[:2], 0.1, 0.1, 0).values()] == [1, 1, 0]
    assert [len(v) for v in split_cases(ids[:1], 0.1, 0.1, 0).values()] == [1, 0, 0]
    assert [len(v) for v in split_cases(ids[:3], 0.1, 0.1, 0).values()] == [2, 1, 0]
    assert [len(v) for v in split_cases(ids * 10, 0.1, 0.1, 0).values()] == [80, 10, 10]


def _state(path):
    return torch.load(checkpoint_path(path), weights_only=True)


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(tmp_path):
    settings = _settings(epochs=2, validation_fraction=0.34, test_fraction=0.0, augmentation=True)
    data = images_data(_pairs(3, seed=1), settings)
    full = train_drn(data, settings, tmp_path / "full.pt")
    first = train_drn(data, settings, tmp_path / "part.pt", epochs=1)
    assert first.epochs == 1 and _state(tmp_path / "part.pt")["epoch"] == 1
    events = []
    resumed = train_drn(data, settings, tmp_path / "part.pt", resume=True, progress=events.append)
    assert resumed.start_epoch == 1 and resumed.epochs == 2
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2]  # epoch 1 was not trained again
    a, b = _state(tmp_path / "full.pt"), _state(tmp_path / "part.pt")
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    for key in ("epoch", "best_epoch", "best_loss", "history"):
        if key == "history":  # everything but the timings
            strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in x[key]] for x in (a, b)]
            assert strip[0] == strip[1]
        else:
            assert a[key] == b[key], key
    assert float(a["optimizer_state"]["state"][0]["step"]) == float(b["optimizer_state"]["state"][0]["step"]) == 4
    loaded = [load_model(tmp_path / name) for name in ("full.pt", "part.pt")]
    for key, value in loaded[0].network.state_dict().items():
        assert torch.equal(value, loaded[1].network.state_dict()[key])
    assert full.split == resumed.split and len(full.split["validation"]) == 1


def test_resume_refuses_another_configuration(tmp_path):
    settings = _settings(epochs=1, validation_fraction=0.0, test_fraction=0.0)
    data = images_data(_pairs(2), settings)
    train_drn(data, settings, tmp_path / "m.pt")
    before = checkpoint_path(tmp_path / "m.pt").read_bytes()
    with pytest.raises(CombiregError, match=r"another configuration .*RegularizationWeight \(0.3 in the checkpoint, 1.0 now\)"):
        train_drn(data, settings.replace(regularization_weight=1.0), tmp_path / "m.pt", resume=True, epochs=2)
    with pytest.raises(CombiregError, match=r"another configuration .*architecture"):
        train_drn(images_data(_pairs(2), settings.replace(features=(4, 4))), settings.replace(features=(4, 4)),
                  tmp_path / "m.pt", resume=True, epochs=2)
    with pytest.raises(CombiregError, match="another configuration .*the training data"):
        train_drn(images_data(_pairs(2, seed=5), settings), settings, tmp_path / "m.pt", resume=True, epochs=2)
    assert checkpoint_path(tmp_path / "m.pt").read_bytes() == before
    # the other refusals: no checkpoint to resume, existing outputs, a checkpoint of someone else
    with pytest.raises(CombiregError, match="no checkpoint to resume from"):
        train_drn(data, settings, tmp_path / "other.pt", resume=True)
    with pytest.raises(CombiregError, match=r"exists \(use --overwrite"):
        train_drn(data, settings, tmp_path / "m.pt")
    (tmp_path / "x.pt.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CombiregError, match="not a combireg DRN checkpoint file"):
        train_drn(data, settings, tmp_path / "x.pt", resume=True)


def test_channel_counts_must_agree():
    settings = _settings()
    (source, target), (s2, t2) = _pairs(2)
    two = Image(torch.cat([s2.data, s2.data]), s2.geometry)
    with pytest.raises(CombiregError, match="all training cases need the same channels"):
        images_data([(source, target), (two, Image(torch.cat([t2.data, t2.data]), t2.geometry))], settings)
    with pytest.raises(CombiregError, match="source has 2 channel"):
        images_data([(two, target)], settings)


def test_training_parameter_file_and_errors(tmp_path):
    shipped = load_training_settings(ROOT / "params" / "drn_train.txt")
    assert shipped.learning_rate == 1e-4 and shipped.metrics == ("MSE", "NCC")
    assert shipped.validation_fraction == 0.1 and shipped.test_fraction == 0.1 and shipped.batch_size == 1
    assert shipped.keep_best and shipped.internal_shape == tuple(reversed(shipped.internal_size))
    again = training_settings_from_map(parse_text(shipped.to_text()))
    assert again == shipped
    cases = {
        "(MaximumNumberOfIterations 10)": "f.txt:1: unknown key 'MaximumNumberOfIterations' (a registration key",
        "(NetworkFeature 8 16)": "f.txt:1: unknown key 'NetworkFeature' (did you mean 'NetworkFeatures'?)",
        "(RegularizationWeight 0.3 0.1)": "f.txt:1: RegularizationWeight expects exactly 1 value, got 2",
        "(InternalGridSize 32 32)": "f.txt:1: InternalGridSize expects exactly 3 values (x y z), got 2",
        "(NetworkFeatures 4 4 4 4 4 4 4)": "f.txt:1: NetworkFeatures expects 1 to 6 values, got 7",
        "(NCCWindowSize 4)": "f.txt:1: NCCWindowSize expects an odd integer >= 3, got '4'",
        "(KeepBest \"yes\")": "f.txt:1: KeepBest expects \"true\" or \"false\", got 'yes'",
        "(Metric \"MSE\" \"NCC\")\n(Metric0Weight 0.7)": "f.txt:2: metric weights must sum to 1",
        "(ValidationFraction 0.5)\n(TestFraction 0.5)": "f.txt:2: ValidationFraction + TestFraction must be < 1",
    }
    for text, message in cases.items():
        with pytest.raises(CombiregError) as info:
            training_settings_from_map(parse_text(text, "f.txt"))
        assert message in str(info.value), (text, str(info.value))


def test_read_training_manifest_ignores_landmark_columns(tmp_path):
    rows = read_training_manifest(ROOT / "data_samples" / "manifest.csv")
    assert [r[0] for r in rows] == ["case0000", "case0001"] and len(rows[0][1]) == 2
    (tmp_path / "m.csv").write_text('id,source,target\na,"s1.nii.gz,s2.nii.gz",t.nii.gz\na,s,t\n')
    with pytest.raises(CombiregError, match=r"m.csv:3: duplicate case id 'a'"):
        read_training_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("id,source\na,b\n")
    with pytest.raises(CombiregError, match="lacks column"):
        read_training_manifest(tmp_path / "n.csv")


@pytest.fixture
def fake_simulator(monkeypatch):
    """The simulator replaced by translated patterns (seeds 500.. map to pairs 0..): what is
    tested is the plumbing, without the MNI template."""
    from combireg import synth
    from combireg.landmarks import Landmarks

    pairs = _pairs(4)
    calls = []
    template = Image(torch.cat([pairs[0][1].data, pairs[0][1].data]), pairs[0][1].geometry)

    def fake_simulate(template_image, afids, *, seed, spacing, n_tissue_points, brain_mask, ground_truth):
        calls.append((seed, spacing, n_tissue_points, ground_truth))
        source, target = pairs[(seed - 500) % len(pairs)]
        two = lambda im: Image(torch.cat([im.data, 2 * im.data]), im.geometry)  # noqa: E731
        return synth.SimulatedCase(two(source), two(target), None, None, None, {})

    monkeypatch.setattr(synth, "fetch_template", lambda cache=None: (template, Landmarks(np.zeros((1, 3)), ["a"])))
    monkeypatch.setattr(synth, "estimate_brain_mask", lambda image: np.ones(image.geometry.shape, bool))
    monkeypatch.setattr(synth, "simulate_case", fake_simulate)
    return calls


def test_synth_data_generates_once_and_caches(tmp_path, fake_simulator):
    calls = fake_simulator
    settings = _settings()
    data = synth_data(3, settings, seed=500, spacing=3.0, cache_dir=tmp_path / "cache")
    assert calls == [(500, 3.0, 0, False), (501, 3.0, 0, False), (502, 3.0, 0, False)]
    assert data.ids == ["synth00500", "synth00501", "synth00502"] and data.channels == 2
    assert data.description["kind"] == "synth" and data.description["first_seed"] == 500
    again = synth_data(3, settings, seed=500, spacing=3.0, cache_dir=tmp_path / "cache")
    assert len(calls) == 3 and isinstance(again, TrainingData)  # read from the cache
    assert again.fingerprint() == data.fingerprint()
    synth_data(2, settings, seed=500, spacing=3.0, cache_dir=tmp_path / "cache")
    assert len(calls) == 5  # another request, generated anew


def test_train_cli_with_synth_pairs(tmp_path, fake_simulator):
    params = tmp_path / "tiny.txt"
    params.write_text(TINY_FILE)
    out = tmp_path / "m.pt"
    res = _invoke("train", "--synth", 4, "--synth-seed", 500, "--synth-spacing", 2.5, "-p", params, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert "4 simulated pairs (2.5 mm, seeds 500..503" in res.output and "split train 3, validation 1" in res.output
    assert [c[0] for c in fake_simulator] == [500, 501, 502, 503]
    model = load_model(out)
    assert model.training["data"]["kind"] == "synth" and model.training["split"]["validation"]
    res = _invoke("train", "--manifest", ROOT / "data_samples" / "manifest.csv", "--synth-seed", 3, "-p", params,
                  "-o", tmp_path / "x.pt", "-q")
    assert res.exit_code == 2 and "--synth-seed and --synth-cache go with --synth" in res.output


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_train_cli_on_data_samples(tmp_path):
    params = tmp_path / "tiny.txt"
    params.write_text(TINY_FILE)
    out = tmp_path / "models" / "m.pt"
    res = _invoke("train", "--manifest", ROOT / "data_samples" / "manifest.csv", "-p", params, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert "split train 1, validation 1, test 0" in res.output and "kept epoch" in res.output
    assert out.is_file() and curve_path(out).is_file() and checkpoint_path(out).is_file()
    model = load_model(out)
    assert model.channels == 2 and model.internal_shape == (16, 16, 16) and model.training["epochs"] == 2
    assert model.training["data"]["kind"] == "manifest"
    # resume to 3 epochs: only epoch 3 runs
    res = _invoke("train", "--manifest", ROOT / "data_samples" / "manifest.csv", "-p", params, "-o", out, "-q",
                  "--resume", "--epochs", "3")
    assert res.exit_code == 0, res.output
    assert "epochs: 3 (this run from epoch 3)" in res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.loss.png", "m.pt", "m.pt.ckpt"]


def test_train_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    params = tmp_path / "tiny.txt"
    params.write_text(TINY_FILE)
    bad_params = tmp_path / "bad.txt"
    bad_params.write_text("(InternalGridSize 16 16)\n")
    manifest = ROOT / "data_samples" / "manifest.csv"
    broken = tmp_path / "broken.csv"
    broken.write_text("id,source,target\ncase0,missing_t1.nii.gz,missing_t2.nii.gz\n")
    out = tmp_path / "out" / "m.pt"
    cases = [
        (["--manifest", tmp_path / "none.csv", "-p", params], "none.csv: no such manifest file"),
        (["--manifest", broken, "-p", params], "no such file"),
        (["-p", params], "give exactly one of --manifest FILE and --synth N"),
        (["--manifest", manifest, "--synth", "3", "-p", params], "give exactly one of"),
        (["--manifest", manifest, "-p", bad_params], "bad.txt:1: InternalGridSize expects exactly 3 values"),
        (["--manifest", manifest, "-p", params, "--resume"], "no checkpoint to resume from"),
        (["--manifest", manifest, "-p", tmp_path / "nofile.txt"], "nofile.txt: no such file"),
    ]
    for extra, message in cases:
        res = _invoke("train", *extra, "-o", out, "-q")
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2, (extra, res.output)
        assert len(lines) == 1 and lines[0].startswith("combireg: error: ") and message in lines[0], res.output
        assert not out.parent.exists()
    res = _invoke("train", "--manifest", manifest, "-p", params, "-o", tmp_path, "-q")
    assert res.exit_code == 2 and "is a directory" in res.output
    out.parent.mkdir()
    out.write_bytes(b"precious")
    res = _invoke("train", "--manifest", manifest, "-p", params, "-o", out, "-q")
    assert res.exit_code == 2 and "exists (use --overwrite" in res.output
    assert out.read_bytes() == b"precious" and sorted(p.name for p in out.parent.iterdir()) == ["m.pt"]


_DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from tests.test_train import _pairs, _settings
from combireg.train import train_drn
from combireg.training_data import images_data
settings = _settings(epochs=1, validation_fraction=0.0, test_fraction=0.0, augmentation=False)
data = images_data(_pairs(4), settings)
seen = []
summary = train_drn(data, settings, {out!r}, overwrite=True,
                    progress=lambda e: seen.append(e["event"]))
rank = int(os.environ["RANK"])
with open(os.path.join({tmp!r}, f"rank{{rank}}.json"), "w") as handle:
    json.dump({{"sha": summary.final_parameters_sha256, "world": summary.world_size, "events": sorted(set(seen)),
               "steps": [e for e in seen if e == "step"].__len__()}}, handle)
"""


def test_ddp_training_under_torchrun_keeps_ranks_identical(tmp_path):
    """Two CPU processes (gloo) train one epoch: every rank ends with the same weights, which
    differ from the untrained ones; only rank 0 writes the model (with those weights)."""
    import json
    import socket
    import subprocess
    import sys

    from combireg.network import RegistrationUNet
    from combireg.train import _state_sha256

    out = tmp_path / "model.pt"
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), out=str(out), tmp=str(tmp_path)))
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sha"] == ranks[1]["sha"]
    # 4 training pairs, batch 1, 2 ranks: 2 steps per rank; only rank 0 reports progress
    assert ranks[0]["steps"] == 2 and ranks[1]["events"] == []
    torch.manual_seed(0)
    assert _state_sha256(RegistrationUNet(1, TINY["features"])) != ranks[0]["sha"]  # it did train
    model = load_model(out)
    assert model.training["world_size"] == 2
    # KeepBest keeps the last (only) epoch: the written weights are the ranks' weights
    assert _state_sha256(model.network) == ranks[0]["sha"]
    assert checkpoint_path(out).is_file()
