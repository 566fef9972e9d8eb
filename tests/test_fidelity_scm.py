"""scm.py pinned value by value (float64): the per-example sCT / sCD loss of a linear "net" recomputed independently
(as NVIDIA FastGen at commit 34f30e8 computes it, fastgen/methods/consistency_model/sCM.py, SCMModel._compute_scm_loss
and _scm_pred_to_loss: prior 1/sigma, extra 1/D, learned log-variance, RMS or Euclidean normalisation, warm-up), the
gradient the stop-gradients prescribe (sg(F) in g, no-grad JVP), teacher CFG and its sign, Config defaults, presets
(FastGen's sCM configs)."""
import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

import scm
from conftest import param_grads, points_and_labels

D, K = 3, 4


class LinF(nn.Module):
    """EDM-style raw net F_raw(x_in, c_noise, y) = A x_in + b c_noise + E y, log-variance a c_noise + a0; the fused
    tangent contract as nets.py (tangent detached)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.E = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))
        self.a0 = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))

    def raw(self, x_in, c, y):
        F = x_in @ self.A.T + c[:, None] * self.b
        return F if y is None else F + y @ self.E

    def forward(self, x_in, c, y=None, return_logvar=False, tangents=None):
        F = self.raw(x_in, c, y)
        if tangents is not None:
            dx, dc, _ = tangents
            with torch.no_grad():
                F = (F, dx @ self.A.T + dc[:, None] * self.b)
        return (F, self.a * c + self.a0) if return_logvar else F


def lognormal(u, P_mean, P_std, lo, hi):
    """Truncated log-normal by inverse CDF with the standard library's normal distribution (FastGen
    fastgen/networks/noise_schedule.py, EDMNoiseSchedule._truncated_lognormal_sample)."""
    N = NormalDist()
    a, b = N.cdf((math.log(lo) - P_mean) / P_std), N.cdf((math.log(hi) - P_mean) / P_std)
    return torch.tensor([math.exp(P_mean + P_std * N.inv_cdf(a + (b - a) * ui)) for ui in u.tolist()],
                        dtype=torch.float64)


def expected(net, x, y, cfg, seed, teacher=None, step=1):
    """SCMModel._compute_scm_loss and _scm_pred_to_loss written out: (loss, prescribed loss for gradients)."""
    sd = cfg.sigma_data
    g = torch.Generator().manual_seed(seed)
    sigma = lognormal(torch.rand(x.shape[0], generator=g, dtype=torch.float64), cfg.P_mean, cfg.P_std, cfg.sigma_min,
                      cfg.sigma_max)
    z = sd * torch.randn(x.shape, generator=g, dtype=x.dtype)
    t = torch.atan(sigma / sd)[:, None]
    cos, sin = t.cos(), t.sin()
    x_t = cos * x + sin * z
    c = sigma.log() / 4  # c_noise(t) = ln(sigma_data tan t) / 4 = ln(sigma) / 4
    with torch.no_grad():
        if teacher is None:
            dxdt = cos * z - sin * x
        else:
            dxdt = -sd * teacher.raw(x_t / sd, c, y)
            if y is not None and cfg.guidance_scale != 1:
                dxdt_null = -sd * teacher.raw(x_t / sd, c, torch.zeros_like(y))
                dxdt = dxdt + (cfg.guidance_scale - 1) * (dxdt - dxdt_null)
        # cos t sin t dF/dt of F = -F_raw(x_t / sd, ln(sd tan t) / 4): d c_noise / dt = 1 / (4 sin t cos t)
        dF = -(cos * sin * dxdt / sd @ net.A.T + net.b / 4)
    F, logvar = net(x_t / sd, c, y, return_logvar=True)
    F = -F
    rho = min(1.0, step / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
    Fs = F.detach()
    gvec = -cos**2 * (sd * Fs - dxdt) - rho * (cos * sin * x_t + sd * dF)
    norm = gvec.norm(dim=1, keepdim=True)
    if cfg.tangent_norm == "rms":
        gvec = gvec / (norm / math.sqrt(D) + cfg.tangent_norm_c)
        L = gvec.square().mean(dim=1)
    else:
        gvec = gvec / (norm + cfg.tangent_norm_c)
        L = gvec.square().sum(dim=1)
    loss = torch.exp(-logvar) * L / (sigma * D) + logvar
    sq = (F - Fs - gvec).square()
    L_p = sq.mean(dim=1) if cfg.tangent_norm == "rms" else sq.sum(dim=1)
    return loss, torch.exp(-logvar) * L_p / (sigma * D) + logvar, dict(t=sigma, g_sq=L)


def data(B=8, labels=False):
    return points_and_labels(B, D, K, scale=0.5, labels=labels)


CASES = {
    "sct": dict(cfg=dict(sigma_max=800.0, tangent_warmup=0)),
    "sct-warmup": dict(cfg=dict(sigma_max=800.0, tangent_warmup=400), step=100),
    "paper-norm": dict(cfg=dict(tangent_norm="paper", tangent_warmup=0, P_std=1.6)),
    "scd-cfg": dict(cfg=dict(sigma_max=80.0, guidance_scale=1.6, tangent_warmup=0), teacher=True, labels=True),
    "scd-uncond": dict(cfg=dict(sigma_max=80.0, tangent_warmup=0), teacher=True),
}


@pytest.mark.parametrize("tangent", ["jvp", "fused", "fd"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_and_gradient(case, tangent):
    """loss_i = e^-logvar_i L_i / (sigma_i D) + logvar_i with L_i = mean_D (or sum_D) of g^2 and g as sCM.py's; the
    gradient is that of e^-logvar ||F - sg(F) - sg(g)||^2 / (sigma D) + logvar. Tolerance 1e-10 (fd: 1e-6, relative
    step 1e-3 on a function whose t-dependence is smooth)."""
    spec = CASES[case]
    cfg = scm.Config(tangent=tangent, **spec["cfg"])
    net = LinF(0).train()
    teacher = LinF(1).eval() if spec.get("teacher") else None
    x, y = data(labels=spec.get("labels", False))
    step = spec.get("step", 1)
    got, logs = scm.loss(net, x, y, cfg, step, torch.Generator().manual_seed(3), teacher=teacher)
    want, prescribed, wlogs = expected(net, x, y, cfg, 3, teacher=teacher, step=step)
    tol = 1e-5 if tangent == "fd" else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(logs["t"], wlogs["t"], rtol=1e-12, atol=0)
    torch.testing.assert_close(logs["g_sq"], wlogs["g_sq"].detach(), rtol=tol, atol=tol)
    for a, b in zip(param_grads(net, got), param_grads(net, prescribed)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_teacher_cfg_sign():
    """sCD CFG on the teacher's dx_t/dt: dxdt + (w - 1)(dxdt - dxdt_null), so w > 1 moves away from the null label's."""
    teacher = LinF(1).eval()
    x, y = data(labels=True)
    t = torch.full((x.shape[0],), 0.7, dtype=torch.float64)
    x_t = x
    dxdt_1 = scm.target_dxdt(x, None, x_t, t, y, scm.Config(), teacher)
    dxdt_null = scm.target_dxdt(x, None, x_t, t, torch.zeros_like(y), scm.Config(), teacher)
    dxdt_2 = scm.target_dxdt(x, None, x_t, t, y, scm.Config(guidance_scale=2.5), teacher)
    torch.testing.assert_close(dxdt_2, dxdt_1 + 1.5 * (dxdt_1 - dxdt_null), rtol=1e-12, atol=1e-12)
    assert (dxdt_1 - dxdt_null).abs().max() > 0.1


# --- Config defaults and presets (FastGen's config_scm.py and its EDM sCM experiment configs) -------------------

def test_config_defaults_are_the_reference_values():
    c = scm.Config()
    assert (c.P_mean, c.P_std, c.sigma_data, c.sigma_min, c.sigma_max) == (-1.0, 1.4, 0.5, 0.002, 800.0)
    assert (c.tangent_warmup, c.tangent_norm, c.tangent_norm_c, c.fd_rel_step, c.guidance_scale) == (
        10000, "rms", 0.1, 1e-3, 1.0)
    assert c.sample_sigmas == (80.0, 0.0)


EMA_DECAYS = (0.9999, 0.99995, 0.9996)
PRESETS = {  # fastgen/configs/experiments/EDM/config_sct_cifar10.py, config_scd_cifar10.py, config_scd_in64.py over
    # fastgen/configs/methods/config_scm.py, value by value
    "cifar10": dict(net="ddpmpp", dropout=0.2, cond=False, batch=512, steps=350_000, optimizer="radam", lr=1e-4,
                    betas=(0.9, 0.99), lr_ref_steps=0, ema=EMA_DECAYS, precision="fp32", P_mean=-1.0, P_std=1.4,
                    sigma_min=0.002, sigma_max=800.0, sample_sigmas=(80.0, 0.0), tangent_warmup=10000,
                    tangent_norm="rms", tangent_norm_c=0.1, grad_clip=0.0),
    "cifar10-scd": dict(net="ddpmpp", dropout=0.0, cond=False, distill=True, batch=512, steps=500_000,
                        optimizer="radam", lr=1e-4, betas=(0.9, 0.99), ema=EMA_DECAYS, precision="fp32", P_mean=-1.0,
                        P_std=1.4, sigma_max=80.0, sample_sigmas=(79.5638, 0.0), tangent_warmup=10000,
                        tangent_norm="rms", tangent_norm_c=0.1),
    "imagenet64-scd": dict(net="adm", dropout=0.0, cond=True, distill=True, batch=1024, steps=600_000,
                           optimizer="adam", lr=7e-5, betas=(0.9, 0.99), adam_eps=1e-11, lr_ref_steps=35_000,
                           grad_clip=10.0, precision="bf16", tangent="jvp", ema=EMA_DECAYS, P_mean=-1.0, P_std=1.6,
                           sigma_max=80.0, sample_sigmas=(79.5638, 0.0), tangent_warmup=10000, tangent_norm="rms"),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_fastgen_configs(name):
    """Every value of the FastGen config as train.py resolves it; TF32 off; the bf16 preset runs the exact fp32
    JVP (tangent "jvp"), the fp32 presets the fused tangent."""
    import recipe
    teacher = ["--teacher", "T"] if "scd" in name else []
    _, cfg, _, _ = recipe.resolve_config(["--method", "scm", "--data", "toy", "--preset", name, *teacher])
    for k, v in PRESETS[name].items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"{name}.{k}: {got} != {v}"
    assert cfg["tf32"] == "off"
    assert cfg["tangent"] == ("jvp" if cfg["precision"] == "bf16" else "fused")


def test_teacher_and_init_whitelists_are_separate():
    """An sCD teacher must give the probability-flow dx_t/dt (a diffusion model); a consistency model does not, but it
    may initialise a student."""
    assert scm.TEACHERS == ("diffusion",) and set(scm.INIT) == {"diffusion", "scm"}
