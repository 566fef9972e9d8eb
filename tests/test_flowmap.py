"""flowmap.py: float64 identities with an exact Gaussian oracle, the three tangents, the stop-gradients, the (t, r, m)
sampling rule, the sampler, a tiny 2-D training run and train.py end to end with --resume."""
import math

import pytest
import torch

import diffusion
import flowmap
from conftest import GaussianOracle

D = 2


def sig(t, std):
    return ((1 - t) ** 2 * std ** 2 + t ** 2).sqrt()


def c_of(t, r, std):
    return (sig(t, std) - sig(r, std)) / ((t - r) * sig(t, std))


def a_of(t, std):
    """Slope of the exact velocity v(z, t) in z: sig_t' / sig_t."""
    return ((t - 1) * std ** 2 + t) / sig(t, std) ** 2


def data(B, mean=0.7, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(B, D, generator=g, dtype=torch.float64)


def run(net, x, cfg, seed=1, teacher=None):
    gen = torch.Generator().manual_seed(seed)
    L, logs = flowmap.loss(net, x, None, cfg, 1, gen, teacher=teacher)
    times = flowmap.sample_times(x.shape[0], cfg, torch.Generator().manual_seed(seed), x.device)
    return L, logs, times


KINDS = [("lsd", "jvp"), ("lsd", "fused"), ("lsd", "fd"), ("esd", "jvp"), ("esd", "fused"), ("esd", "fd"),
         ("psd", "jvp")]


@pytest.mark.parametrize("kind, tangent", KINDS)
def test_exact_oracle_gives_zero_self_distillation_loss_and_zero_gradient(kind, tangent):
    """Off-diagonal rows: 0 to 1e-10 (fd: 1e-7, its O(h^2) error); their gradient in (mean, std) likewise."""
    net = GaussianOracle()
    cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=0.25, fd_step=1e-4)
    L, logs, _ = run(net, data(64), cfg)
    n = 16
    tol = 1e-7 if tangent == "fd" else 1e-10
    assert logs["L_off"][:n].abs().max() == 0 and logs["L_off"][n:].max() < tol
    L[n:].sum().backward()
    assert net.mean.grad.abs() < 1e-4 and net.std.grad.abs() < 1e-4


def test_diagonal_term_is_the_irreducible_variance():
    """E|v(z, t) - (eps - x)|^2 = D (1 + s^2 - (t - (1 - t) s^2)^2 / sig_t^2): batch mean within 2 %."""
    mean, std, B = 0.7, 0.5, 100_000
    net = GaussianOracle(mean, std)
    cfg = flowmap.Config(diag_fraction=1.0)
    with torch.no_grad():
        L, logs, (t, _, _, _) = run(net, data(B, mean, std), cfg)
    s2 = std ** 2
    expected = D * (1 + s2 - (t - (1 - t) * s2) ** 2 / sig(t, std) ** 2)
    assert abs(L.mean() / expected.mean() - 1) < 0.02
    assert torch.equal(logs["L_diag"], L.detach())


@pytest.mark.parametrize("kind, tangent", KINDS + [("psd", "fused")])
def test_perturbed_oracle_gives_the_predicted_loss(kind, tangent):
    """u + delta: LSD residual (t - r) a_r delta, ESD (sig_r / sig_t - 1) delta, PSD h (t - m) c(m, r) delta,
    per dimension; rel. 1e-8 (fd 1e-5)."""
    std, delta = 0.5, 0.3
    net = GaussianOracle(std=std, delta=delta)
    for psd_type in ("uniform", "midpoint") if kind == "psd" else ("uniform",):
        cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=0.25, psd_type=psd_type)
        with torch.no_grad():
            _, logs, (t, r, m, h) = run(net, data(64), cfg)
        n = 16
        t, r, m, h = t[n:], r[n:], m[n:], h[n:]
        if kind == "lsd":
            res = (t - r) * a_of(r, std) * delta
        elif kind == "esd":
            res = (sig(r, std) / sig(t, std) - 1) * delta
        else:
            res = h * (t - m) * c_of(m, r, std) * delta
        rel = 1e-5 if tangent == "fd" else 1e-8
        torch.testing.assert_close(logs["L_off"][n:], D * res ** 2, rtol=rel, atol=1e-12)


@pytest.mark.parametrize("kind", ["lsd", "esd"])
def test_three_tangents_agree_with_a_central_difference(kind):
    """A random float64 MLP: the off-diagonal loss by jvp, fused and fd agree (1e-6); the jvp and fd gradients agree
    (1e-5): both differentiate through the time derivative, as losses.py."""
    torch.manual_seed(0)
    import nets
    net = nets.NETS["mlp-small"][0](dim=D, use_r=True, **nets.NETS["mlp-small"][1]).double()
    x = data(32)
    out = {}
    for tangent in ("jvp", "fused", "fd"):
        net.zero_grad()
        cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=0.25, fd_step=1e-5)
        L, logs, _ = run(net, x, cfg)
        L.sum().backward()
        out[tangent] = (logs["L_off"].clone(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(out["fused"][0], out["jvp"][0], rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out["fd"][0], out["jvp"][0], rtol=1e-6, atol=1e-10)
    for gj, gf in zip(out["jvp"][1], out["fd"][1]):
        torch.testing.assert_close(gf, gj, rtol=1e-5, atol=1e-8)


class FrozenTeacher(torch.nn.Module):
    """`net.module` for flowmap's teacher passes: a frozen copy of the student that detaches its inputs, i.e. the
    full stop-gradient by construction; the student passes go through the wrapper's forward."""

    def __init__(self, student):
        super().__init__()
        import copy
        self.student = student
        self.module = copy.deepcopy(student).requires_grad_(False)
        frozen = self.module
        frozen.forward = lambda z, t, r, y=None, tangents=None: type(frozen).forward(
            frozen, z.detach(), t.detach(), r.detach(), y,
            None if tangents is None else tuple(a.detach() for a in tangents))

    def forward(self, *a, **k):
        return self.student(*a, **k)


@pytest.mark.parametrize("kind", ["lsd", "esd", "psd"])
def test_teacher_side_carries_no_gradient(kind):
    """The gradient in (mean, std) of a perturbed oracle equals the one with the teacher passes (LSD: v(X, r) with
    X; ESD: v(z, t) and grad_z u v; PSD: both jumps) replaced by a frozen copy fed detached inputs (1e-12)."""
    cfg = flowmap.Config(loss_kind=kind, tangent="fd", diag_fraction=0.25, fd_step=1e-4)
    grads = []
    for wrap in (False, True):
        net = GaussianOracle(delta=0.3)
        L, _, _ = run(FrozenTeacher(net) if wrap else net, data(64), cfg)
        assert L[16:].sum() > 0
        grads.append(torch.stack(torch.autograd.grad(L[16:].sum(), [net.mean, net.std])))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_lsd_student_gradient_flows_through_the_time_derivative():
    """jvp: the LSD residual's d_r u term carries gradient (losses.py differentiates X.partial_t); a loss computed
    with that term detached has another gradient."""
    class Shift(GaussianOracle):
        def u(self, z, t, r):
            return super().u(z, t, r) + self.mean * (t - r)[:, None] ** 2
    net = Shift()
    cfg = flowmap.Config(loss_kind="lsd", tangent="jvp", diag_fraction=0.25)
    L, _, _ = run(net, data(64), cfg)
    g_jvp = torch.autograd.grad(L[16:].sum(), net.mean)[0]
    net.zero_grad()
    L, _, _ = run(net, data(64), flowmap.Config(loss_kind="lsd", tangent="fused", diag_fraction=0.25))
    g_fused = torch.autograd.grad(L[16:].sum(), net.mean)[0]
    assert abs(g_jvp - g_fused) > 1e-3 * abs(g_jvp)


@pytest.mark.parametrize("B, frac, n_diag", [(64, 0.75, 48), (10, 0.75, 7), (4, 0.1, 1), (8, 1.0, 8)])
def test_sampling_rule(B, frac, n_diag):
    """First max(1, int(B f)) rows r = t; the others r < t, (t, r) = (max, min) of two uniforms; m = h t + (1 - h) r."""
    cfg = flowmap.Config(diag_fraction=frac)
    g = torch.Generator().manual_seed(3)
    t, r, m, h = flowmap.sample_times(B, cfg, g, "cpu")
    g = torch.Generator().manual_seed(3)
    t_d = torch.rand(n_diag, generator=g, dtype=torch.float64)
    a = torch.rand(B - n_diag, generator=g, dtype=torch.float64)
    b = torch.rand(B - n_diag, generator=g, dtype=torch.float64)
    h_ = torch.rand(B, generator=g, dtype=torch.float64)
    assert torch.equal(t, torch.cat([t_d, torch.maximum(a, b)])) and torch.equal(r, torch.cat([t_d, torch.minimum(a, b)]))
    assert torch.equal(h, h_) and torch.equal(m, h_ * t + (1 - h_) * r)
    _, _, m, h = flowmap.sample_times(B, flowmap.Config(diag_fraction=frac, psd_type="midpoint"), g, "cpu")
    assert (h == 0.5).all()


def test_sampling_distribution():
    """Off-diagonal (t, r) uniform on the triangle: E t = 2/3, E r = 1/3 (5e-3 at n = 2e5)."""
    t, r, _, _ = flowmap.sample_times(200_000, flowmap.Config(diag_fraction=0.0001), torch.Generator().manual_seed(0),
                                      "cpu")
    assert abs(t.mean() - 2 / 3) < 5e-3 and abs(r.mean() - 1 / 3) < 5e-3 and (r <= t).all()


def test_loss_value_recomputed_by_hand():
    """Sum over dimensions, weight 1 on both kinds of rows, diagonal |u(z, t, t) - (eps - x)|^2 on the first rows."""
    net = GaussianOracle(delta=0.2)
    cfg = flowmap.Config(loss_kind="psd", diag_fraction=0.5, psd_type="midpoint")
    x = data(8)
    gen = torch.Generator().manual_seed(5)
    L, _ = flowmap.loss(net, x, None, cfg, 1, gen)
    gen = torch.Generator().manual_seed(5)
    t, r, m, h = flowmap.sample_times(8, cfg, gen, "cpu")
    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    z = (1 - t)[:, None] * x + t[:, None] * eps
    with torch.no_grad():
        diag = (net(z, t, t) - (eps - x)).square().sum(1)
        u_tm = net(z, t, m)
        u_mr = net(z - (t - m)[:, None] * u_tm, m, r)
        off = (net(z, t, r) - 0.5 * u_tm - 0.5 * u_mr).square().sum(1)
    torch.testing.assert_close(L.detach(), torch.cat([diag[:4], off[4:]]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sampler_with_the_exact_oracle_is_the_exact_pushforward(steps):
    """X(eps; 1, 0) = mean + std eps exactly (1e-12), in 1 step and in N."""
    mean, std = 0.7, 0.5
    net = GaussianOracle(mean, std)
    eps = torch.randn(16, D, dtype=torch.float64)
    out = flowmap.sample(net, eps, flowmap.Config(sample_steps=steps))
    torch.testing.assert_close(out, mean + std * eps, rtol=1e-12, atol=1e-12)


def test_config_checks():
    with pytest.raises(ValueError, match="loss_kind"):
        flowmap.Config(loss_kind="msd")
    with pytest.raises(ValueError, match="tangent"):
        flowmap.Config(tangent="jacfwd")
    with pytest.raises(ValueError, match="diag_fraction"):
        flowmap.Config(diag_fraction=0.0)
    assert flowmap.Config().diag_fraction == 0.75 and flowmap.Config().loss_kind == "lsd"


def test_jvp_refuses_a_ddp_wrapper():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = GaussianOracle()

        def forward(self, *a, **k):
            return self.module(*a, **k)
    with pytest.raises(ValueError, match="DDP"):
        flowmap.loss(Wrapped(), data(8), None, flowmap.Config(tangent="jvp"), 1, torch.Generator())


def test_toy_one_step_beats_one_euler_step():
    """150 Adam steps of LSD on a 2-D two-point mixture (mlp width 64): the 1-step flow-map sample is closer to the
    data (mean distance to the nearest mode) than one Euler step of the learned velocity u(z, 1, 1)."""
    import nets
    torch.manual_seed(0)
    net = nets.NETS["mlp"][0](dim=D, use_r=True, width=64, depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    modes = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    cfg = flowmap.Config(loss_kind="lsd", tangent="jvp")
    gen = torch.Generator().manual_seed(0)
    for step in range(150):
        x = modes[torch.randint(0, 2, (256,), generator=gen)] + 0.05 * torch.randn(256, D, generator=gen)
        L, _ = flowmap.loss(net, x, None, cfg, step + 1, gen)
        opt.zero_grad()
        L.mean().backward()
        opt.step()
    net.eval()
    eps = torch.randn(2000, D, generator=gen)
    one = flowmap.sample(net, eps, cfg)
    with torch.no_grad():
        euler = eps - net(eps, torch.ones(2000), torch.ones(2000))

    def dist(p):
        return torch.cdist(p, modes).min(dim=1).values.mean()
    assert dist(one) < 0.6 * dist(euler), (dist(one), dist(euler))


def test_fid_steps_flag():
    import fid
    cfg = fid.sampler_config(flowmap, flowmap.Config(), steps=4)
    assert cfg.sample_steps == 4


def test_train_py_end_to_end_and_exact_resume(tmp_path):
    """The real CLI: logs L_diag + L_off = loss, sample grids; 4 steps straight equal 2 steps and --resume to 4,
    bitwise (weights, EMA, Adam state)."""
    import json
    import os

    import train
    common = ["--method", "flowmap", "--data", "toy", "--batch", "32", "--threads", "1", "--log-every", "2",
              "--num-samples", "50", "--sample-steps", "2", "--loss-kind", "esd"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.cli([*common, "--steps", "4", "--sample-every", "2", "--out", full])
    assert {"ckpt.pt", "config.json", "metrics.jsonl", "samples.png"} <= set(os.listdir(full))
    for rec in (json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))):
        assert abs(rec["L_diag"] + rec["L_off"] - rec["loss"]) < 1e-9 * rec["loss"] and rec["L_off"] > 0
    train.cli([*common, "--steps", "2", "--out", part])
    train.cli([*common, "--steps", "4", "--resume", part])
    a, b = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (full, part))
    assert b["step"] == 4 and a["config"]["loss_kind"] == "esd"
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]) and torch.equal(a["ema"][0][k], b["ema"][0][k]), k


# --- Flow-map distillation: a frozen teacher's velocity in place of the net's own diagonal ---------------------------


@pytest.mark.parametrize("kind, tangent", KINDS + [("psd", "fused")])
def test_distillation_from_the_exact_velocity(kind, tangent):
    """Teacher = the exact Gaussian velocity. The exact student: every row's loss 0 (the diagonal exactly, as its
    target is now v_T(z, t), not eps - x) and zero gradient. The student u + delta: diagonal delta, LSD
    (1 + (t - r) a_r) delta, ESD delta (the teacher's v, not the student's, enters), PSD unchanged h (t - m) c(m, r)
    delta, per dimension; rel. 1e-8 (fd 1e-5)."""
    std, delta, n = 0.5, 0.3, 16
    cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=0.25, fd_step=1e-4)
    teacher = GaussianOracle(std=std).requires_grad_(False)
    exact = GaussianOracle(std=std)
    L, logs, _ = run(exact, data(64), cfg, teacher=teacher)
    assert logs["L_diag"][:n].abs().max() == 0 and L.max() < (1e-7 if tangent == "fd" else 1e-10)
    L.sum().backward()
    assert exact.mean.grad.abs() < 1e-4 and exact.std.grad.abs() < 1e-4
    with torch.no_grad():
        L, _, (t, r, m, h) = run(GaussianOracle(std=std, delta=delta), data(64), cfg, teacher=teacher)
    t, r, m, h = t[n:], r[n:], m[n:], h[n:]
    res = dict(lsd=(1 + (t - r) * a_of(r, std)) * delta, esd=torch.full_like(t, delta),
               psd=h * (t - m) * c_of(m, r, std) * delta)[kind]
    rel = 1e-5 if tangent == "fd" else 1e-8
    torch.testing.assert_close(L[:n], torch.full((n,), D * delta ** 2, dtype=L.dtype), rtol=1e-12, atol=0)
    torch.testing.assert_close(L[n:], D * res ** 2, rtol=rel, atol=1e-12)


@pytest.mark.parametrize("kind", ["lsd", "esd", "psd"])
def test_distillation_teacher_gets_no_gradient_and_the_student_its_own(kind):
    """A teacher with trainable parameters gets no gradient; the student's gradient equals the one computed with the
    teacher's outputs as constants (a frozen copy of the teacher: the same numbers, 1e-12)."""
    cfg = flowmap.Config(loss_kind=kind, tangent="jvp", diag_fraction=0.25)
    grads = []
    for frozen in (False, True):
        teacher = GaussianOracle(mean=0.6, std=0.55).requires_grad_(not frozen)
        student = GaussianOracle(delta=0.2)
        L, _, _ = run(student, data(64), cfg, teacher=teacher)
        grads.append(torch.stack(torch.autograd.grad(L.sum(), [student.mean, student.std])))
        if not frozen:
            L, _, _ = run(student, data(64), cfg, teacher=teacher)
            L.sum().backward()
            assert teacher.mean.grad is None and teacher.std.grad is None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert grads[0].abs().max() > 0


def test_train_py_distils_from_a_meanflow_shortcut_or_diffusion_run(tmp_path, capsys):
    """--teacher: a MeanFlow or shortcut run's EMA is the frozen teacher and, without --init, the student's start
    (lr 0 keeps it there); the logged diagonal loss is then |u - v_T|^2 (0 at the start, student = teacher). A
    diffusion run teaches its flow velocity (diffusion.FlowVelocity) to a student starting from scratch; a CM run is
    refused in one line."""
    import json
    import os

    import train
    common = ["--data", "toy", "--batch", "16", "--threads", "1", "--num-samples", "16"]
    runs = {m: str(tmp_path / m) for m in ("meanflow", "shortcut", "diffusion", "cm")}
    for m, out in runs.items():
        train.cli(["--method", m, *common, "--steps", "2", "--out", out])
    for m in ("meanflow", "shortcut"):
        out = str(tmp_path / f"fm-{m}")
        train.cli(["--method", "flowmap", *common, "--steps", "1", "--lr", "0", "--log-every", "1",
                   "--tangent", "fd", "--teacher", runs[m], "--out", out])
        assert f"initialised from {runs[m]}" in capsys.readouterr().out
        got, teacher = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (out, runs[m]))
        for k, v in teacher["ema"][0].items():
            assert torch.equal(got["net"][k], v), k
        rec = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        assert rec["L_diag"] == 0 and rec["L_off"] > 0
    out = str(tmp_path / "fm-diffusion")
    train.cli(["--method", "flowmap", *common, "--steps", "1", "--teacher", runs["diffusion"], "--out", out])
    assert "the student starts from scratch, not from the teacher" in capsys.readouterr().out
    assert json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["L_diag"] > 0
    from types import SimpleNamespace

    import checkpoints
    cfg = json.load(open(os.path.join(out, "config.json")))
    teacher = checkpoints.load_teacher(runs["diffusion"], flowmap, SimpleNamespace(shape=(2,)), 0, "cpu", cfg)
    assert isinstance(teacher, diffusion.FlowVelocity) and not teacher.training
    with pytest.raises(SystemExit, match="cannot use a cm checkpoint as --teacher"):
        train.cli(["--method", "flowmap", *common, "--steps", "1", "--teacher", runs["cm"],
                   "--out", str(tmp_path / "refused")])



@pytest.mark.parametrize("kind, tangent", KINDS + [("psd", "fused")])
@pytest.mark.parametrize("distil", [False, True])
def test_labels_reach_every_pass_with_their_rows(kind, tangent, distil):
    """--cond: every call of the student and of the teacher gets the one-hot labels of the rows it sees (the diagonal
    rows' or the others'), so the flow map is class-conditional (no label dropout, no guidance)."""
    B, n, K = 16, 4, 3
    y = torch.nn.functional.one_hot(torch.arange(B) % K, K).double()

    class Recording(GaussianOracle):
        def forward(self, z, t, r, y=None, tangents=None):
            seen.append((self, y))
            return super().forward(z, t, r, None, tangents)
    seen = []
    student, teacher = Recording(delta=0.1), Recording() if distil else None
    cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=n / B)
    flowmap.loss(student, data(B), y, cfg, 1, torch.Generator().manual_seed(0), teacher=teacher)
    assert len(seen) >= 2 and all(lab is not None and (torch.equal(lab, y[:n]) or torch.equal(lab, y[n:]))
                                  for _, lab in seen)
    assert any(torch.equal(lab, y[:n]) for _, lab in seen) and any(torch.equal(lab, y[n:]) for _, lab in seen)
    if distil:
        assert {torch.equal(lab, y[:n]) for net, lab in seen if net is teacher} == (
            {True} if kind == "psd" else {True, False})


# --- The learned time weight (learned_weight): exp(-w) L + w per row, w = w(t, r) -------------------------------------


class WeightedOracle(GaussianOracle):
    """The oracle with a log-variance head of the times only, w(t, r) = a + b t + c r, (a, b, c) parameters."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.abc = torch.nn.Parameter(torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64))

    def forward(self, z, t, r, y=None, tangents=None, return_logvar=False):
        out = super().forward(z, t, r, y, tangents)
        return (out, self.abc[0] + self.abc[1] * t + self.abc[2] * r) if return_logvar else out


@pytest.mark.parametrize("kind, tangent", KINDS + [("psd", "fused"), ("psd", "fd")])
def test_learned_weight_is_exp_minus_w_times_the_loss_plus_w(kind, tangent):
    """Row i's loss is exp(-w_i) L_i + w_i, L_i the unweighted loss of the same draws, w_i = w(t_i, r_i) (r = t on the
    diagonal rows), to 1e-12; the gradient in (a, b, c) is sum_i (1 - exp(-w_i) L_i) (1, t_i, r_i) (rel. 1e-10): the
    weight is learned on every row through every tangent, from the student's own call at (t, r)."""
    import dataclasses
    net = WeightedOracle(delta=1.0)
    cfg = flowmap.Config(loss_kind=kind, tangent=tangent, diag_fraction=0.25, learned_weight=True)
    x = data(32)
    Lw, logs, (t, r, _, _) = run(net, x, cfg)
    L, _, _ = run(net, x, dataclasses.replace(cfg, learned_weight=False))
    L = L.detach()
    assert (r[8:] < t[8:]).all() and L[8:].max() > 1e-2  # off-diagonal rows with a loss of their own
    w = 0.3 - 0.7 * t + 1.1 * r
    torch.testing.assert_close(Lw.detach(), torch.exp(-w) * L + w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logs["logvar"], w, rtol=1e-12, atol=1e-12)
    assert torch.equal(logs["L_raw"], L) and torch.equal(logs["L_diag"] + logs["L_off"], Lw.detach())
    Lw.sum().backward()
    expect = ((1 - torch.exp(-w) * L)[:, None] * torch.stack([torch.ones_like(t), t, r], dim=1)).sum(0)
    torch.testing.assert_close(net.abc.grad, expect, rtol=1e-10, atol=1e-12)


def test_learned_weight_presets_and_net_needs():
    """Off by default and in every preset (a deviation for CIFAR-10, which the official config runs with it); a net
    built for a config with the weight has the log-variance head, one without it none; a net that cannot return the
    weight is a one-line error."""
    import nets
    assert not any(flowmap.Config.from_preset(p).learned_weight for p in flowmap.PRESETS)
    assert not flowmap.Config().learned_weight
    assert flowmap.net_needs(flowmap.Config(learned_weight=True)) == dict(use_r=True, logvar=True)
    assert flowmap.net_needs({"learned_weight": False}) == dict(use_r=True, logvar=False)
    assert flowmap.net_needs({}) == dict(use_r=True, logvar=False)  # a run saved before the option
    assert nets.build_net("mlp", (2,), **flowmap.net_needs({"learned_weight": True})).logvar_linear is not None
    with pytest.raises(ValueError, match="learned_weight"):
        flowmap.Config(learned_weight=2)
    with pytest.raises(TypeError, match="^learned_weight=True needs a net that takes return_logvar"):
        flowmap.loss(GaussianOracle(), data(8), None, flowmap.Config(learned_weight=True), 1, torch.Generator())


def test_train_py_learned_weight(tmp_path, capsys):
    """--learned-weight true through the CLI: the head of (t, r) in the checkpoint, logvar and L_raw in the log, the
    run rebuilds as a frozen teacher, and starts a run without the weight (--init: the head dropped)."""
    import json
    import os

    import checkpoints
    import train
    common = ["--method", "flowmap", "--data", "toy", "--batch", "32", "--threads", "1", "--log-every", "2",
              "--num-samples", "20", "--steps", "2", "--tangent", "fused"]
    out = str(tmp_path / "w")
    train.cli([*common, "--learned-weight", "true", "--out", out])
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    head = state["net"]["logvar_linear.weight"]
    assert head.shape == (1, 2 * 64)  # mlp-small's time_channels, for t and for r
    rec = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert "logvar" in rec and rec["L_raw"] > 0
    assert abs(rec["L_diag"] + rec["L_off"] - rec["loss"]) < 1e-9 * abs(rec["loss"])
    teacher = checkpoints.frozen_ema(state, (2,), 0, "cpu", "teacher")
    assert torch.equal(teacher.logvar_linear.weight, state["ema"][0]["logvar_linear.weight"])
    plain = str(tmp_path / "plain")
    train.cli([*common, "--init", out, "--out", plain])
    assert "logvar_linear.weight" not in torch.load(os.path.join(plain, "ckpt.pt"), weights_only=True)["net"]
