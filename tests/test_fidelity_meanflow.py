"""meanflow.py pinned value by value (float64): the per-example loss of a linear "net" recomputed independently, the
gradient the stop-gradients prescribe, training-time CFG and teacher guidance through the whole loss, the bf16
teacher + jvp path, the autocast-cache clear, Config defaults and presets against NVIDIA FastGen at commit 34f30e8
(fastgen/methods/consistency_model/mean_flow.py and the MeanFlow configs)."""
import math

import pytest
import torch
from torch import nn

import meanflow
from conftest import param_grads, points_and_labels

D, K = 3, 4  # dimensions, classes


class LinU(nn.Module):
    """u(z, t, r, y) = A z + b t + c r + E y, with the fused-tangent contract (the tangent comes back detached)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.E = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, z, t, r, y=None, tangents=None):
        self.calls.append(self.training)
        A, b, c, E = (p.to(z.dtype) for p in (self.A, self.b, self.c, self.E))
        u = z @ A.T + t[:, None].to(z.dtype) * b + r[:, None].to(z.dtype) * c
        if y is not None:
            u = u + y.to(z.dtype) @ E
        if tangents is None:
            return u
        dz, dt, dr = tangents
        with torch.no_grad():
            du = dz.to(z.dtype) @ A.T + dt[:, None].to(z.dtype) * b + dr[:, None].to(z.dtype) * c
        return u, du


def expected(net, x, y, cfg, seed, teacher=None, step=1):
    """The loss of FastGen's MeanFlowModel (mean_flow.py: single_train_step, _get_velocity, _mix_condition,
    _mf_pred_to_loss) written out; returns (loss, prescribed loss for gradients, logs)."""
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    n_t = torch.randn(B, generator=g, dtype=torch.float64)
    n_r = torch.randn(B, generator=g, dtype=torch.float64)
    n_eq = int((torch.rand(B, generator=g) < 1 - cfg.ratio_r_neq_t).sum())
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    t1 = cfg.t_max / (1 + torch.exp(-(cfg.P_mean_t + cfg.P_std_t * n_t)))
    r1 = cfg.t_max / (1 + torch.exp(-(cfg.P_mean_r + cfg.P_std_r * n_r)))
    t, r = torch.maximum(t1, r1), torch.minimum(t1, r1)
    r = torch.cat([t[:n_eq], r[n_eq:]])
    z = (1 - t)[:, None] * x + t[:, None] * eps
    v = eps - x
    y_mixed, n_drop = y, 0
    if y is not None and cfg.label_dropout > 0:
        n_drop = int((torch.rand(B, generator=g) < cfg.label_dropout).sum())
        y_mixed = torch.cat([torch.zeros_like(y[:n_drop]), y[n_drop:]])
    inside = ((t >= cfg.cfg_t_min) & (t <= cfg.cfg_t_max)).double()[:, None]
    with torch.no_grad():
        if teacher is not None and y is None:
            v_tgt = teacher(z, t, t)
        elif teacher is not None:
            w = 1 + (cfg.guidance_scale - 1) * inside
            v_null, v_c = teacher(z, t, t, torch.zeros_like(y)), teacher(z, t, t, y_mixed)
            v_tgt = v_null + w * (v_c - v_null)
        elif y is not None and (cfg.cfg_omega != 1 or cfg.cfg_kappa != 0):
            om, ka = 1 + (cfg.cfg_omega - 1) * inside, cfg.cfg_kappa * inside
            v_null, v_c = net(z, t, t, torch.zeros_like(y)), net(z, t, t, y)
            v_tgt = om * v + (1 - om - ka) * v_null + ka * v_c
            v_tgt = torch.cat([v[:n_drop], v_tgt[n_drop:]])
        else:
            v_tgt = v
        dudt = v_tgt @ net.A.T + net.b  # d/dt u(z + s v~, t + s, r) for the linear net
    rho = min(1.0, step / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
    u = net(z, t, r, y_mixed)
    u_tgt = v_tgt - rho * (t - r)[:, None] * dudt
    L = (u - u_tgt).square().sum(dim=1)
    w = (L.detach() + cfg.norm_c) ** -cfg.norm_p
    prescribed = w * (u - u_tgt.detach()).square().sum(dim=1)
    return w * L, prescribed, dict(t=t, L=L, mse_v=(u - v).square().mean(dim=1), y_mixed=y_mixed)


def data(B=12, seed=0, labels=True):
    return points_and_labels(B, D, K, seed=100 + seed, labels=labels)


CASES = {
    "cifar": dict(cfg=dict(), labels=False),
    "dit": dict(cfg=dict(P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio_r_neq_t=0.25, norm_p=1.0,
                         norm_c=1.0), labels=False),
    "cfg": dict(cfg=dict(cfg_omega=0.6, cfg_kappa=0.3, cfg_t_min=0.1, cfg_t_max=0.7, label_dropout=0.3), labels=True),
    "warmup": dict(cfg=dict(tangent_warmup=8), labels=False, step=3),
}


@pytest.mark.parametrize("tangent", ["jvp", "fused", "fd"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_and_gradient(case, tangent):
    """loss_i = w_i L_i, L_i = sum_D (u - u_tgt)^2, u_tgt = v~ - rho (t - r) du/dt, w_i = (sg(L_i) + c)^-p; the gradient
    is that of w_i ||u - sg(u_tgt)||^2 (no gradient through w, the JVP, or the CFG passes). Tolerance 1e-10 (fd: 1e-6,
    a 1e-4 step on a function linear in t)."""
    spec = CASES[case]
    cfg = meanflow.Config(tangent=tangent, **spec["cfg"])
    net = LinU(0).train()
    x, y = data(labels=spec["labels"])
    step = spec.get("step", 1)
    got, logs = meanflow.loss(net, x, y, cfg, step, torch.Generator().manual_seed(5))
    want, prescribed, wlogs = expected(net, x, y, cfg, 5, step=step)
    tol = 1e-6 if tangent == "fd" else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for k in ("t", "L", "mse_v"):
        torch.testing.assert_close(logs[k], wlogs[k].detach(), rtol=tol, atol=tol)
    for a, b in zip(param_grads(net, got), param_grads(net, prescribed)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if spec["labels"]:  # the guidance passes ran in eval mode and the net is back in train mode
        assert net.calls[:2] == [False, False] and net.training


def test_cfg_case_exercises_both_sides_of_the_interval_and_dropout():
    """The cfg case above is not vacuous: some samples in and some outside [t_min, t_max], some labels dropped."""
    cfg = meanflow.Config(**CASES["cfg"]["cfg"])
    x, y = data()
    _, _, logs = expected(LinU(0), x, y, cfg, 5)
    inside = (logs["t"] >= cfg.cfg_t_min) & (logs["t"] <= cfg.cfg_t_max)
    dropped = logs["y_mixed"].sum(dim=1) == 0
    assert 0 < int(inside.sum()) < len(inside) and 0 < int(dropped.sum()) < len(dropped)


@pytest.mark.parametrize("labels", [False, True])
def test_distillation_value_and_teacher_guidance_sign(labels):
    """v~ = the teacher's u(z, t, t); with labels v_null + w (v_c - v_null), w = guidance_scale on the interval."""
    cfg = meanflow.Config(guidance_scale=1.7, cfg_t_max=0.6, label_dropout=0.25 if labels else 0.0)
    net, teacher = LinU(0).train(), LinU(1).eval()
    x, y = data(labels=labels)
    got, _ = meanflow.loss(net, x, y, cfg, 1, torch.Generator().manual_seed(2), teacher=teacher)
    want, prescribed, _ = expected(net, x, y, cfg, 2, teacher=teacher)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(param_grads(net, got), param_grads(net, prescribed)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_unconditional_distillation_with_jvp():
    """Defect: under bf16 autocast the teacher's velocity comes back in bf16 and was used uncast as the fp32 JVP's
    tangent ("expected m1 and m2 to have the same dtype"). Now it runs, and agrees with fp32 to bf16 rounding."""
    import nets
    from conftest import randomize_
    net = randomize_(nets.build_net("mlp", (3,), use_r=True, width=32, depth=2))
    teacher = randomize_(nets.build_net("mlp", (3,), use_r=True, width=32, depth=2), seed=1).eval()
    x = torch.randn(64, 3)
    cfg = meanflow.Config(tangent="jvp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = meanflow.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(1), teacher=teacher)
    ref, _ = meanflow.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(1), teacher=teacher)
    assert ((low - ref).abs().mean() / ref.abs().mean()) < 0.1


def test_autocast_cache_cleared_between_guidance_and_gradient_passes(monkeypatch):
    """Casts cached under no_grad have no grad_fn; the cache is cleared after the no-grad guidance passes and before
    the differentiable pass, as FastGen's MeanFlowModel._compute_mf_loss (torch versions that cache there would
    otherwise cut the gradient)."""
    events = []
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: events.append("clear"))
    net = LinU(0).train()
    original = net.forward
    net.forward = lambda *a, **k: (events.append("grad" if torch.is_grad_enabled() else "nograd"), original(*a, **k))[1]
    x, y = data()
    meanflow.loss(net, x, y, meanflow.Config(cfg_omega=1.5, tangent="fused"), 1, torch.Generator().manual_seed(0))
    assert events == ["nograd", "nograd", "clear", "grad"]
    events.clear()  # tangent_v="net" (ours, not FastGen's): its velocity pass is cleared after as well
    meanflow.loss(net, x, y, meanflow.Config(cfg_omega=1.5, tangent="fused", tangent_v="net"), 1,
                  torch.Generator().manual_seed(0))
    assert events == ["nograd", "nograd", "clear", "nograd", "clear", "grad"]


# --- Config defaults and presets (FastGen's config_mean_flow.py and its MeanFlow experiment configs) ------------

def test_config_defaults_are_the_reference_cifar10_values():
    c = meanflow.Config()
    assert (c.P_mean_t, c.P_std_t, c.P_mean_r, c.P_std_r, c.t_max, c.ratio_r_neq_t) == (-0.6, 1.6, -4.0, 1.6, 0.999, 0.75)
    assert (c.norm_p, c.norm_c, c.tangent_warmup, c.fd_step) == (0.75, 1e-3, 0, 1e-4)
    assert (c.label_dropout, c.cfg_omega, c.cfg_kappa, c.cfg_t_min, c.cfg_t_max, c.guidance_scale) == (0, 1, 0, 0, 1, 1)
    assert c.sample_ts == (0.999, 0.0)
    assert c.tangent_v == "target"  # the reference's tangent, along v~
    assert c.norm_r_eq_t == "row"  # the reference's weight, one per row


EMA_DECAYS = (0.9999, 0.99995, 0.9996)
IMAGENET256_DIT = dict(cond=True, batch=1024, steps=1_200_000, optimizer="adam", lr=1e-4, betas=(0.9, 0.95),
                       ema=EMA_DECAYS, precision="bf16", tangent="jvp", P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4,
                       P_std_r=1.0, ratio_r_neq_t=0.25, norm_p=1.0, norm_c=1.0, label_dropout=0.1)
PRESETS = {  # fastgen/configs/experiments/EDM/config_mf_cifar10.py, DiT/config_mf_b.py, DiT/config_mf_xl.py over
    # fastgen/configs/methods/config_mean_flow.py, value by value
    "cifar10": dict(net="ddpmpp", dropout=0.2, cond=False, xflip=True, batch=1024, steps=1_000_000, optimizer="adam",
                    lr=6e-4, betas=(0.9, 0.999), lr_warmup=9765, ema=EMA_DECAYS, P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0,
                    P_std_r=1.6, ratio_r_neq_t=0.75, norm_p=0.75, norm_c=1e-3, tangent="fused", precision="fp32",
                    cfg_omega=1.0, cfg_kappa=0.0, label_dropout=0.0, sample_ts=(0.999, 0.0), batch_target=False),
    "imagenet256": dict(IMAGENET256_DIT, net="dit-b2", cfg_omega=1.0, cfg_kappa=0.5, cfg_t_min=0.0, cfg_t_max=1.0),
    "imagenet256-xl": dict(IMAGENET256_DIT, net="dit-xl2", cfg_omega=0.2, cfg_kappa=0.92, cfg_t_min=0.0,
                           cfg_t_max=0.75),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_fastgen_configs(name):
    """Every value of the FastGen config, resolved as train.py does (preset over Config defaults over the recipe
    defaults), and TF32 off as the reference runs."""
    import recipe
    _, cfg, _, _ = recipe.resolve_config(["--method", "meanflow", "--data", "toy", "--preset", name])
    for k, v in PRESETS[name].items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"{name}.{k}: {got} != {v}"
    assert cfg["tf32"] == "off" and cfg["t_max"] == 0.999
    if name.startswith("imagenet"):  # effective guidance scale omega / (1 - kappa): 2.0 (B/2) and 2.5 (XL/2)
        assert math.isclose(cfg["cfg_omega"] / (1 - cfg["cfg_kappa"]), 2.0 if name == "imagenet256" else 2.5)
