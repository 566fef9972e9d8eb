"""convert.py export: one EMA of a run as safetensors (the config and step as metadata), read back bitwise without
pickle by checkpoints.load_checkpoint, so train.py --init / --teacher and fid.py calc take it as they take the run.
The tests that write or read the file need the optional package (`extras`); its absence is one line."""
import json
import math
import os
import pickle
import sys

import pytest
import torch

import checkpoints
import convert
import fid
import train
from conftest import tiny_ref
from test_convert import convert_refused, tiny_edm  # noqa: F401 (a fixture)


def run(tmp_path, *args, out="run"):
    out = str(tmp_path / out)
    train.cli(["--method", "meanflow", "--data", "toy", "--batch", "16", "--log-every", "5", "--num-samples", "50",
               "--out", out, *args])
    return out


@pytest.fixture
def two_ema_run(tmp_path):
    pytest.importorskip("safetensors")
    return run(tmp_path, "--steps", "3", "--ema", "0.9,0.99", "--ema-warmup", "false", out="two")


@pytest.mark.extras
@pytest.mark.parametrize("ema", [0, 1])
def test_export_round_trip_is_bitwise_and_pickle_free(two_ema_run, tmp_path, monkeypatch, ema):
    """Every tensor of the chosen EMA back with its dtype and bits (torch.equal), the run's config and step, net = ema;
    read with torch.load and every unpickler disabled."""
    out = str(tmp_path / "w.safetensors")
    convert.main(["export", two_ema_run] + (["--ema", str(ema)] if ema else []) + ["--to", out])
    run_state = checkpoints.load_checkpoint(two_ema_run, "cpu")

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    state = checkpoints.load_checkpoint(out, "cpu")
    weights = run_state["ema"][ema]
    assert set(state) == {"net", "ema", "step", "config"} and state["net"] is state["ema"][0] and len(state["ema"]) == 1
    assert state["config"] == run_state["config"] and state["step"] == run_state["step"] == 3
    assert state["net"].keys() == weights.keys()
    for k, v in weights.items():
        assert state["net"][k].dtype == v.dtype and torch.equal(state["net"][k], v), k
    other = run_state["ema"][1 - ema]
    assert any(not torch.equal(state["net"][k], other[k]) for k in other)  # the two EMAs differ: the index matters


@pytest.mark.extras
def test_init_and_teacher_take_the_export(two_ema_run, tmp_path):
    """train.py --init FILE.safetensors starts from the very weights --init RUN starts from (lr 0 keeps them to the
    end: the final net is the initial one), and --teacher takes it too."""
    export = str(tmp_path / "w.safetensors")
    convert.main(["export", two_ema_run, "--to", export])
    first_ema = checkpoints.load_checkpoint(two_ema_run, "cpu")["ema"][0]
    for source in (two_ema_run, export):
        net = torch.load(os.path.join(run(tmp_path, "--steps", "1", "--lr", "0", "--init", source,
                                          out=f"init-{os.path.basename(source)}"), "ckpt.pt"), weights_only=True)["net"]
        assert net.keys() == first_ema.keys() and all(torch.equal(net[k], first_ema[k]) for k in net), source
    run(tmp_path, "--steps", "1", "--teacher", export, out="distil")
    teacher = checkpoints.load_teacher(export, __import__("meanflow"), train.data.load("toy", None), 0, "cpu",
                                       dict(method="meanflow"))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in first_ema.items())


@pytest.mark.extras
def test_fid_calc_reads_the_export(tiny_edm, detector, tmp_path):  # noqa: F811 (the fixture)
    """fid.py calc of the export of a converted EDM checkpoint gives the checkpoint's own FID, exactly."""
    pytest.importorskip("safetensors")
    ckpt, export, ref = str(tmp_path / "edm.pt"), str(tmp_path / "edm.safetensors"), tiny_ref(tmp_path / "ref.npz")
    convert.convert(tiny_edm[1], ckpt)  # its net and ema share their storages
    convert.main(["export", ckpt, "--to", export])
    records = [fid.cli(["calc", "--ckpt", path, "--ref", ref, "--detector", detector[0], "--num", "2", "--steps", "1",
                        "--device", "cpu"]) for path in (ckpt, export)]
    assert records[0]["fid"] == records[1]["fid"] and math.isfinite(records[1]["fid"])
    assert records[1]["method"] == "diffusion" and records[1]["step"] == 0


@pytest.mark.extras
def test_export_refuses_what_it_would_overwrite(two_ema_run, tmp_path):
    out = str(tmp_path / "w.safetensors")
    convert.main(["export", two_ema_run, "--to", out])
    before = open(out, "rb").read()
    convert_refused(["export", two_ema_run, "--to", out], f"{out} exists; pass --force to replace it")
    foreign = str(tmp_path / "foreign.safetensors")  # someone's weights, without an export's metadata
    __import__("safetensors.torch").torch.save_file({"w": torch.zeros(2)}, foreign)
    theirs = open(foreign, "rb").read()
    convert_refused(["export", two_ema_run, "--to", foreign, "--force"],
                    "is not an export of this repository: not replaced, even with --force")
    assert open(foreign, "rb").read() == theirs and open(out, "rb").read() == before
    convert.main(["export", two_ema_run, "--ema", "1", "--to", out, "--force"])  # an export: replaced
    with __import__("safetensors").safe_open(out, framework="pt") as f:
        assert f.metadata()["ema"] == "1" and json.loads(f.metadata()["config"])["ema"] == [0.9, 0.99]
    convert_refused(["export", two_ema_run, "--to", str(tmp_path / "w.pt")], "name a .safetensors file")
    convert_refused(["export", two_ema_run, "--ema", "2", "--to", str(tmp_path / "x.safetensors")],
                    f"{two_ema_run} holds 2 EMA nets; --ema 2 does not exist")
    convert_refused(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x.safetensors")], "no checkpoint at")
    assert sorted(os.listdir(tmp_path)) == ["foreign.safetensors", "two", "w.safetensors"]


@pytest.mark.extras
def test_a_safetensors_file_without_our_metadata_is_refused_in_one_line(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = str(tmp_path / "foreign.safetensors")
    safetensors_torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(checkpoints.UsageError, match="not an export of this repository .* lacks the config and step"):
        checkpoints.load_checkpoint(path, "cpu")


def test_without_safetensors_export_and_load_say_what_to_install(tmp_path, monkeypatch):
    """sys.modules[name] = None makes `import name` fail, installed or not."""
    run_dir = run(tmp_path, "--steps", "1")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    convert_refused(["export", run_dir, "--to", str(tmp_path / "w.safetensors")],
                    "convert.py export needs the safetensors package: pip install safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "1", "--init", str(tmp_path / "w.safetensors"), out="init")
    assert e.value.code == (f"train.py: error: reading {tmp_path / 'w.safetensors'} needs the safetensors package: "
                            f"pip install safetensors")


def test_export_tensors_unshares_storages_and_keeps_bits():
    """safetensors refuses two names on one storage (tied weights, a converted file's net and ema): the second is
    cloned, bits kept; non-contiguous tensors are made contiguous."""
    w = torch.randn(3, 4)
    tensors = convert.export_tensors(dict(ema=[dict(a=w, b=w, c=w.t())]), 0)
    pointers = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(pointers) == 3 and all(t.is_contiguous() for t in tensors.values())
    assert torch.equal(tensors["a"], w) and torch.equal(tensors["b"], w) and torch.equal(tensors["c"], w.t())


@pytest.mark.extras
def test_a_failed_write_is_one_line_and_leaves_nothing(two_ema_run, tmp_path, monkeypatch):
    """The package's own error for a full disk becomes one line; the half-written temp file is removed."""
    safetensors = pytest.importorskip("safetensors")

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(__import__("safetensors.torch").torch, "save_file", full_disk)
    out = str(tmp_path / "new" / "w.safetensors")
    convert_refused(["export", two_ema_run, "--to", out],
                    f"cannot write {out}: Error while serializing: IoError(No space left on device)")
    assert sorted(os.listdir(tmp_path)) == ["two"]  # no temp file, no folder made for it
