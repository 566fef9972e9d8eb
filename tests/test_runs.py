"""Runs are never lost (checkpoints.py and train.py): every way a command could overwrite or corrupt a run stops with a
one-line error and exit status 1, leaving every file that existed byte-identical; divergence and bad numbers stop a run
instead of ending it "done"."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import cli
import convert
import data
import fid
import meanflow
import nets
import train
from conftest import ROOT, tiny_ref
from test_data import write_image_zip

TINY = ["--data", "toy", "--batch", "8", "--log-every", "1", "--num-samples", "20"]


def run(*args, method="meanflow"):
    train.cli(["--method", method, *TINY, *args])


def refused(call, *args, **kwargs):
    """The one-line error a refused command exits with (sys.exit(message): status 1)."""
    with pytest.raises(SystemExit) as e:
        call(*args, **kwargs)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def snapshot(*folders):
    """{path: bytes} of every file under the folders."""
    files = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                files[path] = open(path, "rb").read()
    return files


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def metrics_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]

# --- Nothing is overwritten or lost ------------------------------------------------------------------------------------


def test_resume_into_a_folder_of_another_run_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("--steps", "2", "--out", a)
    run("--steps", "1", "--out", b)
    before = snapshot(a, b)
    message = refused(run, "--steps", "3", "--resume", a, "--out", b)
    assert message == f"train.py: error: {b} already holds a run; pass --resume {b} or choose another --out"
    assert snapshot(a, b) == before
    run("--steps", "3", "--resume", a, "--out", str(tmp_path / "fork"))  # a new folder is fine: A's run continues there
    assert load(tmp_path / "fork")["step"] == 3 and snapshot(a, b) == before


def test_convert_never_replaces_a_file_without_force_and_never_its_source(tmp_path, capsys):
    torch.manual_seed(0)
    src = str(tmp_path / "dit.pt")
    torch.save(nets.build_net("dit-tiny", (4, 8, 8), label_dim=10).state_dict(), src)
    run("--steps", "1", "--out", str(tmp_path / "run"))
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    before = snapshot(tmp_path)
    assert "--force to replace it" in refused(convert.main, [src, ckpt])
    assert "is the source file" in refused(convert.main, [src, src, "--force"])
    os.link(src, tmp_path / "alias.pt")
    assert "is the source file" in refused(convert.main, [src, str(tmp_path / "alias.pt"), "--force"])
    os.remove(tmp_path / "alias.pt")
    assert snapshot(tmp_path) == before
    convert.main([src, ckpt, "--force"])
    assert torch.load(ckpt, weights_only=True)["config"]["net"] == "dit-tiny"


def test_convert_source_named_like_the_temp_file_is_refused(tmp_path):
    """convert writes OUT.tmp and renames it: a source at OUT.tmp would be overwritten, so it is refused."""
    torch.manual_seed(0)
    src = str(tmp_path / "w.pt.tmp")
    torch.save(nets.build_net("dit-tiny", (4, 8, 8), label_dim=10).state_dict(), src)
    before = snapshot(tmp_path)
    assert "w.pt.tmp exists" in refused(convert.main, [src, str(tmp_path / "w.pt"), "--force"])
    assert snapshot(tmp_path) == before


def test_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_stale(tmp_path):
    """A run still training in OUT, with no checkpoint yet, and a second run started there."""
    out = str(tmp_path / "busy")
    first = subprocess.Popen([sys.executable, "train.py", "--method", "meanflow", *TINY, "--steps", "100000",
                              "--ckpt-every", "100000", "--log-every", "100000", "--out", out],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "config.json")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        before = snapshot(out)
        message = refused(run, "--steps", "2", "--out", out)
        assert f"{out} is in use by pid {first.pid} on {socket.gethostname()}" in message and "choose another --out" in message
        assert snapshot(out) == before and "ckpt.pt" not in os.listdir(out)
    finally:
        first.kill()
        first.wait()
    # Killed: its lock is stale (removed with a notice), but its files still stop a new run from mixing in.
    before = {k: v for k, v in snapshot(out).items() if not k.endswith(checkpoints.LOCK)}
    assert "config.json of a run without a checkpoint" in refused(run, "--steps", "2", "--out", out)
    assert snapshot(out) == before


def test_stale_lock_is_explained_and_a_lock_from_another_host_is_respected(tmp_path, capsys):
    out = str(tmp_path / "run")
    run("--steps", "2", "--out", out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = os.path.join(out, checkpoints.LOCK)
    with open(lock, "w") as f:
        json.dump(dict(pid=dead.pid, host="elsewhere"), f)
    before = snapshot(out)
    message = refused(run, "--steps", "3", "--resume", out)
    assert f"in use by pid {dead.pid} on elsewhere" in message and f"delete {lock} only if" in message
    assert snapshot(out) == before
    with open(lock, "w") as f:
        json.dump(dict(pid=dead.pid, host=socket.gethostname()), f)
    capsys.readouterr()
    run("--steps", "3", "--resume", out)
    assert f"removed the stale {checkpoints.LOCK} of pid {dead.pid}" in capsys.readouterr().out
    assert load(out)["step"] == 3 and not os.path.exists(lock)


def test_resume_checks_method_net_shape_label_dim_and_cond(tmp_path):
    cm_run, img_run = str(tmp_path / "cm"), str(tmp_path / "img")
    run("--steps", "1", "--out", cm_run, method="cm")
    write_image_zip(tmp_path / "three.zip", n=6, res=16)  # labels 0, 1, 2
    imgs = ["--data", str(tmp_path / "three.zip"), "--net", "ddpmpp-tiny", "--batch", "2"]
    train.cli(["--method", "meanflow", *imgs, "--cond", "--steps", "1", "--num-samples", "2", "--out", img_run])
    np.save(tmp_path / "p3.npy", np.zeros((50, 3), np.float32))
    write_image_zip(tmp_path / "one.zip", n=3, res=16, labels=False)
    with zipfile.ZipFile(tmp_path / "one.zip", "a") as z:  # one class
        z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", 0] for i in range(3)]}))
    before = snapshot(cm_run, img_run)
    cases = [
        (["--method", "diffusion", *TINY, "--resume", cm_run], f"{cm_run} is a cm run, not diffusion: resume it "
                                                               "with --method cm"),
        (["--method", "cm", *TINY, "--resume", cm_run, "--net", "ddpmpp-tiny"], "--net ddpmpp-tiny differs from the run's mlp"),
        (["--method", "cm", *TINY, "--resume", cm_run, "--data", str(tmp_path / "p3.npy")], "with shape [2]; this data has [3]"),
        (["--method", "meanflow", "--resume", img_run, "--cond", "false"], "--cond False differs from the run's True"),
        (["--method", "meanflow", "--resume", img_run, "--data", str(tmp_path / "one.zip")], "label_dim 3; this data has 1"),
    ]
    for argv, message in cases:
        assert message in refused(train.cli, [*argv, "--steps", "2"]), argv
    assert snapshot(cm_run, img_run) == before


def test_resume_restores_the_saved_config_and_notes_changed_flags(tmp_path, capsys):
    """A forgotten --batch no longer continues at the preset's 1024: only --steps is passed, and the result equals the
    straight run bitwise. A flag that differs from the saved config is applied with a notice."""
    common = ["--data", "toy", "--batch", "16", "--dropout", "0.1", "--ckpt-every", "4", "--log-every", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.cli(["--method", "meanflow", *common, "--steps", "8", "--out", full])
    train.cli(["--method", "meanflow", *common, "--steps", "4", "--out", part])
    capsys.readouterr()
    train.cli(["--method", "meanflow", "--steps", "8", "--resume", part, "--num-samples", "10"])
    assert "resume:" not in capsys.readouterr().out
    a, b = load(full), load(part)
    assert b["step"] == 8 and b["config"] == a["config"]
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(a["ema"][0][k], b["ema"][0][k]) for k in a["net"])
    assert json.load(open(os.path.join(part, "config.json")))["batch"] == 16
    train.cli(["--method", "meanflow", "--steps", "9", "--resume", part, "--lr", "2e-4", "--num-samples", "10"])
    assert "resume: --lr 0.0002 replaces the run's 0.002" in capsys.readouterr().out
    assert load(part)["config"]["lr"] == 2e-4
    before = snapshot(part)
    assert "--preset cifar10 differs from the run's toy" in refused(train.cli, ["--method", "meanflow", "--steps", "12",
                                                                                "--resume", part, "--preset", "cifar10"])
    assert snapshot(part) == before


def test_resume_trims_metrics_and_removes_a_half_written_checkpoint(tmp_path):
    """A run killed after its step-4 checkpoint had logged steps 5 and 6 and half a line, and left ckpt.pt.tmp."""
    out = str(tmp_path / "run")
    run("--steps", "4", "--ckpt-every", "2", "--out", out)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=5, loss=1.0)) + "\n" + json.dumps(dict(step=6, loss=1.0)) + "\n" + '{"step": 7, "lo')
    with open(os.path.join(out, "ckpt.pt.tmp"), "wb") as f:
        f.write(b"half a checkpoint")
    checkpoints.claim_run_dir(out, 4)()  # what a resume does first (its own save would replace ckpt.pt.tmp anyway)
    assert metrics_steps(out) == [1, 2, 3, 4] and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    run("--steps", "6", "--resume", out)
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "curves.png", "metrics.jsonl", "samples.npy",
                                       "samples.png"]


def test_snapshots_keep_the_weights_along_a_run(tmp_path):
    """--snapshot-every 2 on a 4-step run keeps snapshots/ckpt-0000002.pt and -0000004.pt: the net and EMAs of those
    steps (step 2's are a 2-step run's final weights), no optimizer state; --resume refuses one with a one-line error
    and changes no file; without the flag no folder is made."""
    out, short = str(tmp_path / "run"), str(tmp_path / "short")
    run("--steps", "4", "--snapshot-every", "2", "--out", out)
    run("--steps", "2", "--out", short)
    names = sorted(os.listdir(os.path.join(out, "snapshots")))
    assert names == ["ckpt-0000002.pt", "ckpt-0000004.pt"] and "snapshots" not in os.listdir(short)
    snaps = [checkpoints.load_checkpoint(os.path.join(out, "snapshots", n), "cpu") for n in names]
    assert [s["step"] for s in snaps] == [2, 4] and not any("opt" in s for s in snaps)
    assert all(s["config"] == load(out)["config"] for s in snaps)
    for snap, ref in ((snaps[0], load(short)), (snaps[1], load(out))):
        assert len(snap["ema"]) == len(ref["ema"])
        for a, b in zip([snap["net"], *snap["ema"]], [ref["net"], *ref["ema"]]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = snapshot(out)
    message = refused(run, "--steps", "6", "--resume", os.path.join(out, "snapshots", names[0]))
    assert "holds no optimizer state (a converted checkpoint or a snapshot?)" in message
    assert snapshot(out) == before
    run("--steps", "1", "--init", os.path.join(out, "snapshots", names[0]), "--out", str(tmp_path / "tuned"))
    assert load(str(tmp_path / "tuned"))["step"] == 1

# --- A run folder holds only the run; resume semantics; cheap checks first --------------------------------------------


def untouched(tmp_path, *args, never=None, method="meanflow"):
    """The message of a refused run, which changed no file or folder under tmp_path (and so created no folder `never`,
    named for the message's sake)."""
    before, listing = snapshot(tmp_path), sorted(tmp_path.rglob("*"))
    message = refused(run, *args, method=method)
    assert snapshot(tmp_path) == before and sorted(tmp_path.rglob("*")) == listing
    assert never is None or not os.path.exists(never)
    return message


def test_a_new_run_needs_a_new_or_empty_folder(tmp_path):
    """The user's own samples.png / samples.npy in --out stop a new run; an empty folder, or one holding only a stale
    lock and a killed write's temp files of ours, takes it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.png").write_bytes(b"my picture")
    np.save(mine / "samples.npy", np.arange(3))
    message = untouched(tmp_path, "--steps", "1", "--out", str(mine))
    assert message == (f"train.py: error: {mine} is not empty (it holds samples.npy, samples.png): a new run needs a "
                       f"new or empty folder; choose another --out")
    empty, leftovers = tmp_path / "empty", tmp_path / "leftovers"
    empty.mkdir()
    run("--steps", "1", "--out", str(empty))
    leftovers.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (leftovers / checkpoints.LOCK).write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname())))
    (leftovers / "ckpt.pt.tmp").write_bytes(b"half")
    (leftovers / "config.json.tmp").write_bytes(b"half")
    (leftovers / "curves.png.tmp").write_bytes(b"half")
    run("--steps", "1", "--out", str(leftovers))
    assert sorted(os.listdir(leftovers)) == sorted(os.listdir(empty)) == ["ckpt.pt", "config.json", "curves.png",
                                                                         "metrics.jsonl", "samples.npy", "samples.png"]


def test_out_inside_or_equal_to_the_data_and_a_run_folder_as_data_are_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    common = ["--data", str(images), "--net", "ddpmpp-tiny", "--batch", "2", "--steps", "1"]
    message = untouched(tmp_path, *common, "--out", str(images))
    assert message == f"train.py: error: the run folder {images} would lie inside --data {images}: choose an --out outside the data"
    assert "would lie inside --data" in untouched(tmp_path, *common, "--out", str(images / "run"), never=images / "run")
    done = str(tmp_path / "done")
    run("--steps", "1", "--out", done)
    message = untouched(tmp_path, "--data", done, "--steps", "1", "--out", str(tmp_path / "new"), never=tmp_path / "new")
    assert message == f"train.py: error: --data {done} is a run folder (config.json with ckpt.pt or run.lock), not a dataset"
    # Resumed in place, the run writes samples.npy: data inside its folder would be overwritten.
    message = untouched(tmp_path, "--data", os.path.join(done, "samples.npy"), "--steps", "2", "--resume", done)
    assert "lies inside the run folder" in message


def test_resume_needs_steps_beyond_the_checkpoint(tmp_path):
    """--steps at or below the checkpoint's step trained nothing and said "done"; --out NEW then got no ckpt.pt, and in
    place config.json was rewritten with the smaller count. Refused, naming the checkpoint's step; a finished run resumed
    without --steps too."""
    out = str(tmp_path / "run")
    run("--steps", "3", "--out", out)
    for steps in (["--steps", "3"], ["--steps", "2"], []):
        message = untouched(tmp_path, *steps, "--resume", out)
        assert message == (f"train.py: error: --resume {out} is at step 3 already: pass --steps above 3 to continue it "
                           f"(--steps is the total, not the steps to add)")
    assert "at step 3 already" in untouched(tmp_path, "--steps", "2", "--resume", out, "--out", str(tmp_path / "new"),
                                            never=tmp_path / "new")


def test_flags_that_cannot_apply_on_resume_are_refused(tmp_path):
    out, other = str(tmp_path / "run"), str(tmp_path / "other")
    run("--steps", "2", "--out", out)
    run("--steps", "1", "--out", other)
    assert "--init starts a new run's net; a resumed run continues from its checkpoint: drop --init" in \
        untouched(tmp_path, "--steps", "4", "--resume", out, "--init", other)
    assert "--seed 5 differs from the run's 0" in untouched(tmp_path, "--steps", "4", "--resume", out, "--seed", "5")
    # A checkpoint file that is not its run folder's ckpt.pt has no folder to continue in.
    os.link(os.path.join(out, "ckpt.pt"), tmp_path / "backup.pt")
    message = untouched(tmp_path, "--steps", "4", "--resume", str(tmp_path / "backup.pt"))
    assert "is not a run folder or its ckpt.pt, so it cannot continue in place: pass --out NEW" in message
    run("--steps", "3", "--resume", str(tmp_path / "backup.pt"), "--out", str(tmp_path / "fork"))
    run("--steps", "4", "--resume", out, "--seed", "0")  # the run's own value is no change
    assert load(out)["step"] == 4 and load(tmp_path / "fork")["step"] == 3


@pytest.mark.parametrize("args, message", [
    (["--fid-every", "1", "--fid-ref", "missing.npz"], "--fid-ref missing.npz: no such file or folder"),
    (["--fid-ref", "missing.npz"], "--fid-ref is for --fid-every N, which is not given"),
    (["--fid-detector", "x.pth"], "--fid-detector is for --fid-every N, which is not given"),
    (["--init", "missing-run"], "--init missing-run: no such file or folder"),
    (["--fid-every", "1", "--fid-ref", "REF"], "--fid-every needs RGB images; toy has samples of shape (2,)"),
])
def test_inputs_are_checked_before_the_run_folder_is_created(tmp_path, args, message):
    """A refused run leaves no config.json behind, so the corrected retry is not refused for it."""
    args = [str(tiny_ref(tmp_path / "ref.npz")) if a == "REF" else a for a in args]
    out = tmp_path / "o"
    assert untouched(tmp_path, "--steps", "1", *args, "--out", str(out), never=out) == f"train.py: error: {message}"


def write_labelled_zip(path, labels, label_dim=None):
    write_image_zip(path, n=len(labels), res=8, labels=False)
    meta = {"labels": [[f"00000/img{i:08d}.png", y] for i, y in enumerate(labels)]}
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("dataset.json", json.dumps(meta if label_dim is None else {**meta, "label_dim": label_dim}))


@pytest.mark.parametrize("case, message", [
    ("label-cat", "dataset.json labels must be integers, got 'cat' for 00000/img00000001.png"),
    ("label-float", "dataset.json labels must be integers, got 1.5 for 00000/img00000001.png"),
    ("label-dim-text", "dataset.json's label_dim must be an integer in [1, 100000], got '10'"),
    ("label-dim-huge", "dataset.json's label_dim must be an integer in [1, 100000], got 1000000000000.0"),
    ("label-dim-big", "dataset.json's label_dim must be an integer in [1, 100000], got 1000000000000"),
    ("complex", "expected an N x D array of real numbers (N >= 2, D >= 1), got shape (4, 2) dtype complex"),
    ("no-columns", "expected an N x D array of real numbers (N >= 2, D >= 1), got shape (4, 0)"),
])
def test_bad_data_is_a_one_line_error_not_a_silent_conversion(tmp_path, case, message):
    path = tmp_path / ("d.zip" if case.startswith("label") else "p.npy")
    if case.startswith("label"):
        labels = [0, "cat" if case == "label-cat" else 1.5 if case == "label-float" else 1, 0, 1]
        write_labelled_zip(path, labels, dict(text="10", huge=1e12, big=10**12).get(case.rsplit("-", 1)[1]))
    else:
        np.save(path, np.zeros((4, 2), np.complex64) if case == "complex" else np.zeros((4, 0), np.float32))
    extra = ["--net", "ddpmpp-tiny", "--batch", "2", "--cond"] if case.startswith("label") else []
    out = tmp_path / "o"
    assert message in untouched(tmp_path, "--data", str(path), *extra, "--steps", "1", "--out", str(out), never=out)


def test_data_extensions_are_case_insensitive(tmp_path):
    np.save(tmp_path / "pts.npy", data.toy_points(64).numpy())
    os.rename(tmp_path / "pts.npy", tmp_path / "PTS.NPY")
    run("--data", str(tmp_path / "PTS.NPY"), "--steps", "1", "--out", str(tmp_path / "run"))
    assert load(tmp_path / "run")["config"]["preset"] == "toy"


def test_a_read_only_out_is_a_one_line_error(tmp_path, monkeypatch):
    """As root a chmod cannot make a folder read-only, so the lock's open fails as it would there."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(checkpoints.LOCK):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    existing, new = tmp_path / "existing", tmp_path / "new"
    existing.mkdir()
    message = untouched(tmp_path, "--steps", "1", "--out", str(existing))
    assert message == f"train.py: error: cannot write in the run folder {existing} (Permission denied)"
    assert "cannot write in the run folder" in untouched(tmp_path, "--steps", "1", "--out", str(new), never=new)


def test_a_full_disk_during_a_save_keeps_the_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run("--steps", "2", "--out", out)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()

    def full_disk(state, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    message = refused(run, "--steps", "3", "--resume", out)
    assert message == (f"train.py: error: cannot write {out}/ckpt.pt (No space left on device); the previous ckpt.pt is "
                       f"kept")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "curves.png", "metrics.jsonl", "samples.npy",
                                       "samples.png"]


def test_net_mismatch_names_the_keys(tmp_path):
    small, wide = nets.build_net("mlp-small", (2,)), nets.build_net("mlp", (2,))
    with pytest.raises(cli.UsageError) as e:
        checkpoints.load_weights(wide, small.state_dict(), "--init X")
    assert str(e.value).startswith("--init X does not fit this data/net (MLP): ") and "shape of " in str(e.value)
    assert " vs the net's (" in str(e.value)
    weights = {**small.state_dict(), "extra.weight": torch.zeros(1)}
    weights.pop(next(iter(weights)))
    with pytest.raises(cli.UsageError, match=r"missing \S+; unexpected extra.weight$"):
        checkpoints.load_weights(small, weights, "--init X")
    cm_run = str(tmp_path / "cm")
    run("--steps", "1", "--net", "mlp-small", "--out", cm_run, method="cm")
    message = untouched(tmp_path, "--stage1", cm_run, "--net", "mlp", "--steps", "1", "--out", str(tmp_path / "t"),
                        method="tcm", never=tmp_path / "t")
    assert f"--stage1 {cm_run} does not fit this data/net (MLP): shape of" in message


def test_method_and_net_names_from_a_checkpoint_are_looked_up_in_the_lists(tmp_path):
    assert train.recipe.METHODS is checkpoints.METHOD_NAMES
    assert checkpoints.method_module("scm").__name__ == "scm"
    for name in ("os", "tests.conftest", ["cm"]):
        with pytest.raises(cli.UsageError,
                           match=r"^unknown method .*; choose from meanflow, scm, cm, tcm, diffusion, shortcut, flowmap$"):
            checkpoints.method_module(name)
    out = str(tmp_path / "run")
    run("--steps", "1", "--out", out)
    state = load(out)
    for key, value, message in (("method", "os", "unknown method 'os'"), ("net", "resnet", "unknown net 'resnet'"),
                                ("net", ["mlp"], r"unknown net \['mlp'\]")):
        bad = {**state, "config": {**state["config"], key: value}}
        with pytest.raises(cli.UsageError, match=message):
            checkpoints.frozen_ema(bad, (2,), 0, "cpu", "teacher")

# --- Divergence and degenerate settings --------------------------------------------------------------------------------


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    """lr 1e6 on cm: the loss turns NaN within a few steps. The console counts the non-finite steps, the run stops after
    --max-nonfinite 3 consecutive ones, writes no checkpoint inside the stretch and no samples."""
    out = str(tmp_path / "run")
    message = refused(run, "--steps", "40", "--lr", "1e6", "--ckpt-every", "1", "--max-nonfinite", "3", "--out", out,
                      method="cm")
    lines = capsys.readouterr().out.splitlines()
    counts = [int(line.split("nonfinite ")[1].split()[0]) for line in lines if line.startswith("step") and "ETA" in line]
    first_bad = counts.index(1) + 1
    assert counts[:first_bad - 1] == [0] * (first_bad - 1) and counts[first_bad - 1:] == [1] * len(counts[first_bad - 1:])
    state = load(out)
    assert state["step"] == first_bad - 1 > 0
    assert message == (f"train.py: error: step {first_bad + 2}: 3 consecutive steps with a non-finite loss or gradients "
                       f"(--max-nonfinite 3); the last good checkpoint {out}/ckpt.pt (step {first_bad - 1}) is kept")
    assert all(torch.isfinite(v).all() for sd in [state["net"], *state["ema"]] for v in sd.values())
    assert not any(name.startswith("samples") for name in os.listdir(out))
    assert not os.path.exists(os.path.join(out, checkpoints.LOCK))


def test_a_non_finite_loss_counts_even_when_its_gradients_are_finite(tmp_path, monkeypatch):
    """An Inf added as a constant to one example's loss leaves every gradient finite; the step still counts."""
    loss = meanflow.loss

    def inf_loss(*args, **kwargs):
        per_example, logs = loss(*args, **kwargs)
        return per_example + torch.where(torch.arange(len(per_example)) == 0, torch.inf, 0.0), logs

    monkeypatch.setattr(meanflow, "loss", inf_loss)
    out = str(tmp_path / "run")
    message = refused(run, "--steps", "5", "--max-nonfinite", "2", "--out", out)
    assert message.startswith("train.py: error: step 2: 2 consecutive steps with a non-finite loss") and "no checkpoint" in message
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]  # no checkpoint, no samples


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--batch-gpu", "0"], "--batch-gpu must be >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--ckpt-every", "0"], "--ckpt-every must be >= 1, got 0"),
    (["--sample-every", "-1"], "--sample-every must be >= 0, got -1"),
    (["--snapshot-every", "-1"], "--snapshot-every must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--augment", "1.5"], "--augment is a probability in [0, 1], got 1.5"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
    (["--betas", "0.9"], "--betas needs two values in [0, 1), got 0.9"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_bad_numbers_are_refused_before_anything_is_created(tmp_path, args, message):
    out = tmp_path / "never"
    assert refused(run, "--steps", "2", *args, "--out", str(out)) == f"train.py: error: {message}"
    assert not out.exists() and os.listdir(tmp_path) == []


def test_resume_flags_are_checked_too(tmp_path):
    out = str(tmp_path / "run")
    run("--steps", "1", "--out", out)
    before = snapshot(out)
    assert refused(run, "--resume", out, "--steps", "0") == "train.py: error: --steps must be >= 1, got 0"
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_bytes(b"precious")
    assert refused(run, "--steps", "1", "--out", str(tmp_path / "f")) == f"train.py: error: --out {tmp_path / 'f'} is a file, not a folder"
    assert "cannot create the run folder" in refused(run, "--steps", "1", "--out", str(tmp_path / "f" / "sub"))
    assert (tmp_path / "f").read_bytes() == b"precious" and os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("argv, shown", [
    (["--method", "scm"], ["--tangent TANGENT [preset toy: fused]", "[preset toy: 256]", "[preset toy: 0.9,0.99]"]),
    (["--method", "scm", "--data", "cifar10"], ["[preset cifar10: fused]", "[preset cifar10: 512]", "[preset cifar10: radam]"]),
    (["--method", "cm", "--preset", "cifar10"], ["[preset cifar10: ddpmpp]"]),
])
def test_help_shows_the_values_the_preset_will_use(capsys, argv, shown):
    with pytest.raises(SystemExit) as e:
        train.cli([*argv, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert " ".join(s.split()) in text, s


def test_fid_refuses_a_reference_with_nan(tmp_path):
    g = np.random.default_rng(0)
    mu, sigma = g.normal(size=2048), np.eye(2048)
    np.savez(tmp_path / "good.npz", mu=mu, sigma=sigma)
    fid.load_ref(str(tmp_path / "good.npz"))
    for name, bad in [("mu", dict(mu=np.where(np.arange(2048) == 7, np.nan, mu), sigma=sigma)),
                      ("sigma", dict(mu=mu, sigma=np.where(np.eye(2048) > 0, np.inf, sigma)))]:
        np.savez(tmp_path / f"{name}.npz", **bad)
        with pytest.raises(cli.UsageError, match="hold NaN or Inf"):
            fid.load_ref(str(tmp_path / f"{name}.npz"))


def test_fid_sigmas_for_meanflow_names_ts():
    with pytest.raises(cli.UsageError, match="meanflow takes --steps or --ts$"):
        fid.sampler_config(meanflow, meanflow.Config(), sigmas=(80.0, 0.0))

# --- Kill during save --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """A run checkpointing every step is killed (SIGKILL) at random moments, then resumed: every kill leaves a
    loadable ckpt.pt, and the final run equals an uninterrupted one bitwise, with one metrics record per step."""
    common = ["--method", "meanflow", *TINY, "--steps", "200", "--ckpt-every", "1", "--num-samples", "10"]
    straight, out = str(tmp_path / "straight"), str(tmp_path / "killed")
    train.cli([*common, "--out", straight])
    rng, kills, env = random.Random(0), 0, {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *common, "--out", out]
    for _ in range(6):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not has_lock_of(out, p.pid):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        if os.path.exists(os.path.join(out, "ckpt.pt")):
            assert load(out)["step"] >= 1  # whole: the old checkpoint or the new one
            cmd = [sys.executable, "train.py", *common, "--resume", out]
        else:  # killed before its first checkpoint: the folder holds no run to resume
            subprocess.run(["rm", "-r", out], check=True)
    final = subprocess.run([sys.executable, "train.py", *common, "--resume", out], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert kills >= 3
    a, b = load(straight), load(out)
    assert b["step"] == 200 and all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert metrics_steps(out) == list(range(1, 201))
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp")) and not os.path.exists(os.path.join(out, checkpoints.LOCK))


def has_lock_of(out, pid):
    try:
        return json.load(open(os.path.join(out, checkpoints.LOCK)))["pid"] == pid
    except (OSError, ValueError):
        return False


def test_the_house_is_one_way():
    """No two project files import each other; train -> recipe -> checkpoints: checkpoints.py imports none of
    train.py, recipe.py, fid.py, convert.py; recipe.py not train.py or fid.py; fid.py and convert.py not train.py;
    train.py, recipe.py, fid.py and convert.py all take run and checkpoint handling from checkpoints.py; nets.py,
    data.py, cli.py, inception.py, curves.py and the method files import nothing of it (tcm.py: cm.py)."""
    import ast
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    imports = {}
    for name in names:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[name] = found & names - {name}
    assert not imports["checkpoints"] & {"train", "recipe", "fid", "convert"}
    assert not imports["recipe"] & {"train", "fid"}
    assert "train" not in imports["fid"] | imports["convert"]
    assert {"checkpoints"} <= imports["train"] & imports["fid"] & imports["recipe"] & imports["convert"]
    assert "recipe" in imports["train"]
    for leaf in ("nets", "data", "cli", "inception", "curves", "diffusion", "cm", "scm", "meanflow", "shortcut", "flowmap"):
        assert not imports[leaf], (leaf, imports[leaf])  # what a user may copy alone
    assert imports["tcm"] == {"cm"}
    assert not [(a, b) for a in names for b in imports[a] if a in imports.get(b, ())]
