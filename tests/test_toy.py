"""The 2-D benchmark suite's data and score (benchmarks/toy_suite.py): unit-scale distributions, a sliced W2 that
measures what it says, baselines that bracket the ratio, and what each run starts from and when it is reused."""
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import scm
from conftest import ROOT, GaussianOracle, benchmark

toy_suite = benchmark("toy_suite")


@pytest.mark.parametrize("name", list(toy_suite.DISTS))
def test_distributions_are_standardised_and_seeded(name):
    x = toy_suite.draw(name, 4000, seed=0)
    assert x.shape == (4000, 2) and np.isfinite(x).all()
    np.testing.assert_array_equal(x, toy_suite.draw(name, 4000, seed=0))
    z = toy_suite.standardize(x, x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose((z ** 2).sum(1).mean(), 2, rtol=1e-12)  # unit variance per axis on average
    # one scale for both axes: the aspect ratio of the cloud is kept
    np.testing.assert_allclose(z[:, 0].std() / z[:, 1].std(), x[:, 0].std() / x[:, 1].std(), rtol=1e-12)


def test_sliced_w2_of_a_shift():
    """Shifting a set by c moves every projection d.x by d.c: SW2 = |c| sqrt(mean (d.c/|c|)^2) -> |c| / sqrt(2) in
    2-D (tolerance: 256 random directions, RMS error of the mean of cos^2 ~ 0.35 / sqrt(256) ~ 2%)."""
    a = np.random.default_rng(0).standard_normal((1000, 2))
    c = np.array([0.3, -0.4])
    d = toy_suite.sliced_w2(a, a + c)
    assert d == pytest.approx(0.5 / math.sqrt(2), rel=0.06)
    assert toy_suite.sliced_w2(a, a[::-1].copy()) == pytest.approx(0.0, abs=1e-12)  # order does not matter


def test_baselines_bracket_the_ratio():
    """On a thin-structured cloud the moment-matched Gaussian is far and a second draw of the data is close."""
    train, test, floor = (toy_suite.standardize(toy_suite.draw("arms_ring", n, s), toy_suite.draw("arms_ring", 4000, 1))
                          for n, s in ((4000, 1), (2048, 2), (2048, 3)))
    one = toy_suite.baselines(train, test, [floor])
    gauss, data_floor = one["gaussian"], one["floor"]
    assert data_floor < 0.4 * gauss
    assert 0.85 < one["floor_precision"] < 1 and 0.85 < one["floor_recall"] < 1
    # more draws average: the first draw's numbers plus the others', in order
    two = toy_suite.baselines(train, test, [floor, test[::-1]])
    assert two["floor"] == pytest.approx(data_floor / 2, rel=1e-12)  # the held-out set against itself scores 0
    assert two["floor_precision"] == pytest.approx((one["floor_precision"] + 1) / 2, rel=1e-12)  # ... and 1, 1
    assert two["floor_recall"] == pytest.approx((one["floor_recall"] + 1) / 2, rel=1e-12)
    second_gauss = 2 * two["gaussian"] - gauss  # the first Gaussian draw is the same: seeded
    assert second_gauss != gauss and second_gauss == pytest.approx(gauss, rel=0.3)
    assert toy_suite.sliced_w2(np.zeros_like(test), test) > gauss  # a point mass is worse than the Gaussian


def test_precision_and_recall_count_the_points_inside_the_other_sets_balls():
    """By hand on 1-D sets (k = 1: each point's ball reaches its nearest neighbour): real {0, 1, 2} has radii
    1, 1, 1; fake {0.5, 0.8, 10, 10.3} has radii 0.3 each. Samples inside a real ball: 0.5 and 0.8: precision 1/2;
    real points inside a fake ball: only 1 (0.2 from 0.8): recall 1/3. Then the failure it is there for: a
    Gaussian blob on a thin spiral keeps its recall but loses its precision; half the spiral keeps its precision
    and loses half its recall."""
    real, fake = np.array([[0.0], [1.0], [2.0]]), np.array([[0.5], [0.8], [10.0], [10.3]])
    assert toy_suite.precision_recall(real, fake, k=1) == pytest.approx((1 / 2, 1 / 3), abs=1e-12)
    assert toy_suite.precision_recall(fake, real, k=1) == pytest.approx((1 / 3, 1 / 2), abs=1e-12)  # roles swap
    assert toy_suite.precision_recall(real, fake, k=2)[1] == 1  # k = 2: the balls reach across the gap
    train, test, floor = (toy_suite.standardize(toy_suite.draw("thin_spirals", n, s), toy_suite.draw("thin_spirals", 4000, 1))
                          for n, s in ((4000, 1), (2048, 2), (2048, 3)))
    blob = np.random.default_rng(0).multivariate_normal(train.mean(0), np.cov(train.T), size=2048)
    p_blob, r_blob = toy_suite.precision_recall(test, blob)
    p_data, r_data = toy_suite.precision_recall(test, floor)
    assert p_data > 0.9 and r_data > 0.9 and p_blob < 0.5 and r_blob > 0.9
    half = floor[floor[:, 0] > 0]  # half the spiral: on the data, but covering half of it
    p_half, r_half = toy_suite.precision_recall(test, half)
    assert p_half > 0.9 and 0.4 < r_half < 0.65


def test_held_out_clouds_are_fixed_distinct_and_cover_every_family():
    """The first 12 held-out clouds: every family twice, each a function of its index only, and each far from every
    tuning distribution and every other held-out cloud (sliced W2 between standardised sets of 2,000 points above
    0.15; two draws of one cloud: 0.05-0.10)."""
    clouds = [toy_suite.held_out_cloud(i) for i in range(12)]
    assert [name.split("-")[1] for name, _ in clouds] == list(toy_suite.FAMILIES) * 2
    sets = {}
    for i, (name, sample) in enumerate(clouds):
        x = sample(2000, np.random.default_rng(0))
        assert x.shape == (2000, 2) and np.isfinite(x).all() and name == f"held{i:02d}-{name.split('-')[1]}"
        np.testing.assert_array_equal(x, toy_suite.held_out_cloud(i)[1](2000, np.random.default_rng(0)))
        sets[name] = toy_suite.standardize(x, x)
        again = sample(2000, np.random.default_rng(1))
        assert toy_suite.sliced_w2(toy_suite.standardize(again, x), sets[name]) < 0.12
    for name, f in toy_suite.DISTS.items():
        x = f(2000, np.random.default_rng(0))
        sets[name] = toy_suite.standardize(x, x)
    d = np.random.default_rng(0).standard_normal((2, 256))  # sliced_w2's directions: each set projected once
    proj = {name: np.sort(x @ (d / np.linalg.norm(d, axis=0)), axis=0) for name, x in sets.items()}

    def sw2(a, b):
        return np.sqrt(((proj[a] - proj[b]) ** 2).mean())
    assert abs(sw2("held00-mixture", "moons") - toy_suite.sliced_w2(sets["held00-mixture"], sets["moons"])) < 1e-12
    for a, _ in clouds:
        assert min(sw2(a, b) for b in sets if b != a) > 0.15, a


@pytest.mark.slow
def test_suite_held_out_second_seed_and_spikes(tmp_path):
    """--held-out N trains on held-out clouds (their data files named after them); --second-seed R trains every cell
    above R again with --seed + 1 into its own folder and shows both ratios; --extra-for adds flags to the methods it
    names only (an unknown name is refused before anything is written); the growth and spike rows read train.py's
    grad_norm_growth and grad_norm_spike records."""
    suite = os.path.join(ROOT, "benchmarks", "toy_suite.py")
    p = subprocess.run([sys.executable, suite, "--held-out", "2", "--dists", "held01-curves", "--methods", "meanflow",
                        "--n", "500", "--steps", "3", "--draws", "1", "--threads", "1", "--second-seed", "0",
                        "--extra-for", "sct,meanflow=--lr 1e-3", "--extra-for", "ct=--lr 5",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    first, second = results["runs"]["held01-curves/meanflow"], results["second_seed"]["held01-curves/meanflow"]
    assert os.listdir(tmp_path / "data") == ["held01-curves.npy"]
    assert first["out"].endswith("held01-curves-meanflow") and second["out"].endswith("held01-curves-meanflow-seed1")
    assert json.load(open(os.path.join(second["out"], "config.json")))["seed"] == 1 and first["ratio"] != second["ratio"]
    assert [json.load(open(os.path.join(r["out"], "config.json")))["lr"] for r in (first, second)] == [1e-3, 1e-3]
    bad = subprocess.run([sys.executable, suite, "--extra-for", "sCT=--lr 1", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--extra-for takes METHODS=FLAGS" in bad.stderr and not os.path.exists(tmp_path / "x")
    assert f"| held01-curves | {results['baselines']['held01-curves']['floor'] / results['baselines']['held01-curves']['gaussian']:.2f} | " \
           f"{first['ratio']:.2f} / {second['ratio']:.2f} (" in p.stdout
    assert "| largest grad-norm growth | | nanx |" in p.stdout  # 3 steps: no interval past 100 settled steps
    records = [{"grad_norm_spike": None, "grad_norm_growth": 2.0}, {"grad_norm_spike": 3.5, "grad_norm_growth": 30.0},
               {"grad_norm_spike": 12.0, "grad_norm_growth": 4.0}, {}]
    os.makedirs(tmp_path / "fake")
    with open(tmp_path / "fake" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert toy_suite.largest(str(tmp_path / "fake"), "grad_norm_spike") == 12.0
    assert toy_suite.largest(str(tmp_path / "fake"), "grad_norm_growth") == 30.0


@pytest.mark.parametrize("method, needs", [("sct", "diffusion"), ("ct", "diffusion"), ("scd", "diffusion"),
                                           ("cd", "diffusion"), ("tcm", "ct"), ("fmd", "diffusion")])
def test_suite_runs_start_from_what_the_reference_starts_from(tmp_path, monkeypatch, method, needs):
    """sCT and CT tune the diffusion run, as the reference's results do; sCD / CD and the flow map fmd distil it; TCM
    continues CT. Asking for one without the run it starts from is refused before anything is written."""
    monkeypatch.setattr(sys, "argv", ["toy_suite.py", "--dists", "moons", "--methods", method, "--n", "500", "--steps",
                                      "1", "--out", str(tmp_path / "suite")])
    with pytest.raises(SystemExit, match=f"need --methods to include {needs}$"):
        toy_suite.main()
    assert not os.path.exists(tmp_path / "suite")


class CountingOracle(GaussianOracle):
    """The exact average velocity of Gaussian data (conftest.py), counting its calls."""
    calls = 0

    def forward(self, z, t, r, y=None, tangents=None):
        self.calls += 1
        return super().forward(z, t.double(), r.double(), y, tangents)


@pytest.mark.parametrize("name", ["meanflow", "shortcut", "flowmap"])
def test_sampler_in_n_steps_and_as_a_flow_on_the_exact_gaussian_map(name):
    """--sample-steps N: with the exact flow map every N lands on the exact sample (float64, 1e-12) in N net calls;
    --velocity: N Euler steps of u(z, t, t) from the sampler's start, a first-order error (halved by 2N); no flags:
    the run's own sampler and config."""
    method, cfg = importlib.import_module(name), importlib.import_module(name).Config()
    net = CountingOracle()
    eps = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = cfg.sample_ts[0] if name == "meanflow" else 1.0
    t, r = torch.full((64,), t0, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    with torch.no_grad():  # z = t0 eps at t0 carried to t = 0 by the exact map, in one jump
        exact = t0 * eps - t0 * net.u(t0 * eps, t, r)
    assert toy_suite.sampler(method, cfg) == (method, cfg)
    for n in (1, 2, 4):
        sampler, c = toy_suite.sampler(method, cfg, n)
        net.calls = 0
        torch.testing.assert_close(sampler.sample(net, eps, c), exact, rtol=1e-12, atol=1e-12)
        assert net.calls == n
    errors = []
    for n in (32, 64):
        sampler, c = toy_suite.sampler(method, cfg, n, velocity=True)
        net.calls = 0
        errors.append((sampler.sample(net, eps, c) - exact).abs().max().item())
        assert net.calls == n
    assert 1.8 < errors[0] / errors[1] < 2.2 and errors[1] < 0.05, errors  # measured: 0.071, 0.036


def test_sample_steps_flags(tmp_path, monkeypatch):
    """--sample-steps N sets each sampler as fid.py calc --steps N does (the diffusion teacher: N Heun steps; CT: an
    N-step sigma list; MeanFlow: its 2-step grid 0.999, 0.5, 0); --velocity for a net without u(z, t, t), a shortcut
    N that is not a power of two and --velocity without N are refused before anything is written."""
    import cm
    import diffusion
    import meanflow
    assert toy_suite.sampler(diffusion, diffusion.Config(), 5)[1].sample_steps == 5
    assert len(toy_suite.sampler(cm, cm.Config(), 3)[1].sample_sigmas) == 4
    assert toy_suite.sampler(meanflow, meanflow.Config(), 2)[1].sample_ts == (0.999, 0.5, 0.0)
    for flags, message in ((["--methods", "meanflow,diffusion", "--sample-steps", "2", "--velocity"], "--velocity applies"),
                           (["--methods", "shortcut", "--sample-steps", "6"], "power of two steps, got --sample-steps 6"),
                           (["--methods", "meanflow", "--velocity"], "--velocity needs it")):
        monkeypatch.setattr(sys, "argv", ["toy_suite.py", *flags, "--out", str(tmp_path / "suite")])
        with pytest.raises(SystemExit, match=message):
            toy_suite.main()
        assert not os.path.exists(tmp_path / "suite")


@pytest.mark.slow
def test_suite_reuses_a_run_only_while_its_command_preset_and_teacher_are_unchanged(tmp_path, monkeypatch):
    """A second call reuses finished runs, also from a moved suite folder; a retrained diffusion run retrains the sCT
    run that tunes it; a preset edit changes the key a run is reused by (the command line alone does not show it)."""
    suite = os.path.join(ROOT, "benchmarks", "toy_suite.py")

    def status(out, *flags):
        p = subprocess.run([sys.executable, suite, "--dists", "moons", "--methods", "diffusion,sct", "--n", "500",
                            "--steps", "1", "--draws", "1", "--out", str(out), *flags], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        rows = [line.split() for line in p.stdout.splitlines() if line.split()[:1] == ["moons"]]
        return {row[1].rstrip(":"): row[2] for row in rows}  # "moons diffusion: ok 1.2 s (...)"

    first = tmp_path / "suite"
    assert status(first) == dict(diffusion="ok", sct="ok")
    assert status(str(first) + os.sep) == dict(diffusion="reused", sct="reused")
    os.rename(first, tmp_path / "moved")
    assert status(tmp_path / "moved") == dict(diffusion="reused", sct="reused")
    assert status(tmp_path / "moved", "--extra", "--lr 2e-4") == dict(diffusion="ok", sct="ok")
    os.remove(tmp_path / "moved" / "runs" / "moons-diffusion" / "cost.json")
    assert status(tmp_path / "moved") == dict(diffusion="ok", sct="ok")
    cost = json.load(open(tmp_path / "moved" / "runs" / "moons-sct" / "cost.json"))
    assert cost["command"][:4] == ["--method", "scm", "--data", "<out>/data/moons.npy"]
    assert cost["recipe"] == toy_suite.resolved(cost["command"])
    monkeypatch.setitem(scm.PRESETS, "toy", dict(scm.PRESETS["toy"], lr=2e-4))
    assert toy_suite.resolved(cost["command"]) != cost["recipe"]


@pytest.mark.slow
def test_suite_curve_scores_each_snapshot_as_the_run_scores_its_final_samples(tmp_path):
    """--curve-every 2 on a 4-step run: the snapshots of steps 2 and 4 are scored; step 4's EMA ratio is the first
    draw's (samples.npy, drawn from the same weights the same way); the online column samples the online weights (a
    copy of the snapshot whose first EMA is the online net scores, as EMA, the original's online ratio). --draws 3:
    the table's ratio is the mean of three different draws, the baselines the means of three draws each."""
    suite = os.path.join(ROOT, "benchmarks", "toy_suite.py")
    p = subprocess.run([sys.executable, suite, "--dists", "moons", "--methods", "meanflow", "--n", "500", "--steps", "4",
                        "--curve-every", "2", "--draws", "3", "--threads", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    run = results["runs"]["moons/meanflow"]
    (s2, ema2, online2), (s4, ema4, online4) = run["curve"]
    assert (s2, s4) == (2, 4) and ema2 != ema4 and ema4 != online4
    assert ema4 == pytest.approx(run["ratios"][0], rel=1e-9, abs=0)
    assert len(set(run["ratios"])) == 3 and run["ratio"] == pytest.approx(np.mean(run["ratios"]), rel=1e-12)
    assert f"| moons | {results['baselines']['moons']['floor'] / results['baselines']['moons']['gaussian']:.2f} | " \
           f"{run['ratio']:.2f} (" in p.stdout
    assert run["ratio"] > 0.35 and f"above 0.35 (unrounded; red in the grid): MeanFlow on moons {run['ratio']:.3f}\n" \
        in p.stdout  # 4 steps: far from the goal
    assert f"moons meanflow: 2 {ema2:.2f} ({online2:.2f})  4 {ema4:.2f} ({online4:.2f})" in p.stdout

    import torch
    state = torch.load(tmp_path / "runs" / "moons-meanflow" / "snapshots" / "ckpt-0000004.pt", weights_only=True)
    os.makedirs(tmp_path / "swapped" / "snapshots")
    torch.save(dict(state, ema=[state["net"]]), tmp_path / "swapped" / "snapshots" / "ckpt-0000004.pt")
    i = list(toy_suite.DISTS).index("moons")
    train, test = (toy_suite.draw("moons", n, seed) for n, seed in ((500, 1000 + i), (4096, 2000 + i)))
    train, test = toy_suite.standardize(train, train), toy_suite.standardize(test, train)
    gaussian = toy_suite.baselines(train, test, [test] * 3)["gaussian"]
    assert gaussian == pytest.approx(results["baselines"]["moons"]["gaussian"], rel=1e-12)
    [(_, ema, _)] = toy_suite.curve(str(tmp_path / "swapped"), test, gaussian)
    assert ema == pytest.approx(online4, rel=1e-9, abs=0)

    # --eval-points 1000: the same run (reused, not retrained) scored on 1,000 held-out points, its three sets drawn
    # from ckpt.pt (samples.npy holds 4,096), the baselines on 1,000-point sets
    p = subprocess.run([sys.executable, suite, "--dists", "moons", "--methods", "meanflow", "--n", "500", "--steps", "4",
                        "--curve-every", "2", "--draws", "3", "--threads", "1", "--out", str(tmp_path),
                        "--eval-points", "1000"], capture_output=True, text=True)
    assert p.returncode == 0 and "moons  meanflow: reused" in p.stdout, p.stderr[-2000:]
    again = json.load(open(tmp_path / "results.json"))
    run1000 = again["runs"]["moons/meanflow"]
    assert len(set(run1000["ratios"])) == 3 and not set(run1000["ratios"]) & set(run["ratios"])
    raw = toy_suite.draw("moons", 500, 1000 + i)  # the training points before standardising
    test1000 = toy_suite.standardize(toy_suite.draw("moons", 1000, 2000 + i), raw)
    assert toy_suite.baselines(train, test1000, [test1000] * 3)["gaussian"] == pytest.approx(
        again["baselines"]["moons"]["gaussian"], rel=1e-12)
    bad = subprocess.run([sys.executable, suite, "--eval-points", "8", "--out", str(tmp_path / "y")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--eval-points >= 16" in bad.stderr and not os.path.exists(tmp_path / "y")
