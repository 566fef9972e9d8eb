"""shortcut.py against exact oracles (float64): Gaussian data x ~ N(m, s^2 I), whose flow map and velocity are known in
closed form; the stop-gradient of the bootstrap target; the batch layout of targets_shortcut.py; the loss of a linear
net recomputed by hand; the sampler; train.py end to end; the presets against the reference (kvfrans/shortcut-models
at 6010043: train.py model_config, the README's commands)."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import data
import fid
import nets
import recipe
import shortcut
import train
from cli import UsageError
from conftest import ROOT, sliced_wasserstein, train_toy

M_DATA, S = 0.3, 0.5  # data mean and std of the Gaussian oracle


def bc(a, z):
    return a.reshape(-1, *[1] * (z.ndim - 1))


def sigma(t):
    """Std of z_t = (1 - t) x + t eps for x ~ N(m, S^2)."""
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def flow_map(z, t, r):
    """The exact PF-ODE map from t to r: z_r = (1 - r) m + sigma(r) / sigma(t) (z - (1 - t) m)."""
    return bc(1 - r, z) * M_DATA + bc(sigma(r) / sigma(t), z) * (z - bc(1 - t, z) * M_DATA)


def gauss_v(z, t):
    """The exact velocity dz/dt: -m + sigma'(t) / sigma(t) (z - (1 - t) m), sigma sigma' = t - (1 - t) S^2."""
    return -M_DATA + bc((t - (1 - t) * S**2) / sigma(t) ** 2, z) * (z - bc(1 - t, z) * M_DATA)


def gauss_u(z, t, r):
    """The exact average velocity (z_t - z_r) / (t - r), and v at r = t."""
    gap = t - r
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    return torch.where(bc(gap > 0, z), (z - flow_map(z, t, r)) / bc(safe, z), gauss_v(z, t))


def slope(t, r):
    """d u(z, t, r) / dz = (1 - sigma(r) / sigma(t)) / (t - r) (a scalar times I), r < t."""
    return (1 - sigma(r) / sigma(t)) / (t - r)


class Oracle(nn.Module):
    """u(z, t, r) = u_fn(z, t, r) + theta (t - r) z, theta a parameter (0: the oracle itself); records its modes."""

    def __init__(self, u_fn=gauss_u, theta=0.0):
        super().__init__()
        self.u_fn = u_fn
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.modes = []

    def forward(self, z, t, r, y=None):
        self.modes.append(self.training)
        return self.u_fn(z, t, r) + self.theta * bc(t - r, z) * z


def gaussian_batch(B, D, seed=0):
    return M_DATA + S * torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def cfg_(**kw):
    return shortcut.Config(**{"bootstrap_clip": 1e3, **kw})  # clipping off unless a test asks for it


def draws(B, cfg, seed):
    """(t, d) of the loss with generator seed `seed`: the loss draws them first."""
    return shortcut.sample_t_d(B, cfg, torch.Generator().manual_seed(seed), "cpu")


# --- Exact identities on Gaussian data ------------------------------------------------------------------------------


def test_exact_oracle_flow_loss_is_the_irreducible_variance_and_consistency_loss_vanishes():
    """With the exact u as net: (a) each flow row's loss is a draw of |v - (eps - x)|^2 / D, whose mean given z_t is
    Var(eps - x | z_t) = S^2 / sigma(t)^2 per dimension; over 6144 flow rows the mean ratio is 1 within 0.03 (its
    standard error is sqrt(2 / (D n)) = 0.0064). (b) Self-consistency rows with d >= 4/M: the exact map composes, so
    their loss is 0 to rounding (< 1e-26) and so is its gradient. (c) Rows with d = 2/M query v at both half steps
    (the base case): their loss is the Heun-vs-exact gap, recomputed here to 1e-9 and positive."""
    B, D = 8192, 8
    cfg = cfg_()
    x = gaussian_batch(B, D)
    net = Oracle()
    L, logs = shortcut.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(1))
    t, d = draws(B, cfg, 1)
    n_boot = B // 4
    flow = slice(n_boot, B)
    assert (d[flow] == 0).all() and (d[:n_boot] > 0).all()
    ratio = L[flow].sum() / (S**2 / sigma(t[flow]) ** 2).sum()
    assert abs(ratio.item() - 1) < 0.03, ratio
    torch.testing.assert_close(logs["L_flow"] + logs["L_boot"], L.detach(), rtol=0, atol=0)

    exact = d[:n_boot] >= 4 / 128
    assert exact.sum() > 1500 and L[:n_boot][exact].max() < 1e-26
    grad, = torch.autograd.grad(L[:n_boot][exact].sum(), net.theta)
    assert abs(grad.item()) < 1e-12

    base = ~exact  # d = 2/M: u_tgt = (v(z, t) + v(z - h v, t - h)) / 2 with h = 1/M
    eps = torch.randn(x.shape, generator=_after_t_d(B, cfg, 1), dtype=torch.float64)
    z = bc(1 - t, x) * x + bc(t, x) * eps
    zb, tb = z[:n_boot][base], t[:n_boot][base]
    h = torch.full_like(tb, 1 / 128)
    v1 = gauss_v(zb, tb)
    v2 = gauss_v(zb - bc(h, zb) * v1, tb - h)
    expected = (gauss_u(zb, tb, tb - 2 * h) - (v1 + v2) / 2).square().mean(dim=1)
    torch.testing.assert_close(L[:n_boot][base].detach(), expected, rtol=1e-9, atol=0)
    assert expected.min() > 0


@pytest.mark.parametrize("labelled", [False, True])
def test_batch_target_is_the_batch_posterior_velocity_on_flow_rows(labelled):
    """batch_target with the exact u as net: each flow row's target is (z - D) / t, D the batch's E[x | z] (written out
    one sample at a time; with labels, over the samples of z's label), so its loss is |v(z, t) - (z - D) / t|^2 / D;
    the self-consistency rows are unchanged (their targets come from the net alone). On 4096 points the flow rows'
    loss falls to under a tenth of the irreducible variance that eps - x leaves."""
    from conftest import posterior_mean_by_definition
    B, D = 128, 2
    x = gaussian_batch(B, D)
    y = torch.eye(3, dtype=torch.float64)[torch.arange(B) % 3] if labelled else None
    L = {on: shortcut.loss(Oracle(), x, y, cfg_(batch_target=on), 1, torch.Generator().manual_seed(1))[0]
         for on in (False, True)}
    t, d = draws(B, cfg_(), 1)
    eps = torch.randn(x.shape, generator=_after_t_d(B, cfg_(), 1), dtype=torch.float64)
    z = bc(1 - t, x) * x + bc(t, x) * eps
    flow = d == 0
    v_batch = (z - posterior_mean_by_definition(x, z, 1 - t, t, y)) / bc(t, x)
    expected = (gauss_v(z, t) - v_batch)[flow].square().mean(dim=1)
    torch.testing.assert_close(L[True][flow].detach(), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(L[True][~flow], L[False][~flow], rtol=0, atol=0)
    if not labelled:
        B = 4096
        x = gaussian_batch(B, D)
        t, d = draws(B, cfg_(), 1)
        L = shortcut.loss(Oracle(), x, None, cfg_(batch_target=True), 1, torch.Generator().manual_seed(1))[0]
        assert L[d == 0].sum() < 0.1 * (S**2 / sigma(t[d == 0]) ** 2).sum()


def _after_t_d(B, cfg, seed):
    """A generator in the state the loss leaves it in after drawing (t, d): the next draw is eps."""
    gen = torch.Generator().manual_seed(seed)
    shortcut.sample_t_d(B, cfg, gen, "cpu")
    return gen


def test_perturbed_oracle_gives_the_predicted_consistency_loss():
    """u + delta (for r < t; v unchanged) on rows with d >= 4/M: prediction - target = A(t - h, t - 2h) h delta / 2
    with h = d / 2 and A the exact map's slope in z (derived: the shifted first half step moves z' by -h delta, which
    the second half step sees through A). Flow rows keep their loss exactly."""
    B, D, delta = 2048, 3, 0.2
    cfg = cfg_()
    x = gaussian_batch(B, D, seed=3)

    def shifted(z, t, r):
        return gauss_u(z, t, r) + delta * bc((t > r).double(), z)
    L, _ = shortcut.loss(Oracle(shifted), x, None, cfg, 1, torch.Generator().manual_seed(4))
    L0, _ = shortcut.loss(Oracle(), x, None, cfg, 1, torch.Generator().manual_seed(4))
    t, d = draws(B, cfg, 4)
    rows = (d >= 4 / 128).nonzero().squeeze(1)
    h = d[rows] / 2
    predicted = (slope(t[rows] - h, t[rows] - 2 * h) * h * delta / 2) ** 2
    torch.testing.assert_close(L[rows].detach(), predicted, rtol=1e-9, atol=1e-30)
    assert predicted.mean() > 1e-4
    torch.testing.assert_close(L[B // 4:], L0[B // 4:], rtol=0, atol=0)


# --- The stop-gradient -----------------------------------------------------------------------------------------------


def test_bootstrap_target_carries_no_gradient():
    """With theta != 0 the half steps depend on theta too. The gradient of the self-consistency rows' loss must be
    2/D sum (u - u_tgt) du/dtheta with u_tgt held fixed (recomputed here); a target with a graph adds the terms of
    both half steps and changes it by far more than 1e-10."""
    B, D = 512, 2
    cfg = cfg_()
    x = gaussian_batch(B, D, seed=5)
    net = Oracle(theta=0.3)
    L, _ = shortcut.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(6))
    n_boot = B // 4
    grad, = torch.autograd.grad(L[:n_boot].sum(), net.theta)

    t, d = draws(B, cfg, 6)
    eps = torch.randn(x.shape, generator=_after_t_d(B, cfg, 6), dtype=torch.float64)
    z = (bc(1 - t, x) * x + bc(t, x) * eps)[:n_boot]
    t, d = t[:n_boot], d[:n_boot]
    u_tgt = shortcut.bootstrap_target(net, z, t, d, None, cfg)
    assert not u_tgt.requires_grad
    with torch.no_grad():
        u = net(z, t, t - d)
    expected = (2 / D * (u - u_tgt) * bc(d, z) * z).sum()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert net.modes[:2] == [False, False] and net.training  # bootstrap passes in eval mode, then train mode again


# --- The batch layout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, every, counts", [
    (256, 4, {1 / 64: 9, 1 / 32: 9, 1 / 16: 9, 1 / 8: 9, 1 / 4: 9, 1 / 2: 9, 1.0: 10, 0.0: 192}),
    (256, 8, {1 / 64: 4, 1 / 32: 4, 1 / 16: 4, 1 / 8: 4, 1 / 4: 4, 1 / 2: 4, 1.0: 8, 0.0: 224}),
    (16, 4, {1.0: 4, 0.0: 12}),  # fewer self-consistency rows than levels: all of them d = 1 (n // 7 = 0)
])
def test_batch_split_and_step_sizes(B, every, counts):
    """targets_shortcut.py: B // bootstrap_every rows first, B // bootstrap_every // log2 M per level, smallest d first,
    the remainder d = 1; then d = 0."""
    t, d = shortcut.sample_t_d(B, shortcut.Config(bootstrap_every=every), torch.Generator().manual_seed(0), "cpu")
    got = {v: int((d == v).sum()) for v in d.unique().tolist()}
    assert got == counts
    n_boot = B - counts[0.0]
    assert (d[:n_boot].diff() >= 0).all() and (d[n_boot:] == 0).all()


@pytest.mark.parametrize("B, every, counts", [
    # n = 64 self-consistency rows: (64 // 2) // 7 = 4 for d = 1/64 .. 1/4, 64 // 4 = 16 for d = 1/2, the rest d = 1
    (256, 4, {1 / 64: 4, 1 / 32: 4, 1 / 16: 4, 1 / 8: 4, 1 / 4: 4, 1 / 2: 16, 1.0: 28, 0.0: 192}),
    (512, 2, {1 / 64: 18, 1 / 32: 18, 1 / 16: 18, 1 / 8: 18, 1 / 4: 18, 1 / 2: 64, 1.0: 102, 0.0: 256}),
])
def test_batch_split_with_bootstrap_dt_bias(B, every, counts):
    """targets_shortcut.py with bootstrap_dt_bias: (n // 2) // log2 M rows for each of the log2 M - 2 smallest steps
    (smallest first), then n // 4 with d = 1/2, the remainder d = 1."""
    cfg = shortcut.Config(bootstrap_every=every, bootstrap_dt_bias=True)
    t, d = shortcut.sample_t_d(B, cfg, torch.Generator().manual_seed(0), "cpu")
    assert {v: int((d == v).sum()) for v in d.unique().tolist()} == counts
    n_boot = B - counts[0.0]
    assert (d[:n_boot].diff() >= 0).all() and (d[n_boot:] == 0).all()
    j = t[:n_boot] / d[:n_boot]  # t on the grid of each row's step
    assert (j == j.round()).all() and (j >= 1).all() and (t <= 1).all()


def test_times_lie_on_the_grid_of_their_step():
    """Self-consistency rows: t uniform on {d, 2d, ..., 1} (t' = 0 .. 1 - d in the paper's time); flow rows: t uniform
    on {1/M, ..., 1}. Every grid value appears and no count is further than 5 standard errors from uniform."""
    cfg = shortcut.Config(bootstrap_every=2)
    t, d = shortcut.sample_t_d(2**17, cfg, torch.Generator().manual_seed(0), "cpu")
    for step in [1 / 64, 1 / 32, 1 / 4, 1.0, 0.0]:
        rows = d == step
        grid = 1 / 128 if step == 0 else step
        j = t[rows] / grid
        assert (j == j.round()).all() and j.min() >= 1 and j.max() <= 1 / grid
        counts = torch.bincount(j.long() - 1, minlength=round(1 / grid)).double()
        assert len(counts) == round(1 / grid) and (counts > 0).all()
        mean = rows.sum() / len(counts)
        assert ((counts - mean).abs() <= 5 * mean.sqrt() + 1).all(), step


def test_query_r_base_case():
    """r = t - d, except d <= 1/M, which asks for the velocity (r = t)."""
    cfg = shortcut.Config(denoise_timesteps=16)
    t = torch.tensor([1.0, 0.5, 0.5, 0.25, 1.0], dtype=torch.float64)
    d = torch.tensor([1.0, 0.125, 1 / 16, 1 / 32, 0.0], dtype=torch.float64)
    assert shortcut.query_r(t, d, cfg).tolist() == [0.0, 0.375, 0.5, 0.25, 1.0]


# --- The loss value, recomputed by hand -----------------------------------------------------------------------------


class LinU(nn.Module):
    """u(z, t, r, y) = A z + b t + c r + E y, float64; records its modes."""

    def __init__(self, D, K, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.E = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))
        self.modes = []

    def forward(self, z, t, r, y=None):
        self.modes.append(self.training)
        return z @ self.A.T + t[:, None] * self.b + r[:, None] * self.c + y @ self.E


def test_loss_value_recomputed_by_hand():
    """Per-example loss of a linear net with labels, label dropout 0.5, guidance 2.5 on the smallest shortcut's targets
    and clipping at 1.5 (active on some rows), written out row by row from the paper's equations and
    targets_shortcut.py; 1e-12."""
    B, D, K, M = 64, 3, 4, 8
    cfg = shortcut.Config(denoise_timesteps=M, bootstrap_every=2, label_dropout=0.5, cfg_scale=2.5, bootstrap_clip=1.5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(K, (B,), generator=g), K).double()
    net = LinU(D, K).train()
    L, _ = shortcut.loss(net, x, y, cfg, 1, torch.Generator().manual_seed(8))
    assert net.training and set(net.modes[:-1]) == {False} and net.modes[-1] is True

    gen = torch.Generator().manual_seed(8)
    t, d = shortcut.sample_t_d(B, cfg, gen, "cpu")
    eps = torch.randn(B, D, generator=gen, dtype=torch.float64)
    dropped = torch.rand(B, generator=gen) < 0.5
    A, b, c, E = (p.detach() for p in (net.A, net.b, net.c, net.E))

    def u(z, t_, r_, label):
        return A @ z + b * t_ + c * r_ + E.T @ label

    expected, clipped = [], 0
    for i in range(B):
        z = (1 - t[i]) * x[i] + t[i] * eps[i]
        if d[i] > 0:  # self-consistency row: two half steps of h = d / 2
            h = d[i] / 2
            base = h <= 1 / M  # both half steps ask for the velocity, guided with w = 2.5
            w = 2.5 if base else 1.0
            r1, r2 = (t[i], t[i] - h) if base else (t[i] - h, t[i] - 2 * h)
            null = 0 * y[i]
            u1 = u(z, t[i], r1, null) + w * (u(z, t[i], r1, y[i]) - u(z, t[i], r1, null))
            z_mid = (z - h * u1).clamp(-1.5, 1.5)
            u2 = u(z_mid, t[i] - h, r2, null) + w * (u(z_mid, t[i] - h, r2, y[i]) - u(z_mid, t[i] - h, r2, null))
            target = ((u1 + u2) / 2).clamp(-1.5, 1.5)
            clipped += int((target.abs() == 1.5).any() or (z_mid.abs() == 1.5).any())
            pred = u(z, t[i], t[i] - d[i], y[i])  # labels kept on self-consistency rows
        else:
            target = eps[i] - x[i]
            pred = u(z, t[i], t[i], 0 * y[i] if dropped[i] else y[i])
        expected.append(((pred - target) ** 2).mean())
    torch.testing.assert_close(L.detach(), torch.stack(expected), rtol=1e-12, atol=1e-14)
    assert clipped > 0 and dropped[B // 2:].any() and (~dropped[B // 2:]).any()
    assert (d[:B // 2] == 2 / M).sum() > 0  # guided rows exist


def test_autocast_cache_cleared_between_bootstrap_and_gradient_passes(monkeypatch):
    """Casts cached by autocast under no_grad have no grad_fn: the cache is cleared after the no-grad bootstrap passes
    and before the differentiable pass (as meanflow.py after its guidance passes)."""
    events = []
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: events.append("clear"))
    net = LinU(2, 3).train()
    original = net.forward
    net.forward = lambda *a, **k: (events.append("grad" if torch.is_grad_enabled() else "nograd"), original(*a, **k))[1]
    x = torch.randn(16, 2, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(16) % 3, 3).double()
    shortcut.loss(net, x, y, shortcut.Config(), 1, torch.Generator().manual_seed(0))
    assert events == ["nograd", "nograd", "clear", "grad"]


# --- Sampler ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 64])
def test_sampler_with_the_exact_oracle_is_the_exact_pushforward(steps):
    """N < M steps of the exact average velocity are exact jumps: z_0 = m + S eps for every sample (1e-12), hence
    sample mean m and std S; a net that ignored r (u = v) would land on the mean m in one step."""
    eps = torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = shortcut.sample(Oracle(), eps, shortcut.Config(), steps=steps)
    torch.testing.assert_close(out, M_DATA + S * eps, rtol=1e-12, atol=1e-12)
    assert abs(out.mean() - M_DATA) < 0.03 and abs(out.std() - S) < 0.03


def test_sampler_at_M_steps_and_more_is_flow_euler():
    """N >= M: every query is at r = t (the base case), so N Euler steps of the exact velocity: near the exact
    pushforward of the same noise (mean within 1e-3, std within 2%) but not on it, with a first-order error (256 steps
    halve the 128-step error of the std: measured -1.15% and -0.58%)."""
    eps = torch.randn(1024, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = M_DATA + S * eps
    errors = []
    for steps in (128, 256):
        out = shortcut.sample(Oracle(), eps, shortcut.Config(), steps=steps)
        assert abs(out.mean() - exact.mean()) < 1e-3 and (out - exact).abs().max() > 1e-3
        errors.append((out.std() / exact.std() - 1).item())
    assert -0.02 < errors[0] < -0.005 and 0.45 < errors[1] / errors[0] < 0.55, errors
    with pytest.raises(ValueError, match="power of two"):
        shortcut.sample(Oracle(), eps, shortcut.Config(), steps=3)


def test_sampler_guidance():
    """u = 1 for the null label, 3 for a label: guided u = 1 + 2 w, one step from 0 lands on -(1 + 2 w)."""
    class LabelNet(nn.Module):
        def forward(self, z, t, r, y=None):
            return torch.ones_like(z) + 2 * bc(y.sum(dim=1), z)
    y = torch.eye(3, dtype=torch.float64)
    for w in (1.0, 2.0):
        cfg = shortcut.Config(sample_cfg_scale=w)
        out = shortcut.sample(LabelNet(), torch.zeros(3, 2, dtype=torch.float64), cfg, y)
        torch.testing.assert_close(out, torch.full((3, 2), -(1 + 2 * w), dtype=torch.float64))


# --- Config, presets, copies ---------------------------------------------------------------------------------------


def test_config_defaults_and_checks():
    c = shortcut.Config()
    assert (c.denoise_timesteps, c.bootstrap_every, c.bootstrap_clip) == (128, 4, 4.0)
    assert c.bootstrap_dt_bias is False  # train.py's bootstrap_dt_bias 0: equal counts
    assert (c.label_dropout, c.cfg_scale) == (0, 1)
    assert (c.sample_steps, c.sample_cfg_scale) == (1, 1)
    for field in ("denoise_timesteps", "sample_steps"):
        with pytest.raises(ValueError, match=f"^{field} must be a power of two, got 24"):
            shortcut.Config(**{field: 24})


OFFICIAL_RECIPE = dict(optimizer="adamw", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, ema=(0.999,),
                       precision="bf16", lr_warmup=0, denoise_timesteps=128, bootstrap_every=4, bootstrap_clip=4.0)
IMAGENET256 = dict(OFFICIAL_RECIPE, cond=True, xflip=False, batch=256, steps=810_000, label_dropout=0.1, cfg_scale=1.5)
PRESETS = {  # train.py model_config and the README's commands of kvfrans/shortcut-models, value by value
    "cifar10": dict(OFFICIAL_RECIPE, net="dit-b2", cond=False, xflip=True, batch=64, steps=410_000, label_dropout=0.0,
                    cfg_scale=1.0),
    "imagenet256": dict(IMAGENET256, net="dit-b2"),
    "imagenet256-xl": dict(IMAGENET256, net="dit-xl2"),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_reference(name):
    _, cfg, _, _ = recipe.resolve_config(["--method", "shortcut", "--data", "toy", "--preset", name])
    for k, v in PRESETS[name].items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"{name}.{k}: {got} != {v}"


def test_copied_helpers_stay_identical():
    import diffusion
    assert inspect.getsource(shortcut.bcast) == inspect.getsource(diffusion.bcast)
    assert "# Copied from diffusion.py: bcast\ndef bcast(" in inspect.getsource(shortcut)
    import cm
    assert inspect.getsource(shortcut.batch_denoise) == inspect.getsource(cm.batch_denoise)
    assert "# Copied from cm.py: batch_denoise\ndef batch_denoise(" in inspect.getsource(shortcut)


def test_fid_steps_flag():
    cfg = shortcut.Config()
    assert fid.sampler_config(shortcut, cfg, steps=4).sample_steps == 4
    with pytest.raises(UsageError, match="power of two"):
        fid.sampler_config(shortcut, cfg, steps=3)
    with pytest.raises(UsageError, match="shortcut takes --steps only"):
        fid.sampler_config(shortcut, cfg, ts=(1.0, 0.0))


# --- 2-D quality and train.py ----------------------------------------------------------------------------------------


def test_toy_one_step_beats_flow_euler():
    """400 CPU steps on the 8-Gaussian ring (conftest.train_toy: batch 256, its EMA): the 1-step shortcut sample must be
    much closer to the data than one Euler step of the same net's velocity (r = t). Sliced 2-Wasserstein to 4096
    held-out points; measured: shortcut 1 step 0.081, Euler 1 step 0.67, data vs data 0.03."""
    torch.manual_seed(0)
    net = nets.build_net("mlp", (2,), use_r=True, width=128, depth=3)
    ema = train_toy(shortcut, shortcut.Config(), net, 400, 2e-3)
    held_out = data.toy_points(4096, seed=123)
    eps = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    one = sliced_wasserstein(shortcut.sample(ema, eps, shortcut.Config()), held_out)
    with torch.no_grad():
        t = torch.ones(4096)
        euler = sliced_wasserstein(eps - ema(eps, t, t), held_out)
    print(f"SW2: shortcut 1-step {one:.3f}, euler 1-step {euler:.3f}")
    assert one < 0.15 and one < 0.3 * euler


def test_train_py_end_to_end_and_exact_resume(tmp_path):
    """A few steps of the real CLI: every file, the method's logs (L_flow + L_boot = loss), sample grids; 6 steps
    straight equal 3 steps and --resume to 6, bitwise (weights, EMA, AdamW state)."""
    common = ["--method", "shortcut", "--data", "toy", "--batch", "32", "--threads", "1", "--log-every", "3",
              "--num-samples", "50", "--optimizer", "adamw", "--weight-decay", "0.1", "--sample-steps", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.cli([*common, "--steps", "6", "--sample-every", "3", "--out", full])
    assert {"ckpt.pt", "config.json", "metrics.jsonl", "samples.npy", "samples.png", "samples-0000003.png"} <= \
        set(os.listdir(full))
    records = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert abs(r["L_flow"] + r["L_boot"] - r["loss"]) < 1e-9 * r["loss"] and r["L_boot"] > 0
    train.cli([*common, "--steps", "3", "--out", part])
    train.cli([*common, "--steps", "6", "--resume", part])
    a, b = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (full, part))
    assert b["step"] == 6 and a["config"]["sample_steps"] == 2
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]) and torch.equal(a["ema"][0][k], b["ema"][0][k]), k
    assert torch.equal(a["opt"]["state"][0]["exp_avg_sq"], b["opt"]["state"][0]["exp_avg_sq"])


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the bootstrap passes run on the bare module beside the DDP forward; both
    ranks end bitwise identical and equal, to float rounding, the 1-process run with 2 accumulation rounds. M = 4 and
    bootstrap_every 2 give each micro-batch of 8 two rows of each step 1/2 and 1."""
    common = ["--method", "shortcut", "--data", "toy", "--steps", "6", "--batch", "16", "--batch-gpu", "8",
              "--dropout", "0.1", "--denoise-timesteps", "4", "--bootstrap-every", "2", "--log-every", "3",
              "--num-samples", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *common, "--out", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights identical on all 2 ranks" in p.stdout and "2 ranks x 1 rounds x 8" in p.stdout
    train.cli([*common, "--out", str(tmp_path / "single")])
    a, b = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("ddp", "single"))
    for k in a["net"]:
        torch.testing.assert_close(a["net"][k], b["net"][k], rtol=1e-5, atol=1e-6)
    assert sum((a["net"][k] - b["ema"][0][k]).abs().sum() for k in a["net"]) > 0


def test_help_shows_the_preset(capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "shortcut", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "shortcut.Config (preset toy)" in text and "--bootstrap-every BOOTSTRAP_EVERY >= 1 [preset toy: 2]" in text


def test_guidance_pass_runs_even_on_no_rows():
    """With labels and no row to guide (every scale 1) the null-label pass still runs, on zero rows: under FSDP a
    net's forward is collective, and a rank that skipped it would hang the others. The output is u_c unchanged."""
    net = nets.build_net("mlp", (2,), label_dim=3, use_r=True).double()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    z, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).double()
    cfg = shortcut.Config()
    u = shortcut.shortcut(net, z, t, t * 0 + 0.25, y, cfg, scale=torch.ones(4, dtype=torch.float64))
    assert calls == [4, 0]
    assert torch.equal(u, net(z, t, shortcut.query_r(t, t * 0 + 0.25, cfg), y))
