"""cm.py pinned value by value (float64): the per-example CT / CD loss of a linear "net" recomputed independently
(ECT r(sigma), same eps, pseudo-Huber of the L2 distance, each weighting, as NVIDIA FastGen at commit 34f30e8 computes
them in fastgen/methods/consistency_model/CM.py: t_to_r_sigmoid, ode_solver, CMModel._compute_cm_loss and
_pred_to_loss), the gradient with the no-grad target, the teacher's PF-ODE step with CFG and its sign, the
autocast-cache clear, Config defaults and presets (FastGen's fastgen/configs/experiments/EDM/config_cm_cifar10.py,
EDM2/config_cm_s.py, EDM2/config_cm_xl.py)."""
import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

import cm
from conftest import param_grads, points_and_labels

D, K = 3, 4


class LinF(nn.Module):
    """EDM-style raw net F(x_in, c_noise, y) = A x_in + b c_noise + E y."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.E = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))

    def forward(self, x_in, c, y=None):
        F = x_in @ self.A.T + c[:, None].to(x_in.dtype) * self.b
        return F if y is None else F + y @ self.E


def edm_D(net, x, sigma, y, sd=0.5, shift=0.0):
    """EDM Table 1 (arXiv:2206.00364v2); shift = sigma_min gives the CM boundary form (arXiv:2303.01469v2, App. C)."""
    s = sigma[:, None]
    c_skip = sd**2 / ((s - shift) ** 2 + sd**2)
    c_out = (s - shift) * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4, y)


def lognormal(u, P_mean, P_std, lo, hi):
    N = NormalDist()
    a, b = N.cdf((math.log(lo) - P_mean) / P_std), N.cdf((math.log(hi) - P_mean) / P_std)
    return torch.tensor([math.exp(P_mean + P_std * N.inv_cdf(a + (b - a) * ui)) for ui in u.tolist()],
                        dtype=torch.float64)


def weight(sigma, r, kind, sd=0.5):
    c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
    return dict(inv_gap=1 / (sigma - r), inv_sqrt_gap=(sigma - r) ** -0.5, inv_c_out_sq=c_out**-2, inv_c_out=1 / c_out,
                inv_sigma_sq=sigma**-2, one=1.0)[kind]


def expected(net, x, y, cfg, seed, images, teacher=None):
    """FastGen's CM loss written out, sample by sample: (loss, prescribed loss for gradients, sigma, r)."""
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    sig0 = lognormal(torch.rand(B, generator=g, dtype=torch.float64), cfg.P_mean, cfg.P_std, cfg.sigma_min,
                     cfg.sigma_max)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    a = min(1 - cfg.q ** -(images // (1000 * cfg.kimg_per_stage) + 1), cfg.ratio_limit)
    sig, rs = [], []
    for s in sig0.tolist():
        r = max(s - s * (1 - a) * (1 + 8 / (1 + math.exp(s))), cfg.r_min)
        sig.append(r + 1e-6 if r >= s - 1e-6 else s)
        rs.append(r)
    sigma, r = torch.tensor(sig, dtype=torch.float64), torch.tensor(rs, dtype=torch.float64)
    shift = cfg.sigma_min if cfg.boundary else 0.0
    x_sigma = x + sigma[:, None] * eps
    with torch.no_grad():
        if teacher is None:
            x_r = x + r[:, None] * eps
        else:
            D_t = edm_D(teacher, x_sigma, sigma, y)
            if y is not None and cfg.guidance_scale != 1:
                D_t = D_t + (cfg.guidance_scale - 1) * (D_t - edm_D(teacher, x_sigma, sigma, torch.zeros_like(y)))
            x_r = x_sigma - (sigma - r)[:, None] * (x_sigma - D_t) / sigma[:, None]  # one Euler step (ode_solver)
        T = torch.where(r[:, None] > 0, edm_D(net, x_r, r.clamp_min(1e-12), y, shift=shift), x)  # r = 0: the data
    f = edm_D(net, x_sigma, sigma, y, shift=shift)
    c = cfg.huber_c
    per, pres = [], []
    for i in range(B):
        w = weight(sig[i], rs[i], cfg.weighting)
        d = (f[i] - T[i]).norm()
        per.append(w * ((d**2 + c**2).sqrt() - c))
        pres.append(w * (((f[i] - T[i].detach()).square().sum() + c**2).sqrt() - c))
    return torch.stack(per), torch.stack(pres), sigma, r


def data(B=10, labels=False):
    return points_and_labels(B, D, K, scale=0.5, labels=labels)


CASES = {  # (Config kwargs, images seen, teacher, labels)
    "cifar-stage0": (dict(), 0, False, False),
    "cifar-stage3": (dict(), 3 * 6_400_000 + 5, False, False),
    "in64": (dict(P_mean=-0.8, P_std=1.6, q=4.0, kimg_per_stage=3200.0, ratio_limit=0.9961, huber_c=0.06,
                  weighting="inv_c_out_sq"), 40_000_000, False, False),
    "inv_sqrt_gap": (dict(weighting="inv_sqrt_gap", huber_c=0.03), 7_000_000, False, False),
    "inv_c_out": (dict(weighting="inv_c_out"), 7_000_000, False, False),
    "inv_sigma_sq-boundary": (dict(weighting="inv_sigma_sq", boundary=True), 7_000_000, False, False),
    "one-rmin0": (dict(weighting="one", r_min=0.0), 0, False, False),
    "cd-cfg": (dict(guidance_scale=1.8), 13_000_000, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_and_gradient(case):
    """loss_i = w(sigma_i, r_i) (sqrt(d_i^2 + c^2) - c), d_i = ||f(x_sigma) - sg(f(x_r, r))|| over all dimensions; the
    gradient flows through f(x_sigma) only. Tolerance 1e-10."""
    kw, images, use_teacher, labels = CASES[case]
    cfg = cm.Config(**kw)
    net = LinF(0).train()
    teacher = LinF(1).eval() if use_teacher else None
    x, y = data(labels=labels)
    got, logs = cm.loss(net, x, y, cfg, 1, torch.Generator().manual_seed(4), teacher=teacher, images=images)
    want, prescribed, sigma, r = expected(net, x, y, cfg, 4, images, teacher)
    if cfg.r_min == 0:  # the case reaches ECT's floor r = 0, where the data is the target
        assert (r == 0).any()
    torch.testing.assert_close(logs["t"], sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(logs["gap"], sigma - r, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(param_grads(net, got), param_grads(net, prescribed)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_step_with_cfg_sign(solver):
    """x_r from the guided teacher D_w = D + (w - 1)(D - D_null): Euler x_sigma + (r - sigma) d(x_sigma, sigma), Heun
    averages d at both ends (EDM Alg. 1)."""
    teacher = LinF(1).eval()
    x, y = data(labels=True)
    sigma = torch.linspace(0.5, 20, x.shape[0], dtype=torch.float64)
    r = sigma * 0.7
    cfg = cm.Config(guidance_scale=2.5, teacher_solver=solver)

    def d(x_, s):
        Dc, Dn = edm_D(teacher, x_, s, y), edm_D(teacher, x_, s, torch.zeros_like(y))
        return (x_ - (Dc + 1.5 * (Dc - Dn))) / s[:, None]
    x_sigma = x + sigma[:, None] * torch.randn_like(x)
    d0 = d(x_sigma, sigma)
    want = x_sigma + (r - sigma)[:, None] * d0
    if solver == "heun":
        want = x_sigma + (r - sigma)[:, None] * (d0 + d(want, r)) / 2
    torch.testing.assert_close(cm.teacher_step(teacher, x_sigma, sigma, r, y, cfg), want, rtol=1e-12, atol=1e-12)


def test_autocast_cache_cleared_between_target_and_gradient_passes(monkeypatch):
    """The autocast cache is cleared after the no-grad target pass and before the differentiable pass: a cast cached
    under no_grad has no grad_fn and would cut the gradient."""
    events = []
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: events.append("clear"))
    net = LinF(0)
    original = net.forward
    net.forward = lambda *a, **k: (events.append("grad" if torch.is_grad_enabled() else "nograd"), original(*a, **k))[1]
    cm.loss(net, *data(), cm.Config(), 1, torch.Generator().manual_seed(0), images=0)
    assert events == ["nograd", "clear", "grad"]


# --- Config defaults and presets (FastGen's CM configs) ---------------------------------------------------------

def test_config_defaults_are_the_reference_cifar10_values():
    c = cm.Config()
    assert (c.P_mean, c.P_std, c.sigma_data, c.sigma_min, c.sigma_max) == (-1.1, 2.0, 0.5, 0.002, 80.0)
    assert (c.q, c.kimg_per_stage, c.ratio_limit, c.r_min, c.huber_c, c.weighting) == (
        2.0, 6400.0, 0.999, 0.002, 1e-8, "inv_gap")
    assert (c.boundary, c.teacher_solver, c.guidance_scale, c.sample_sigmas) == (False, "euler", 1.0, (79.5638, 0.0))


EMA_DECAYS = (0.9999, 0.99995, 0.9996)
EDM2 = dict(cond=True, batch=1024, steps=150_000, optimizer="adam", betas=(0.9, 0.99), lr_ref_steps=2000,
            ema=(0.01, 0.05, 0.10), ema_kind="power", P_mean=-0.8, P_std=1.6, q=4.0, kimg_per_stage=3200.0,
            ratio_limit=0.9961, huber_c=0.06, weighting="inv_c_out_sq", precision="fp32", sample_sigmas=(79.5638, 0.0))
PRESETS = {  # FastGen's configs, value by value
    "cifar10": dict(net="ddpmpp", dropout=0.2, cond=False, batch=512, steps=350_000, optimizer="radam", lr=1e-4,
                    betas=(0.9, 0.999), lr_ref_steps=0, ema=EMA_DECAYS, ema_kind="const", precision="fp32",
                    P_mean=-1.1, P_std=2.0, huber_c=1e-8, weighting="inv_gap", q=2.0, kimg_per_stage=6400.0,
                    ratio_limit=0.999, sigma_min=0.002, sigma_max=80.0, r_min=0.002, sample_sigmas=(79.5638, 0.0)),
    "imagenet64": dict(EDM2, net="edm2-s", dropout=0.4, lr=1e-3),
    "imagenet64-xl": dict(EDM2, net="edm2-xl", dropout=0.5, lr=7e-4),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_reference_tables(name):
    import recipe
    _, cfg, _, _ = recipe.resolve_config(["--method", "cm", "--data", "toy", "--preset", name])
    for k, v in PRESETS[name].items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"{name}.{k}: {got} != {v}"
    assert cfg["tf32"] == "off"


def test_teacher_and_init_whitelists_are_separate():
    """A CD teacher must be a denoiser whose PF-ODE the Euler step follows (a diffusion model); consistency models may
    only initialise."""
    assert cm.TEACHERS == ("diffusion",) and set(cm.INIT) == {"diffusion", "cm", "tcm", "scm"}
