"""tcm.py pinned value by value (float64): the log-Student-t times against an independently integrated CDF, the boundary
set, the per-example loss with routing and the interior mean + boundary_weight x boundary mean (as NVIDIA FastGen at
commit 34f30e8 computes them in fastgen/methods/consistency_model/TCM.py: TCMPrecond.forward,
TCMModel.single_train_step), the gradient with the no-grad routed target, the autocast-cache clear, Config defaults and
presets (FastGen's fastgen/configs/experiments/EDM/config_tcm_cifar10.py, EDM2/config_tcm_s.py, config_tcm_xl.py)."""
import math

import pytest
import torch

import tcm
from conftest import param_grads
from test_fidelity_cm import LinF, data, edm_D, weight


def log_student_t_cdf(sigma, cfg):
    """CDF of ln(sigma) = mu + s T_nu truncated to [transition_sigma, sigma_max], by the trapezoid rule on a uniform
    grid of 2^21 points (the implementation uses a cubic grid: a different quadrature)."""
    lo = (math.log(cfg.transition_sigma) - cfg.student_t_mu) / cfg.student_t_scale
    hi = (math.log(cfg.sigma_max) - cfg.student_t_mu) / cfg.student_t_scale
    x = torch.linspace(lo, hi, 2**21 + 1, dtype=torch.float64)
    dens = (1 + x**2 / cfg.student_t_nu) ** (-(cfg.student_t_nu + 1) / 2)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((dens[1:] + dens[:-1]) / 2 * x.diff(), 0)])
    q = (sigma.log() - cfg.student_t_mu) / cfg.student_t_scale
    i = torch.searchsorted(x, q).clamp(1, len(x) - 1)
    frac = (q - x[i - 1]) / (x[i] - x[i - 1])
    return (cdf[i - 1] + frac * (cdf[i] - cdf[i - 1])) / cdf[-1]


def replay_rng(x, cfg, seed):
    """The uniforms of the inverse CDF, the boundary set randperm(B)[:floor(boundary_prob B)] and eps, drawn in the
    order tcm.loss draws them."""
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    u = torch.rand(B, generator=g, dtype=torch.float64)
    k = math.floor(cfg.boundary_prob * B)
    on_boundary = torch.zeros(B, dtype=torch.bool)
    on_boundary[torch.randperm(B, generator=g)[:k]] = True
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return u, on_boundary, eps


def loss_from(student, stage1, x, y, cfg, sigma, on_boundary, eps):
    """FastGen's TCM loss written out: (loss, prescribed loss for gradients, sigma, r)."""
    a = cfg.ratio_limit
    rs = []
    sig = []
    for s in sigma.tolist():
        r = max(s - s * (1 - a) * (1 + 8 / (1 + math.exp(s))), cfg.r_min)
        sig.append(r + 1e-6 if r >= s - 1e-6 else s)
        rs.append(r)
    sigma, r = torch.tensor(sig, dtype=torch.float64), torch.tensor(rs, dtype=torch.float64)
    x_sigma, x_r = x + sigma[:, None] * eps, x + r[:, None] * eps
    with torch.no_grad():
        T = torch.where(r[:, None] >= cfg.transition_sigma, edm_D(student, x_r, r, y), edm_D(stage1, x_r, r, y))
    f = edm_D(student, x_sigma, sigma, y)
    B, n_boundary = len(sig), int(on_boundary.sum())
    c = cfg.huber_c
    per, pres = [], []
    for i in range(B):
        scale = cfg.boundary_weight * B / n_boundary if on_boundary[i] else B / (B - n_boundary)
        w = weight(sig[i], rs[i], cfg.weighting)
        d = (f[i] - T[i]).norm()
        per.append(scale * w * ((d**2 + c**2).sqrt() - c))
        pres.append(scale * w * (((f[i] - T[i].detach()).square().sum() + c**2).sqrt() - c))
    return torch.stack(per), torch.stack(pres), sigma, r


CASES = {
    "cifar": dict(),
    "edm2": dict(ratio_limit=0.9961, huber_c=0.06, weighting="inv_c_out_sq", boundary_weight=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_and_gradient(case):
    """Times: CDF(sigma_i) = u_i (1e-6) off the boundary, transition_sigma + 1e-8 on it; the boundary set is exactly
    randperm(B)[:floor(0.25 B)]; loss_i = B / n_interior * w l_i or boundary_weight B / n_boundary * w l_i, so the batch
    mean is the TCM loss; the target is sg(route(x_r, r)). Tolerance 1e-10."""
    cfg = tcm.Config(**CASES[case])
    student, stage1 = LinF(0).train(), LinF(1).train()
    x, y = data(B=12)
    got, logs = tcm.loss(student, x, y, cfg, 1, torch.Generator().manual_seed(6), teacher=stage1)
    u, on_boundary, eps = replay_rng(x, cfg, 6)
    assert torch.equal(logs["boundary"] > 0, on_boundary) and int(on_boundary.sum()) == 3
    sigma = logs["t"]
    # the safety sigma = r + 1e-6 never fires at a = 0.999 for sigma >= 1; sigma is the sampled value
    torch.testing.assert_close(log_student_t_cdf(sigma[~on_boundary], cfg), u[~on_boundary], rtol=0, atol=1e-6)
    assert (sigma[on_boundary] == cfg.transition_sigma + 1e-8).all()  # the same float64 sum: exact
    want, prescribed, sigma_w, r = loss_from(student, stage1, x, y, cfg, sigma, on_boundary, eps)
    assert (r >= cfg.transition_sigma).any() and (r < cfg.transition_sigma).any()  # both routes are exercised
    torch.testing.assert_close(logs["gap"], sigma_w - r, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(param_grads(student, got), param_grads(student, prescribed)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_autocast_cache_cleared_between_target_and_gradient_passes(monkeypatch):
    """As in cm.py: cleared after the no-grad routed target and before the differentiable pass."""
    events = []
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: events.append("clear"))
    student = LinF(0)
    original = student.forward
    student.forward = lambda *a, **k: (events.append("grad" if torch.is_grad_enabled() else "nograd"),
                                       original(*a, **k))[1]
    tcm.loss(student, *data(B=8), tcm.Config(), 1, torch.Generator().manual_seed(0), teacher=LinF(1))
    assert events == ["nograd", "clear", "grad"]


# --- Config defaults and presets (FastGen's TCM configs) --------------------------------------------------------

def test_config_defaults_are_the_reference_cifar10_values():
    c = tcm.Config()
    assert (c.student_t_nu, c.student_t_mu, c.student_t_scale, c.transition_sigma, c.sigma_max) == (0.01, 0, 0.2, 1, 80)
    assert (c.boundary_prob, c.boundary_weight, c.sigma_data, c.ratio_limit, c.r_min) == (0.25, 0.1, 0.5, 0.999, 0.002)
    assert (c.huber_c, c.weighting, c.boundary, c.sample_sigmas) == (1e-8, "inv_gap", False, (79.5638, 0.0))


EDM2 = dict(cond=True, batch=1024, steps=400_000, optimizer="adam", betas=(0.9, 0.99), lr_ref_steps=8000,
            ema=(0.01, 0.05, 0.10), ema_kind="power", ratio_limit=0.9961, huber_c=0.06, weighting="inv_c_out_sq",
            transition_sigma=1.0, boundary_prob=0.25, boundary_weight=0.1, stage1_weights="online",
            precision="bf16")  # Deviation (preset comment): bf16 autocast instead of fp16 with a loss scaler
PRESETS = {  # FastGen's configs, value by value
    "cifar10": dict(net="ddpmpp", dropout=0.2, cond=False, batch=1024, steps=300_000, optimizer="radam", lr=5e-5,
                    betas=(0.9, 0.999), lr_ref_steps=0, ema=(0.9999, 0.99995, 0.9996), ema_kind="const",
                    precision="fp32", ratio_limit=0.999, huber_c=1e-8, weighting="inv_gap", transition_sigma=1.0,
                    boundary_prob=0.25, boundary_weight=0.1, stage1_weights="online", sample_sigmas=(79.5638, 0.0)),
    "imagenet64": dict(EDM2, net="edm2-s", dropout=0.4, lr=5e-4),
    "imagenet64-xl": dict(EDM2, net="edm2-xl", dropout=0.5, lr=1e-4),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_reference_tables(name):
    import recipe
    _, cfg, _, _ = recipe.resolve_config(["--method", "tcm", "--data", "toy", "--preset", name, "--stage1", "S"])
    for k, v in PRESETS[name].items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"{name}.{k}: {got} != {v}"
    assert cfg["tf32"] == "off"
