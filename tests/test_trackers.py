"""train.py --tensorboard and --wandb (trackers.py): without the package, a one-line error with its install line before
the run folder exists; with it (the `extras` tests, skipped where the package is missing), the scalars of
metrics.jsonl at their steps and the --sample-every pictures."""
import glob
import json
import os
import sys

import pytest

import checkpoints
import fid
import train
import trackers

COMMON = ["--method", "meanflow", "--data", "toy", "--steps", "20", "--batch", "16", "--log-every", "5",
          "--sample-every", "10", "--num-samples", "50"]


@pytest.mark.parametrize("flag, args, package", [("tensorboard", ["--tensorboard"], "tensorboard"),
                                                 ("wandb", ["--wandb"], "wandb"),
                                                 ("wandb", ["--wandb", "offline"], "wandb")])
def test_a_missing_package_is_one_line_before_the_run_folder(tmp_path, capsys, monkeypatch, flag, args, package):
    """sys.modules[name] = None makes `import name` fail, installed or not; the folder is never claimed."""
    for name in [package, "torch.utils.tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(checkpoints, "claim_run_dir", lambda *args: pytest.fail("the run folder was claimed"))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.cli([*COMMON, "--out", out, *args])
    assert e.value.code == f"train.py: error: --{flag} needs the {package} package: pip install {package}"
    assert not os.path.exists(out)


def test_a_bad_wandb_mode_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli([*COMMON, "--out", str(tmp_path / "run"), "--wandb", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err and not os.path.exists(tmp_path / "run")


def test_flat_scalars_flattens_bins_and_drops_the_step_and_non_numbers():
    record = dict(step=5, kimg=0.08, loss=1.5, loss_by_t={"0-0.5": 2.0, "0.5-1": None}, grad_norm_spike=None,
                  nonfinite_grads=0, flag=True)
    assert trackers.flat_scalars(record) == {"kimg": 0.08, "loss": 1.5, "loss_by_t/0-0.5": 2.0, "nonfinite_grads": 0.0}


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.extras
def test_tensorboard_logs_the_metrics_and_the_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    train.cli([*COMMON, "--out", out, "--tensorboard"])
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = metrics(out)
    for key in ("loss", "grad_norm", "lr", "img_per_s", "mse_v", "loss_by_t/0-0.2"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        first, _, sub = key.partition("/")
        expected = [(r["step"], r[first][sub] if sub else r[first]) for r in records]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [5, 10, 15, 20], key
        assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(logged, expected)), key  # float32
    assert [e.step for e in events.Images("samples")] == [10, 20]


@pytest.mark.extras
def test_wandb_offline_writes_a_run_folder_with_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    train.cli([*COMMON, "--out", out, "--wandb", "offline"])
    (folder,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    (log,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    stored = open(log, "rb").read()
    records = metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:  # W&B keeps each value as JSON text in its record log
        assert json.dumps(r["loss"]).encode() in stored and json.dumps(r["loss_by_t"]["0-0.2"]).encode() in stored
    pictures = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "files", "media", "images", "*.png")))
    assert [p.split("_")[1] for p in pictures] == ["10", "20"]


@pytest.mark.extras
def test_wandb_mode_follows_the_flag_then_the_environment(tmp_path, monkeypatch):
    """--wandb alone leaves the mode to W&B (WANDB_MODE); --wandb offline sets it."""
    wandb = pytest.importorskip("wandb")
    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: modes.append(kwargs["mode"]) or FakeRun())
    for i, args in enumerate([["--wandb"], ["--wandb", "offline"], ["--wandb", "online"]]):
        train.cli([*COMMON, "--steps", "5", "--sample-every", "0", "--out", str(tmp_path / f"run{i}"), *args])
    assert modes == [None, "offline", "online"]


@pytest.mark.extras
def test_wandb_that_cannot_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_network(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.")
    monkeypatch.setattr(wandb, "init", no_network)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.cli([*COMMON, "--out", out, "--wandb"])
    assert e.value.code == ("train.py: error: --wandb: W&B did not start (Network error (ConnectionError), entering "
                            "retry loop.); --wandb offline needs no network or login")
    assert not os.path.exists(out)


class FakeRun:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


@pytest.mark.extras
def test_tensorboard_logs_fid(tmp_path, monkeypatch):
    """--fid-every's records reach the trackers too (a stand-in FID: the protocol is tests/test_fid.py's)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setattr(fid, "fid_evaluator", lambda *args: lambda ema: 12.5)
    (tmp_path / "ref.npz").write_bytes(b"")
    out = str(tmp_path / "run")
    train.cli([*COMMON, "--out", out, "--tensorboard", "--fid-every", "10", "--fid-ref", str(tmp_path / "ref.npz")])
    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("fid")] == [(10, 12.5), (20, 12.5)]
