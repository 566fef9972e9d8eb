"""train.py end to end: smoke runs on every data kind, bad input, exact resume, and the 2-process (gloo) proof
that gradients are synchronised with a JVP loss."""
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import recipe
import train
from conftest import ROOT
from test_data import write_image_zip

FAST = ["--log-every", "5", "--num-samples", "50"]


def run(tmp_path, *args, out="run"):
    """train.py in-process; --method meanflow unless args name another."""
    out_dir = str(tmp_path / out)
    method = [] if "--method" in args else ["--method", "meanflow"]
    train.cli([*method, "--out", out_dir, *FAST, *args])
    return out_dir


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_collapsed_point_samples_are_reported(tmp_path, capsys, monkeypatch):
    """A one-step map that collapsed to a point trains with a normal-looking loss and exits 0 (CT did so on the 2-D
    suite); the run says so. Samples with the data's spread do not warn."""
    run(tmp_path, "--data", "toy", "--steps", "2", "--batch", "8", out="fine")
    assert "warning" not in capsys.readouterr().out
    point = torch.tensor([0.3, -0.2]) + 0.01 * torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(train, "draw_samples", lambda *args: point)
    run(tmp_path, "--data", "toy", "--steps", "2", "--batch", "8", out="collapsed")
    expected = data.rms_spread(point) / data.rms_spread(data.toy_points(100_000, seed=0))
    assert f"warning: the samples' spread (RMS distance to their mean) is {expected:.1%} of the data's" in \
        capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "collapsed" / "samples.npy"), point.numpy())  # still written


def test_toy_smoke_writes_everything(tmp_path):
    out = run(tmp_path, "--data", "toy", "--steps", "10", "--batch", "32")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "curves.png", "metrics.jsonl", "samples.npy",
                                       "samples.png"]
    state = load(out)
    assert state["step"] == 10 and state["config"]["method"] == "meanflow" and len(state["ema"]) == 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["preset"] == "toy" and cfg["net"] == "mlp-small" and cfg["accum"] == 1
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [5, 10]
    assert {"loss", "kimg", "img_per_s", "loss_by_t", "mse_v", "grad_norm", "nonfinite_grads"} <= set(records[0])
    assert all(np.isfinite(r["loss"]) for r in records) and records[0]["loss_by_t"]
    assert np.load(os.path.join(out, "samples.npy")).shape == (50, 2)


def test_points_npy_and_flags(tmp_path):
    pts = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    out = run(tmp_path, "--data", str(tmp_path / "p.npy"), "--steps", "6", "--batch", "16", "--tangent", "jvp",
              "--lr", "3e-4", "--ema", "0.99,0.999", "--ema-warmup", "false", "--precision", "bf16")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tangent"] == "jvp" and cfg["lr"] == 3e-4 and cfg["ema"] == [0.99, 0.999] and cfg["ema_warmup"] is False
    assert np.load(os.path.join(out, "samples.npy")).shape == (50, 3)
    assert len(load(out)["ema"]) == 2


def test_image_zip_smoke_conditional(tmp_path):
    write_image_zip(tmp_path / "imgs.zip", n=10, res=16)
    out = run(tmp_path, "--data", str(tmp_path / "imgs.zip"), "--net", "ddpmpp-tiny", "--steps", "2", "--batch", "4",
              "--cond", "--xflip", "--label-dropout", "0.1", "--cfg-omega", "1.5")
    samples = np.load(os.path.join(out, "samples.npy"))
    assert samples.shape == (50, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    assert load(out)["net"]["map_label.weight"].shape[1] == 3  # conditioned on the 3 classes of dataset.json


@pytest.mark.parametrize("name", recipe.METHODS)
def test_help_lists_every_config_field(name):
    method = importlib.import_module(name)
    text = recipe.build_parser(method).format_help()
    for field in list(method.Config.__dataclass_fields__) + list(recipe.TRAIN):
        assert "--" + field.replace("_", "-") in text, field


@pytest.mark.parametrize("name", recipe.METHODS)
def test_presets_are_valid_configs(name):
    """Every preset uses only known keys and builds a valid Config; every method has a toy preset."""
    method = importlib.import_module(name)
    known = set(method.Config.__dataclass_fields__) | set(recipe.TRAIN)
    assert "toy" in method.PRESETS
    for preset_name, preset in method.PRESETS.items():
        assert set(preset) <= known, (preset_name, set(preset) - known)
        cfg = {**recipe.TRAIN_DEFAULTS, **{f: d.default for f, d in method.Config.__dataclass_fields__.items()}, **preset}
        recipe.method_config(method, cfg)


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--method", "meanflow", "--data", "missing/file.zip"], "no such dataset"),
    (["--method", "meanflow", "--data", "toy", "--batch", "10", "--batch-gpu", "4"], "not a multiple"),
    (["--method", "meanflow", "--data", "toy", "--net", "resnet9000"], "--net must be one of ddpmpp"),
    (["--method", "meanflow", "--data", "toy", "--net", "ddpmpp"], "square images"),
    (["--method", "meanflow", "--data", "toy", "--cond"], "needs class labels"),
    (["--method", "meanflow", "--data", "toy", "--preset", "imagenet64"], "unknown preset"),
    (["--method", "meanflow", "--data", "toy", "--net", "dit-tiny"], "got samples of shape (2,)"),
    (["--method", "meanflow", "--data", "toy", "--precision", "fp8"], "precision"),
    (["--method", "meanflow", "--data", "toy", "--resume", "nowhere"], "no checkpoint"),
    (["--method", "meanflow", "--data", "toy", "--tangent", "magic", "--steps", "1"], "unknown tangent"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        train.cli([*args, "--out", str(tmp_path / "out")])
    assert isinstance(e.value.code, str) and e.value.code.startswith("train.py: error:")
    assert message in e.value.code and "\n" not in e.value.code


def test_bad_input_exit_status_from_the_shell(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(7, np.float32))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    cases = [(str(tmp_path / "flat.npy"), "N x D"), (str(tmp_path / "bad.zip"), "as a zip")]
    procs = [subprocess.Popen([sys.executable, "train.py", "--method", "meanflow", "--data", data_arg, "--out",
                               str(tmp_path / "o")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for data_arg, _ in cases]  # both at once: most of each is importing torch
    for p, (_, message) in zip(procs, cases):
        _, stderr = p.communicate(timeout=120)
        assert p.returncode != 0 and message in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_existing_run_is_not_overwritten(tmp_path):
    out = run(tmp_path, "--data", "toy", "--steps", "2", "--batch", "8")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path, "--data", "toy", "--steps", "2", "--batch", "8")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_resume_is_exact(tmp_path):
    """20 steps straight == 8 steps, then --resume to 20 (weights, EMA and optimizer state, bitwise)."""
    common = ["--data", "toy", "--batch", "16", "--dropout", "0.1", "--ckpt-every", "4"]
    full = run(tmp_path, *common, "--steps", "20", out="full")
    part = run(tmp_path, *common, "--steps", "8", out="part")
    train.cli(["--method", "meanflow", *FAST, *common, "--steps", "20", "--resume", part])
    a, b = load(full), load(part)
    assert b["step"] == 20
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    for k in a["ema"][0]:
        assert torch.equal(a["ema"][0][k], b["ema"][0][k]), k
    assert torch.equal(a["opt"]["state"][0]["exp_avg_sq"], b["opt"]["state"][0]["exp_avg_sq"])


@pytest.mark.parametrize("case", ["meanflow-jvp", "flowmap-fused",  # tcm on 2 ranks: also tests/test_fsdp.py
                                  *(pytest.param(c, marks=pytest.mark.slow) for c in
                                    ("tcm", "meanflow-fused", "scm-jvp", "scd-fused", "cd", "flowmap-psd"))])
def test_two_gloo_ranks_match_one_process(tmp_path, case):
    """torchrun --nproc_per_node=2 (gloo): both ranks end bitwise identical (train.py all-gathers per-tensor sums
    and fails otherwise) and equal, up to float rounding, the 1-process run with the same global batch split
    into 2 accumulation rounds. tangent=jvp runs torch.func.jvp on the bare module beside the DDP forward;
    scd and cd add a teacher and --init, tcm a frozen stage-1 net; flowmap makes two differentiable passes of the
    DDP-wrapped net per step (the diagonal and the off-diagonal term, each also giving the learned weight's
    log-variance head a gradient), whose gradients DDP still syncs once."""
    method, _, tangent = case.partition("-")
    extra = ["--tangent", tangent] if tangent else []
    if case == "flowmap-psd":  # no derivative: the semigroup loss
        extra = ["--loss-kind", "psd"]
    if case == "flowmap-fused":  # with the learned weight: its head's gradient comes from both passes
        extra = [*extra, "--learned-weight", "true"]
    if case in ("scd-fused", "cd"):
        teacher = run(tmp_path, "--method", "diffusion", "--data", "toy", "--steps", "3", "--batch", "16", out="dif")
        method, extra = ("scm" if method == "scd" else "cm"), [*extra, "--teacher", teacher, "--init", teacher]
    if case == "tcm":
        extra = ["--stage1", run(tmp_path, "--method", "cm", "--data", "toy", "--steps", "3", "--batch", "16", out="cm")]
    common = ["--method", method, "--data", "toy", "--steps", "6", "--batch", "16", "--batch-gpu", "8",
              "--dropout", "0.1", "--log-every", "3", "--num-samples", "10", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *common, "--out", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights identical on all 2 ranks" in p.stdout
    assert "2 ranks x 1 rounds x 8" in p.stdout
    train.cli([*common, "--out", str(tmp_path / "single")])
    a, b = load(tmp_path / "ddp"), load(tmp_path / "single")
    assert a["step"] == b["step"] == 6
    for k in a["net"]:
        torch.testing.assert_close(a["net"][k], b["net"][k], rtol=1e-5, atol=1e-6)
    moved = sum((a["net"][k] - b["ema"][0][k]).abs().sum() for k in a["net"])
    assert moved > 0  # the weights did change over the run


def test_distillation_from_a_meanflow_teacher(tmp_path):
    """--teacher: a trained run's EMA net gives the target velocity u(z, t, t); a mismatched net is a clear error."""
    teacher = run(tmp_path, "--data", "toy", "--steps", "4", "--batch", "16", out="teacher")
    out = run(tmp_path, "--data", "toy", "--steps", "4", "--batch", "16", "--teacher", teacher, out="student")
    assert load(out)["step"] == 4
    pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    np.save(tmp_path / "p3.npy", pts)
    with pytest.raises(SystemExit, match="does not fit"):
        run(tmp_path, "--data", str(tmp_path / "p3.npy"), "--steps", "1", "--batch", "4", "--teacher", teacher, out="bad")


@pytest.mark.slow
def test_readme_quick_start(tmp_path):
    """The README's first command, as a user runs it (about a minute on 2 cores): 1-step samples land on the ring.
    Sliced W2 to held-out data measured 0.052 (data vs data 0.03); one Euler step of the same net gets 0.69."""
    from conftest import sliced_wasserstein
    p = subprocess.run([sys.executable, "train.py", "--method", "meanflow", "--data", "toy", "--out", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    samples = torch.from_numpy(np.load(tmp_path / "run" / "samples.npy"))
    assert samples.shape == (2048, 2) and (tmp_path / "run" / "samples.png").exists()
    assert sliced_wasserstein(samples, data.toy_points(2048, seed=123)) < 0.15


def test_diffusion_then_scm_init_and_teacher(tmp_path):
    """The documented sCM path: a diffusion run, then sCT with --init and sCD with --init and --teacher; the new
    log-variance head is the only freshly initialised part."""
    teacher = run(tmp_path, "--method", "diffusion", "--data", "toy", "--steps", "4", "--batch", "16", out="dif")
    sct = run(tmp_path, "--method", "scm", "--data", "toy", "--steps", "3", "--batch", "16", "--init", teacher, out="sct")
    scd = run(tmp_path, "--method", "scm", "--data", "toy", "--steps", "3", "--batch", "16", "--init", teacher,
              "--teacher", teacher, "--tangent", "fd", out="scd")
    t_state, s_state = load(teacher), load(scd)
    assert "logvar_linear.weight" in s_state["net"] and "logvar_linear.weight" not in t_state["net"]
    assert load(sct)["step"] == 3 and s_state["config"]["tangent"] == "fd"
    # The student moved away from the teacher it started from; the EMA started as the initialised net.
    k = "fc_in.weight"
    assert not torch.equal(s_state["net"][k], t_state["ema"][0][k])


@pytest.mark.parametrize("method", ["cm", "scm"])
def test_distillation_starts_from_the_teacher(tmp_path, capsys, method):
    """CD and sCD with --teacher and no --init: the student and its EMA start as the teacher's first EMA (lr 0 keeps
    them there; sCD's new log-variance head is the only fresh part) and no from-scratch warning; --init still
    overrides; a teacher whose net the student cannot take leaves the student at its own initialisation, with a
    notice."""
    teacher = run(tmp_path, "--method", "diffusion", "--data", "toy", "--steps", "3", "--batch", "16", out="dif")
    other = run(tmp_path, "--method", "diffusion", "--data", "toy", "--steps", "3", "--batch", "16", "--seed", "1",
                out="other")
    small = run(tmp_path, "--method", "diffusion", "--data", "toy", "--steps", "1", "--batch", "16", "--net",
                "mlp-small", out="small")
    capsys.readouterr()
    common = ["--method", method, "--data", "toy", "--steps", "1", "--batch", "16", "--lr", "0"]
    student = load(run(tmp_path, *common, "--teacher", teacher, out="student"))
    said = capsys.readouterr().out
    assert f"initialised from {teacher}" in said and "training from scratch" not in said
    overridden = load(run(tmp_path, *common, "--teacher", teacher, "--init", other, out="overridden"))
    scratch = load(run(tmp_path, *common, "--teacher", small, out="scratch"))
    assert f"the student starts from scratch, not from the teacher {small}: its net mlp-small differs" in \
        capsys.readouterr().out
    for source, got in ((load(teacher), student), (load(other), overridden)):
        weights = source["ema"][0]
        assert {k for k in got["net"] if k not in weights} == ({"logvar_linear.weight", "logvar_linear.bias"}
                                                                if method == "scm" else set())
        for k in weights:
            assert torch.equal(got["net"][k], weights[k]) and torch.equal(got["ema"][0][k], weights[k]), k
    assert not torch.equal(scratch["net"]["fc_in.weight"], load(teacher)["ema"][0]["fc_in.weight"])
    assert scratch["net"]["fc_in.weight"].shape == student["net"]["fc_in.weight"].shape


def test_a_gradient_norm_spike_warns(tmp_path, capsys, monkeypatch):
    """Each log record holds the interval's largest gradient norm, its growth (over the median of every norm since
    the warm-ups) and its spike (over the median of the norms before the interval), each None until 100 norms back it;
    one step whose norm is 1000x the others' warns in its log interval only. lr 0: every step's gradient is the
    initial net's, up to the batch."""
    real, calls = train.repair_and_clip, []

    def spiky(net, max_norm):
        norm, bad = real(net, max_norm)
        calls.append(norm)
        return (1000 * norm if len(calls) == 140 else norm), bad
    monkeypatch.setattr(train, "repair_and_clip", spiky)
    out = run(tmp_path, "--data", "toy", "--steps", "175", "--batch", "16", "--lr", "0", "--lr-warmup", "20",
              "--log-every", "25")
    said = capsys.readouterr().out
    records = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
    norms = calls[:139] + [1000 * calls[139]] + calls[140:]  # what the loop saw, step k at k - 1
    assert [s for s, r in records.items() if r["grad_norm_growth"] is None] == [25, 50, 75, 100]  # < 100 past step 20
    assert [s for s, r in records.items() if r["grad_norm_spike"] is None] == [25, 50, 75, 100, 125]
    assert records[150]["grad_norm_max"] == norms[139] == max(norms[125:150])
    for step in (125, 150, 175):
        top = max(norms[step - 25:step])
        assert records[step]["grad_norm_growth"] == pytest.approx(top / np.median(norms[20:step]), rel=1e-12)
        if step > 125:
            assert records[step]["grad_norm_spike"] == pytest.approx(top / np.median(norms[20:step - 25]), rel=1e-12)
    assert records[150]["grad_norm_spike"] > train.SPIKE_WARNING and records[175]["grad_norm_spike"] < 10
    warnings = [line for line in said.splitlines() if "gradient norm" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: step 150: gradient norm {norms[139]:.3g} is {records[150]['grad_norm_spike']:.0f}x the median of "
        f"the {125 - 20} steps before")  # settled steps 21-125: fewer than the window of 1000


@pytest.mark.parametrize("env, first", [({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                                        ({"RANK": "8", "LOCAL_RANK": "0"}, True),  # the second node's first process
                                        ({"RANK": "1", "LOCAL_RANK": "1"}, False), ({"RANK": "9", "LOCAL_RANK": "1"}, False)])
def test_each_machine_reads_the_data_first_with_one_process(monkeypatch, env, first):
    """Under torchrun with several nodes, LOCAL_RANK 0 of every node loads (may download or decode) before the node's
    other processes, not global rank 0 alone: a node without a shared cache fills its own."""
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert train.first_on_machine() is first


def test_gradient_norm_ratios_window():
    """The spike's median covers the `window` norms before the interval, not the interval's own nor older ones."""
    from types import SimpleNamespace
    loop = SimpleNamespace(settled_norms=[100.0, 100.0, 1.0, 2.0, 3.0, 50.0, 60.0], grad_norms=[50.0, 60.0],
                           settled_before=5)
    growth, spike = train.grad_norm_ratios(loop, window=3, min_steps=3)
    assert growth == 60.0 / 50.0 and spike == 60.0 / 2.0
    assert train.grad_norm_ratios(loop, window=3, min_steps=4) == (60.0 / 50.0, None)


@pytest.mark.parametrize("args, message", [
    (["--method", "scm", "--preset", "cifar10-scd", "--data", "toy"], "pass --teacher"),
    (["--method", "diffusion", "--data", "toy", "--teacher", "DIF"], "does not distil"),
    (["--method", "meanflow", "--data", "toy", "--teacher", "DIF"], "cannot use a diffusion checkpoint"),
    (["--method", "scm", "--data", "toy", "--init", "DIF", "--net", "ddpmpp"], "square images"),
    (["--method", "tcm", "--data", "toy"], "needs --stage1"),
    (["--method", "tcm", "--data", "toy", "--stage1", "DIF"], "must be a cm or tcm run"),
    (["--method", "cm", "--data", "toy", "--stage1", "CM"], "--stage1 is for tcm"),
    (["--method", "tcm", "--data", "toy", "--stage1", "CM", "--stage1-weights", "best"], "must be one of online, ema"),
    # The toy presets' sigma_data is 1; read with another, the checkpoint's net is another denoiser.
    (["--method", "scm", "--data", "toy", "--init", "DIF", "--sigma-data", "0.5"],
     "--init .* was trained with sigma_data 1.0 and this run has 0.5; .*pass --sigma-data 1.0"),
    (["--method", "cm", "--preset", "toy-cd", "--data", "toy", "--teacher", "DIF", "--sigma-data", "0.7"],
     "--teacher .* was trained with sigma_data 1.0 and this run has 0.7"),
    (["--method", "tcm", "--data", "toy", "--stage1", "CM", "--sigma-data", "0.5"],
     "--stage1 .* was trained with sigma_data 1.0 and this run has 0.5"),
    # The toy presets' batch target replaces the single-sample target (x_r, v); a teacher replaces both: the preset's
    # gives way to --teacher (test_a_presets_batch_target_gives_way_to_a_teacher), the user's flag is refused.
    (["--method", "scm", "--preset", "toy", "--data", "toy", "--init", "DIF", "--teacher", "DIF", "--batch-target", "true"],
     "--batch-target is the target of training without a teacher"),
    (["--method", "cm", "--preset", "toy-cd", "--data", "toy", "--teacher", "DIF", "--batch-target", "true"],
     "--batch-target is the target of training without a teacher"),
    (["--method", "meanflow", "--data", "toy", "--teacher", "MF", "--batch-target", "true"],
     "--batch-target is the target of training without a teacher"),
])
def test_teacher_init_and_stage1_errors(tmp_path, args, message):
    """Runs that name the wrong kind of checkpoint, or miss the one they need, stop with a one-line error and leave
    no run folder."""
    paths = {name: run(tmp_path, "--method", method, "--data", "toy", "--steps", "1", "--batch", "8", out=method)
             for name, method in (("DIF", "diffusion"), ("CM", "cm"), ("MF", "meanflow")) if name in args}
    with pytest.raises(SystemExit, match=message):
        train.cli([paths.get(a, a) for a in args] + ["--out", str(tmp_path / "x"), "--steps", "1"])
    assert not os.path.exists(tmp_path / "x")


def test_a_presets_batch_target_gives_way_to_a_teacher():
    """meanflow's and scm's toy presets set batch_target; with --teacher the resolved config has it off."""
    import recipe
    for argv in (["--method", "meanflow", "--data", "toy"], ["--method", "scm", "--preset", "toy", "--data", "toy"]):
        assert recipe.resolve_config(argv)[1]["batch_target"] is True
        assert recipe.resolve_config(argv + ["--teacher", "RUN"])[1]["batch_target"] is False


def test_scm_from_scratch_warns(tmp_path, capsys):
    run(tmp_path, "--method", "scm", "--data", "toy", "--steps", "1", "--batch", "8")
    assert "training from scratch" in capsys.readouterr().out


def test_points_far_from_sigma_data_warn(tmp_path, capsys):
    """EDM-preconditioned methods read points as data of scale sigma_data (1 in the toy presets): a cloud with
    standard deviation 5 per axis gets a warning that names the value; the built-in mixture (0.71), the same cloud
    with --sigma-data 5, and MeanFlow (no sigma_data) do not."""
    x = 5 * np.random.default_rng(0).standard_normal((500, 2)).astype(np.float32)
    np.save(tmp_path / "wide.npy", x)
    std = float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean() / 2))
    common = ("--method", "diffusion", "--steps", "1", "--batch", "8")
    run(tmp_path, *common, "--data", str(tmp_path / "wide.npy"), out="wide")
    assert f"warning: the points' standard deviation per axis is {std:.3g} and sigma_data is 1: standardise the " \
           f"points (see docs/training.md, \"Point data\") or pass --sigma-data {std:.3g}" in capsys.readouterr().out
    for i, extra in enumerate([("--data", "toy"), ("--data", str(tmp_path / "wide.npy"), "--sigma-data", "5")]):
        run(tmp_path, *common, *extra, out=f"quiet{i}")
        assert "warning" not in capsys.readouterr().out, extra
    run(tmp_path, "--data", str(tmp_path / "wide.npy"), "--steps", "1", "--batch", "8", out="meanflow")
    assert "standard deviation per axis" not in capsys.readouterr().out


def test_an_ema_the_warmup_ramp_never_reaches_warns(tmp_path, capsys):
    """With --ema-warmup the decay is min(beta, (1 + k) / (10 + k)): on a 10-step run --ema 0.9 is reached at step 80,
    so the flag changes nothing and the run says so; --ema 0.5 (reached at step 8), --ema-warmup false, or the
    preset's own EMA (not given) do not warn."""
    common = ("--data", "toy", "--steps", "10", "--batch", "8", "--ema-warmup", "true")
    run(tmp_path, *common, "--ema", "0.9", out="short")
    assert "warning: with --ema-warmup the EMA decay (1 + step) / (10 + step) stays below --ema 0.9 until step 80, " \
           "after this run's 10 steps" in capsys.readouterr().out
    for i, extra in enumerate([("--ema", "0.5"), ("--ema", "0.9", "--ema-warmup", "false"), ()]):
        run(tmp_path, *common, *extra, out=f"quiet{i}")
        assert "warning" not in capsys.readouterr().out, extra


def test_ect_stage_counts_the_true_global_batch(tmp_path):
    """CM's ratio comes from images = (step - 1) x global batch, here 16 = 8 per micro-batch x 2 accumulation rounds;
    with 32-image stages: steps 1..5 are stages 0, 0, 1, 1, 2 -> a = 0.5, 0.5, 0.75, 0.75, 0.875."""
    out = run(tmp_path, "--method", "cm", "--data", "toy", "--steps", "5", "--batch", "16", "--batch-gpu", "8",
              "--kimg-per-stage", "0.032", "--log-every", "1")
    ratios = [json.loads(line)["ratio"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert ratios == [0.5, 0.5, 0.75, 0.75, 0.875]


@pytest.mark.parametrize("which", ["online", "ema"])
def test_tcm_starts_from_the_stage1_run(tmp_path, which):
    """--stage1: the student, its EMA and the frozen copy all start from the stage-1 run's online (or EMA) weights
    (lr 0, so they must still be equal after a step)."""
    stage1 = run(tmp_path, "--method", "cm", "--data", "toy", "--steps", "5", "--batch", "16", "--lr", "1e-3", out="cm")
    out = run(tmp_path, "--method", "tcm", "--data", "toy", "--steps", "1", "--batch", "16", "--lr", "0",
              "--stage1", stage1, "--stage1-weights", which, out="tcm")
    src = load(stage1)["net" if which == "online" else "ema"]
    src = src if which == "online" else src[0]
    got = load(out)
    for k in src:
        assert torch.equal(got["net"][k], src[k]) and torch.equal(got["ema"][0][k], src[k]), k
    assert not torch.equal(load(stage1)["net"]["fc_in.weight"], load(stage1)["ema"][0]["fc_in.weight"])


@pytest.mark.parametrize("sigma_rel, gamma", [(0.010, 96.99), (0.050, 16.97), (0.100, 6.94)])
def test_power_ema_exponent(sigma_rel, gamma):
    """EDM2's gamma for each sigma_rel (the values of FastGen 34f30e8 fastgen/configs/callbacks.py,
    EMA_POWER_CALLBACKS), and the defining relation solved back in float64."""
    g = train.power_gamma(sigma_rel)
    assert abs(g - gamma) < 0.005
    assert abs(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel) < 1e-12


def test_power_ema_decays():
    cfg = dict(recipe.TRAIN_DEFAULTS, ema=(0.05, 0.1), ema_kind="power")
    assert train.ema_decays(cfg, 1) == [0.0, 0.0]  # the first step copies the net
    k = 1000
    assert train.ema_decays(cfg, k)[0] == pytest.approx((1 - 1 / k) ** (train.power_gamma(0.05) + 1), rel=1e-15)
    assert train.ema_decays(cfg, k)[0] < train.ema_decays(cfg, k)[1]  # narrower width: the average covers less of the run
    cfg = dict(recipe.TRAIN_DEFAULTS, ema=(0.999,), ema_warmup=True)
    assert train.ema_decays(cfg, 5) == [6 / 15] and train.ema_decays(dict(cfg, ema_warmup=False), 5) == [0.999]


def test_power_ema_end_to_end(tmp_path):
    """--ema-kind power: after one step the EMA equals the net; after two it is (1 - 1/2)^(gamma + 1) of the way back."""
    one = load(run(tmp_path, "--data", "toy", "--steps", "1", "--batch", "16", "--ema-kind", "power", "--ema", "0.1",
                   out="one"))
    assert all(torch.equal(one["ema"][0][k], one["net"][k]) for k in one["net"])
    two = load(run(tmp_path, "--data", "toy", "--steps", "2", "--batch", "16", "--ema-kind", "power", "--ema", "0.1",
                   out="two"))
    beta = 0.5 ** (train.power_gamma(0.1) + 1)
    for k in one["net"]:
        expect = beta * one["net"][k].double() + (1 - beta) * two["net"][k].double()
        torch.testing.assert_close(two["ema"][0][k].double(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args", [["--ema-kind", "power", "--ema", "0.9999"], ["--ema", "1.5"], ["--ema-kind", "box"]])
def test_bad_ema_is_one_line_error(tmp_path, args):
    with pytest.raises(SystemExit) as e:
        train.cli(["--method", "meanflow", "--data", "toy", "--out", str(tmp_path / "o"), *args])
    assert "ema" in e.value.code and "\n" not in e.value.code


def test_default_preset_follows_the_data(tmp_path):
    """toy for points, cifar10 for 32x32 images, imagenet64 for 64x64 images (`--data imagenet64.zip`),
    imagenet256 for a latent folder; a method without that preset says so in one line."""
    write_image_zip(tmp_path / "in64.zip", n=2, res=64)
    write_image_zip(tmp_path / "c32.zip", n=2, res=32)
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "latents.json").write_text("{}")
    expect = {"toy": "toy", str(tmp_path / "c32.zip"): "cifar10", str(tmp_path / "in64.zip"): "imagenet64",
              str(tmp_path / "lat"): "imagenet256"}
    for spec, preset in expect.items():
        assert recipe.default_preset(spec) == preset
    _, cfg, _, _ = recipe.resolve_config(["--method", "cm", "--data", str(tmp_path / "in64.zip")])
    assert (cfg["preset"], cfg["net"], cfg["ema_kind"]) == ("imagenet64", "edm2-s", "power")
    with pytest.raises(train.UsageError, match="default for --data"):
        recipe.resolve_config(["--method", "diffusion", "--data", str(tmp_path / "in64.zip")])


def test_a_teacher_picks_the_distilling_preset(tmp_path):
    """With --teacher and no --preset, the data's preset becomes its one distilling variant (scm: toy-scd,
    cifar10-scd, imagenet64-scd; cm: toy-cd); without a teacher, or with --preset, nothing changes."""
    write_image_zip(tmp_path / "in64.zip", n=2, res=64)
    cases = [(["--method", "scm", "--data", "toy", "--teacher", "T"], "toy-scd"),
             (["--method", "scm", "--data", "cifar10", "--teacher", "T"], "cifar10-scd"),
             (["--method", "scm", "--data", str(tmp_path / "in64.zip"), "--teacher", "T"], "imagenet64-scd"),
             (["--method", "cm", "--data", "toy", "--teacher", "T"], "toy-cd"),
             (["--method", "cm", "--data", "cifar10", "--teacher", "T"], "cifar10"),  # CD there is the CT recipe
             (["--method", "scm", "--data", "toy"], "toy"),
             (["--method", "cm", "--data", "toy"], "toy"),
             (["--method", "scm", "--data", "toy", "--teacher", "T", "--preset", "toy"], "toy")]
    for argv, preset in cases:
        _, cfg, method, given = recipe.resolve_config(argv)
        assert cfg["preset"] == preset, argv
        assert cfg["distill"] == preset.endswith(("-scd", "-cd"))
        want = json.loads(json.dumps(method.PRESETS[preset]))
        if "--teacher" in argv and "batch_target" in want:
            want["batch_target"] = False  # a preset's batch target gives way to a teacher
        assert want.items() <= cfg.items()  # the preset's values, all of them
        assert ("preset" in given) == ("--preset" in argv)  # a resumed run keeps its own preset


def test_tcm_power_ema_continues_the_stage1_step_count(tmp_path):
    """In TCM the power EMA's k continues from stage 1 (FastGen 34f30e8: fastgen/callbacks/ema.py,
    EMACallback._total_iteration adds the loaded checkpoint's resume_iter), so after stage 1's 3 steps and one TCM
    step the EMA is beta_4 (stage-1 weights) + (1 - beta_4) (new weights), not a copy (which beta_1 = 0 would give)."""
    power = ["--ema-kind", "power", "--ema", "0.05"]
    stage1 = run(tmp_path, "--method", "cm", "--data", "toy", "--steps", "3", "--batch", "16", *power, out="cm")
    out = load(run(tmp_path, "--method", "tcm", "--data", "toy", "--steps", "1", "--batch", "16", "--lr", "1e-3",
                   "--stage1", stage1, *power, out="tcm"))
    start = load(stage1)["net"]
    beta = (1 - 1 / 4) ** (train.power_gamma(0.05) + 1)
    for k in start:
        expect = beta * start[k].double() + (1 - beta) * out["net"][k].double()
        torch.testing.assert_close(out["ema"][0][k].double(), expect, rtol=1e-6, atol=1e-7)
    assert not torch.equal(out["ema"][0]["fc_in.weight"], out["net"]["fc_in.weight"])
