"""FSDP (train.py --fsdp, parallel.py) on two gloo ranks: every method and tangent option equal to the one-process run
of the same global batch in two accumulation rounds (tests/fsdp_worker.py, float64), the per-rank bytes halved, and
checkpoints that move between one process, DDP and FSDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, background, waited
from fsdp_worker import CASES

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@background("worker")
def run_worker(folder):
    torchrun(os.path.join("tests", "fsdp_worker.py"), str(folder / "results.json"), timeout=600)
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return waited("worker", tmp_path_factory)


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("-bf16")])
def test_every_method_under_fsdp_equals_one_process(worker, case):
    """Float64, 2 Adam steps: the per-micro-batch losses within 1e-12 and the weights within 1e-9 (relative) of the
    one-process run with accumulation; the checkpoint's gathered state_dict equal to the reference's (0-d EDM2 gains
    keep their shape), and an optimizer state moved into the shards and gathered back unchanged."""
    r = worker[case]
    assert r["moved"] > 1e-4  # the weights did change
    assert max(r["loss_rel_err"]) < 1e-12, r["loss_rel_err"]
    assert r["weight_rel_err"] < 1e-9
    assert r["state_err"] < 1e-9
    assert r["opt_round_trip"]


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-bf16")])
def test_bf16_policy_matches_autocast(worker, case):
    """--precision bf16: gathering the weights in bf16 gives the first step's loss of fp32 weights under autocast (the
    convolutions and matmuls cast them to bf16 either way), the second step's within 1e-5."""
    r = worker[case]
    assert r["loss_rel_err"][0] < 1e-6 and r["loss_rel_err"][1] < 1e-5, r["loss_rel_err"]
    assert r["opt_round_trip"]


@pytest.mark.parametrize("case", ["diffusion", "tcm", "meanflow-edm2", "sct-dit"])
def test_each_rank_holds_half_the_weights_gradients_and_adam_state(worker, case):
    """Measured on rank 0: within 1 % of half of the whole net's bytes (FSDP pads a parameter whose first dimension
    does not split evenly; rank 0 holds the larger part)."""
    r = worker[case]
    for kind in ("weights", "grads", "optimizer"):
        assert 0.5 <= r["rank_bytes"][kind] / r["whole_bytes"][kind] < 0.51, kind


# --- train.py --fsdp -------------------------------------------------------------------------------------------------

COMMON = ["--method", "meanflow", "--tangent", "fused", "--data", "toy", "--batch", "16", "--batch-gpu", "4",
          "--dropout", "0.1", "--grad-clip", "0.1", "--log-every", "3", "--ckpt-every", "3", "--num-samples", "10"]


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_checkpoint(a, b, exact):
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    assert a["step"] == b["step"]
    assert len(a["ema"]) == len(b["ema"])
    for i, (sa, sb) in enumerate([(a["net"], b["net"]), *zip(a["ema"], b["ema"])]):  # the net, then each EMA
        assert sa.keys() == sb.keys()
        assert all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and check(sa[k], sb[k]) for k in sa), i
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i, s in a["opt"]["state"].items():
        assert all(check(v, b["opt"]["state"][i][k]) for k, v in s.items()), i


@background("fsdp_run")
def run_fsdp(folder):
    """6 steps of COMMON under FSDP, a snapshot and samples every 3: (its run folder, stdout)."""
    return str(folder / "f6"), torchrun("train.py", *COMMON, "--steps", "6", "--fsdp", "--sample-every", "3",
                                        "--snapshot-every", "3", "--out", str(folder / "f6"))


@pytest.fixture(scope="module")
def fsdp_and_one_process_runs(tmp_path_factory):
    """The FSDP run (f6) and the same 6 steps on one process (s6)."""
    f6, stdout = waited("fsdp_run", tmp_path_factory)
    s6 = str(tmp_path_factory.mktemp("one-process") / "s6")
    train.cli([*COMMON, "--steps", "6", "--snapshot-every", "3", "--out", s6])
    return f6, s6, stdout


def test_fsdp_run_equals_one_process_and_resumes_on_one_process(fsdp_and_one_process_runs, tmp_path):
    """6 steps under FSDP equal 6 on one process (same global batch: 2 ranks x 2 rounds vs 4 rounds, gradient clipping
    active; weights, EMA, Adam state, the logged loss and gradient norm, a snapshot, the final samples of the EMA
    gathered whole); the checkpoint has the one-process layout, and it resumes on one process."""
    f6, s6, stdout = fsdp_and_one_process_runs
    assert "2 ranks x 2 rounds x 4 | fsdp |" in stdout and "replicated state identical on all 2 ranks" in stdout
    assert json.load(open(os.path.join(f6, "config.json")))["fsdp"] is True
    assert_same_checkpoint(load(f6), load(s6), exact=False)
    assert os.path.exists(os.path.join(f6, "samples-0000003.png")) and os.path.exists(os.path.join(f6, "samples.png"))
    snapshots = [torch.load(os.path.join(out, "snapshots", "ckpt-0000003.pt"), weights_only=True) for out in (f6, s6)]
    for k, v in snapshots[1]["ema"][0].items():
        torch.testing.assert_close(snapshots[0]["ema"][0][k], v, rtol=1e-5, atol=1e-6)
    f_samples, s_samples = (np.load(os.path.join(out, "samples.npy")) for out in (f6, s6))
    np.testing.assert_allclose(f_samples, s_samples, rtol=1e-4, atol=1e-5)  # drawn from the EMA gathered whole
    logged = [[json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] for out in (f6, s6)]
    for a, b in zip(*logged):  # the whole gradient's norm (clipped to 0.1 here), not a shard's
        assert b["grad_norm"] > 0.1 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    train.cli([*COMMON, "--steps", "9", "--resume", f6, "--out", str(tmp_path / "f6s9")])
    train.cli([*COMMON, "--steps", "9", "--resume", s6, "--out", str(tmp_path / "s6s9")])
    assert_same_checkpoint(load(tmp_path / "f6s9"), load(tmp_path / "s6s9"), exact=False)


@pytest.mark.slow  # three more two-rank runs (~15 s); resume on one process is exact by test_train, FSDP's save above
def test_fsdp_resume_is_exact_and_takes_a_one_process_checkpoint(fsdp_and_one_process_runs, tmp_path):
    """Resume is exact under FSDP (3 + 3 steps == 6, bitwise), and a one-process checkpoint resumes under FSDP."""
    f6 = fsdp_and_one_process_runs[0]
    f3, s3 = str(tmp_path / "f3"), str(tmp_path / "s3")
    torchrun("train.py", *COMMON, "--steps", "3", "--fsdp", "--out", f3)
    torchrun("train.py", *COMMON, "--steps", "6", "--fsdp", "--resume", f3)
    assert_same_checkpoint(load(f3), load(f6), exact=True)
    train.cli([*COMMON, "--steps", "3", "--out", s3])
    torchrun("train.py", *COMMON, "--steps", "6", "--fsdp", "--resume", s3, "--out", str(tmp_path / "s3f6"))
    assert_same_checkpoint(load(tmp_path / "s3f6"), load(f6), exact=False)


@pytest.mark.parametrize("args, message", [
    (["--fsdp", "--tangent", "fused"], "--fsdp shards the net over processes: launch with torchrun"),
    (["--fsdp", "--tangent", "jvp"], "--fsdp: torch.func.jvp cannot trace a sharded net; pass --tangent fused"),
])
def test_fsdp_refusals_are_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        train.cli(["--method", "meanflow", "--data", "toy", "--steps", "1", "--out", str(tmp_path / "r"), *args])
    assert not os.path.exists(tmp_path / "r")


def test_the_final_check_sees_a_rank_that_differs(worker):
    """Under FSDP the end-of-run check compares what every rank holds whole (buffers, Adam's step counts): equal
    passes, a buffer changed on rank 1 or a step skipped there raises."""
    assert worker["check"] == dict(same="passed", buffer="raised", step="raised")
