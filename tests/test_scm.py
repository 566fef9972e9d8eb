"""scm.py against closed forms (float64): Gaussian data, where the TrigFlow PF-ODE and the consistency function are
known exactly; the TrigFlow <-> EDM identity; JVP vs finite differences; the three tangent options; samplers."""

import pytest
import torch
from torch import nn
from torch.func import jvp

import diffusion
import nets
import scm
from conftest import posterior_mean_by_definition, randomize_, sliced_wasserstein, train_toy

SD = 0.5  # sigma_data
S = 0.3  # data std of the Gaussian oracle (S != SD, else the exact dx_t/dt is zero)


def bc(a, x):
    return a.reshape(-1, *[1] * (x.ndim - 1))


def tau(t):
    """Std of x_t = cos t x + sin t z for x ~ N(0, S^2), z ~ N(0, SD^2)."""
    return (t.cos() ** 2 * S**2 + t.sin() ** 2 * SD**2).sqrt()


def exact_dxdt(x_t, t):
    """PF-ODE dx_t/dt of Gaussian data: x_t scales with tau, dx_t/dt = tau'/tau x_t."""
    return bc(t.sin() * t.cos() * (SD**2 - S**2) / tau(t) ** 2, x_t) * x_t


def exact_f(x_t, t):
    """Consistency function: the ODE maps x_t to x_0 = x_t S / tau(t)."""
    return bc(S / tau(t), x_t) * x_t


def t_of(c):
    return torch.atan(torch.exp(4 * c) / SD)


class RawOracle(nn.Module):
    """A closed-form TrigFlow network presented as a raw EDM net F_raw(x_in, c_noise) = -F_trig(SD x_in, t(c)),
    with the nets.py call contract (return_logvar -> zeros, tangents via torch.func.jvp)."""

    def __init__(self, F_trig):
        super().__init__()
        self.F_trig = F_trig

    def raw(self, x_in, c):
        return -self.F_trig(SD * x_in, t_of(c))

    def forward(self, x_in, c, r=None, y=None, return_logvar=False, tangents=None):
        out = self.raw(x_in, c) if tangents is None else jvp(self.raw, (x_in, c), tangents[:2])
        return (out, torch.zeros(x_in.shape[0], dtype=x_in.dtype)) if return_logvar else out


def student_F(x_t, t):
    """F_theta such that f = cos t x_t - SD sin t F is the exact consistency function."""
    return (bc(t.cos(), x_t) * x_t - exact_f(x_t, t)) / bc(SD * t.sin(), x_t)


def teacher_F(x_t, t):
    return exact_dxdt(x_t, t) / SD


def gaussian_batch(n=256, d=4, seed=0):
    return S * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def cfg_for(tangent, **kw):
    return scm.Config(tangent=tangent, tangent_warmup=0, sigma_max=80.0, fd_rel_step=1e-5, **kw)


# --- TrigFlow <-> EDM ------------------------------------------------------------------------------------------

def test_consistency_function_is_edm_denoiser_and_identity_at_zero():
    """f(x_t, t) = cos t x_t - SD sin t F_theta = D(x_t / cos t, SD tan t), and f(x, 0) = x."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (3,), logvar=True).double()).eval()
    x_t = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1e-4, 0.3, 0.8, 1.2, 1.56], dtype=torch.float64)
    f = bc(t.cos(), x_t) * x_t - SD * bc(t.sin(), x_t) * scm.trig_F(net, x_t, t, None, SD)
    D = scm.denoise(net, x_t / bc(t.cos(), x_t), SD * t.tan(), None, SD)
    torch.testing.assert_close(f, D, rtol=1e-12, atol=1e-12)
    zero = torch.zeros(5, dtype=torch.float64)
    f0 = x_t - SD * bc(zero.sin(), x_t) * scm.trig_F(net, x_t, zero + 1e-300, None, SD)
    torch.testing.assert_close(f0, x_t, rtol=0, atol=0)


def test_trigflow_division_form_equals_sign_flip_form():
    """The TrigFlow <-> EDM identity of scm.py's docstring (our derivation; FastGen's sCM.py TrigFlowPrecond computes
    the division form): (cos t x_t - D(x_t / cos t, SD tan t)) / (SD sin t) == -F_raw(x_t / SD, ln(SD tan t) / 4)."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (3,)).double()).eval()
    x_t = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 1.0, 1.5], dtype=torch.float64)
    D = scm.denoise(net, x_t / bc(t.cos(), x_t), SD * t.tan(), None, SD)
    division = (bc(t.cos(), x_t) * x_t - D) / bc(SD * t.sin(), x_t)
    torch.testing.assert_close(division, scm.trig_F(net, x_t, t, None, SD), rtol=1e-10, atol=1e-12)


# --- Exact oracle -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tangent", ["jvp", "fused", "fd"])
def test_exact_teacher_and_student_give_zero_tangent(tangent):
    """sCD with the exact Gaussian teacher and the exact consistency function as student: g = cos t df/dt = 0 along
    the true ODE (f is constant on trajectories), to float64 precision (FD: to its truncation error). The raw
    (unnormalised) g is checked, so normalisation cannot hide a wrong sign or a missing term."""
    x = gaussian_batch()
    cfg = cfg_for(tangent, tangent_norm_c=1.0)
    gen = torch.Generator().manual_seed(1)
    sigma = scm.sample_sigma(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, gen, "cpu")
    t = torch.atan2(sigma, torch.full_like(sigma, SD))
    z = SD * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x_t = bc(t.cos(), x) * x + bc(t.sin(), x) * z
    student, teacher = RawOracle(student_F), RawOracle(teacher_F)
    dxdt = scm.target_dxdt(x, z, x_t, t, None, cfg, teacher)
    torch.testing.assert_close(dxdt, exact_dxdt(x_t, t))
    F, dF, _ = scm.F_and_dF(student, x, z, x_t, t, None, dxdt, cfg, distill=True)
    torch.testing.assert_close(F, student_F(x_t, t))
    cos, sin = bc(t.cos(), x), bc(t.sin(), x)
    g_raw = -cos**2 * (SD * F - dxdt) - (cos * sin * x_t + SD * dF)
    assert (cos * sin * x_t).abs().max() > 0.1  # the two terms are individually large and cancel
    atol = 1e-12 if tangent != "fd" else 1e-7
    torch.testing.assert_close(g_raw, torch.zeros_like(g_raw), rtol=0, atol=atol)
    per_example, logs = scm.loss(student, x, None, cfg, 1, torch.Generator().manual_seed(1), teacher=teacher)
    assert logs["g_sq"].max() < (1e-20 if tangent != "fd" else 1e-12)


def test_perturbed_student_tangent_points_back():
    """With F' = F + delta x_t the normalised g is non-zero and <g, delta x_t> < 0 for every sample: the update
    (F moves along +g) removes the perturbation."""
    x = gaussian_batch()
    cfg = cfg_for("jvp")
    gen = torch.Generator().manual_seed(2)
    t = torch.atan2(scm.sample_sigma(256, cfg.P_mean, cfg.P_std, cfg.sigma_min, 80.0, gen, "cpu"), torch.tensor(SD))
    z = SD * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x_t = bc(t.cos(), x) * x + bc(t.sin(), x) * z
    teacher = RawOracle(teacher_F)
    for delta in (0.05, -0.05):
        def perturbed(x_, t_):
            return student_F(x_, t_) + delta * x_
        dxdt = scm.target_dxdt(x, z, x_t, t, None, cfg, teacher)
        F, dF, _ = scm.F_and_dF(RawOracle(perturbed), x, z, x_t, t, None, dxdt, cfg, distill=True)
        g = scm.tangent_g(F, dF, x_t, t, dxdt, cfg, 1)
        inner = (g * delta * x_t).sum(dim=1)
        assert (inner < 0).all() and g.abs().mean() > 1e-3


# --- JVP options on a real net ------------------------------------------------------------------------------------

def test_jvp_of_trigflow_student_matches_central_difference():
    """dF = cos t sin t dF_theta/dt along (dxdt, 1), with F_theta the TrigFlow-wrapped net (through tan and log),
    equals a float64 central difference of trig_F; fused equals torch.func.jvp."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("ddpmpp-tiny", (3, 16, 16), logvar=True, dropout=0.2).double()).train()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    z = SD * torch.randn_like(x)
    t = torch.tensor([0.1, 0.7, 1.4], dtype=torch.float64)
    x_t = bc(t.cos(), x) * x + bc(t.sin(), x) * z
    dxdt = torch.randn_like(x)
    h = 1e-6
    with torch.random.fork_rng():
        plus = scm.trig_F(net, x_t + h * dxdt, t + h, None, SD)
    with torch.random.fork_rng():
        minus = scm.trig_F(net, x_t - h * dxdt, t - h, None, SD)
    fd = bc(t.cos() * t.sin(), x) * (plus - minus) / (2 * h)
    results = {}
    for tangent in ("jvp", "fused"):
        with torch.random.fork_rng():
            results[tangent] = scm.F_and_dF(net, x, z, x_t, t, None, dxdt, cfg_for(tangent), distill=True)
    scale = fd.abs().max().item()
    torch.testing.assert_close(results["jvp"][1], fd, rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(results["fused"][1], results["jvp"][1], rtol=0, atol=1e-10 * scale)
    # Same masks, same F up to float64 rounding (torch.func.jvp and the fused pass run different kernels).
    torch.testing.assert_close(results["fused"][0], results["jvp"][0], rtol=0, atol=1e-12 * results["jvp"][0].abs().max().item())


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("tangent", ["fused", "fd"])
def test_tangent_options_agree(distill, tangent):
    """sCT and sCD per-example losses with the fused path and with FD match torch.func.jvp (dropout on)."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (3,), logvar=True, dropout=0.2).double()).train()
    teacher = randomize_(nets.build_net("mlp", (3,)).double(), seed=1).eval() if distill else None
    x = torch.randn(64, 3, dtype=torch.float64)
    out = {}
    for name in ("jvp", tangent):
        torch.manual_seed(5)
        out[name], _ = scm.loss(net, x, None, cfg_for(name), 1, torch.Generator().manual_seed(1), teacher=teacher)
    tol = 1e-10 if tangent == "fused" else 1e-5
    torch.testing.assert_close(out[tangent], out["jvp"], rtol=tol, atol=tol)


def test_fd_for_scd_follows_the_teacher():
    """Deviation from FastGen (sCM.py, SCMModel._estimate_jvp_finite_difference): FD-sCD differentiates along the
    teacher's dx_t/dt, so it agrees with the JVP even when the teacher's dx_t/dt differs from the conditional one."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (2,), logvar=True).double()).eval()
    x = torch.randn(32, 2, dtype=torch.float64)
    z = SD * torch.randn_like(x)
    t = torch.linspace(0.2, 1.3, 32, dtype=torch.float64)
    x_t = bc(t.cos(), x) * x + bc(t.sin(), x) * z
    dxdt = 3 * torch.randn_like(x)  # far from the conditional dx_t/dt
    _, d_jvp, _ = scm.F_and_dF(net, x, z, x_t, t, None, dxdt, cfg_for("jvp"), distill=True)
    _, d_fd, _ = scm.F_and_dF(net, x, z, x_t, t, None, dxdt, cfg_for("fd"), distill=True)
    _, d_path, _ = scm.F_and_dF(net, x, z, x_t, t, None, dxdt, cfg_for("fd"), distill=False)
    torch.testing.assert_close(d_fd, d_jvp, rtol=1e-5, atol=1e-6)
    assert (d_path - d_jvp).abs().max() > 1e-2  # FastGen's conditional-path FD would not


def test_tangent_normalisation_forms():
    """rms: g / (||g|| / sqrt(D) + c); paper: g / (||g|| + c); warm-up scales only the second term."""
    g_in = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)  # ||g|| = 5, RMS = 2.5 when dF = x_t = 0
    t = torch.tensor([0.0], dtype=torch.float64)  # cos = 1, sin = 0: g = -(SD F - dxdt)
    zero = torch.zeros_like(g_in)
    for norm, expected in (("rms", g_in / (2.5 + 0.1)), ("paper", g_in / (5 + 0.1))):
        g = scm.tangent_g(zero, zero, zero, t, g_in, scm.Config(tangent_norm=norm), 1)
        torch.testing.assert_close(g, expected)
    cfg = scm.Config(tangent_warmup=10, tangent_norm_c=1e300)  # huge c: g is just scaled, compare ratios
    t = torch.tensor([0.7], dtype=torch.float64)
    dF = torch.ones_like(g_in)
    g5 = scm.tangent_g(zero, dF, zero, t, zero, cfg, 5)
    g10 = scm.tangent_g(zero, dF, zero, t, zero, cfg, 10)
    torch.testing.assert_close(g5, g10 / 2)


def test_copied_helpers_stay_identical():
    """scm.py copies small helpers from diffusion.py (marked `# Copied from`) so it stays self-contained."""
    import inspect
    for name in ("sample_sigma", "bcast", "denoise"):
        assert inspect.getsource(getattr(scm, name)) == inspect.getsource(getattr(diffusion, name)), name
    assert "# Copied from diffusion.py: sample_sigma" in inspect.getsource(scm)
    import cm
    assert inspect.getsource(scm.batch_denoise) == inspect.getsource(cm.batch_denoise)
    assert "# Copied from cm.py: batch_denoise" in inspect.getsource(scm)


def test_batch_dxdt_of_one_sample_is_the_conditional_dxdt():
    """With a batch of one, E[x | x_t] = x and (cos t x_t - x) / sin t = cos t z - sin t x (float64, 1e-12)."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 5, dtype=torch.float64, generator=g), SD * torch.randn(1, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9], dtype=torch.float64)
    x_t = t.cos() * x + t.sin() * z
    v = scm.target_dxdt(x, z, x_t, t, None, scm.Config(sigma_data=SD, batch_target=True))
    torch.testing.assert_close(v, t.cos() * z - t.sin() * x, rtol=1e-12, atol=1e-12)


def test_batch_dxdt_follows_the_pf_ode_of_gaussian_data():
    """Data N(0, S^2 I): the batch's dx_t/dt (4096 samples, its E[x | x_t] against the definition written out on
    the first rows) is within a tenth of the single-sample dx_t/dt's distance to the exact PF-ODE dx_t/dt."""
    g = torch.Generator().manual_seed(0)
    x = S * torch.randn(4096, 2, dtype=torch.float64, generator=g)
    z = SD * torch.randn(x.shape, dtype=torch.float64, generator=g)
    t = torch.rand(4096, dtype=torch.float64, generator=g) * 1.4 + 0.05
    x_t = bc(t.cos(), x) * x + bc(t.sin(), x) * z
    exact = exact_dxdt(x_t, t)
    cfg = scm.Config(sigma_data=SD)
    single = scm.target_dxdt(x, z, x_t, t, None, cfg)
    batch = scm.target_dxdt(x, z, x_t, t, None, scm.Config(sigma_data=SD, batch_target=True))
    assert (batch - exact).square().mean() < 0.01 * (single - exact).square().mean()
    D = posterior_mean_by_definition(x, x_t[:8], t.cos(), SD * t.sin())
    torch.testing.assert_close(batch[:8], (bc(t.cos()[:8], D) * x_t[:8] - D) / bc(t.sin()[:8], D), rtol=1e-9, atol=1e-9)


def test_sampler_with_exact_consistency_function():
    """One step with the exact f maps sigma_0 eps to the data distribution's scale S; two steps re-noise."""
    cfg = scm.Config()
    student = RawOracle(student_F)
    eps = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = scm.sample(student, eps, cfg)
    sigma0 = torch.tensor(cfg.sample_sigmas[0], dtype=torch.float64)
    t0 = torch.atan(sigma0 / SD)
    torch.testing.assert_close(x, eps * sigma0 * t0.cos() * S / tau(t0))  # f(x_t) with x_t = cos t0 x_sigma
    x2 = scm.sample(student, eps, cfg, sigmas=(80.0, 1.0, 0.0), gen=torch.Generator().manual_seed(3))
    assert abs(x2.std().item() - S) < 0.01  # the exact f maps any sigma back to the data scale


def test_sigma_distribution():
    s = scm.sample_sigma(100_000, -1.0, 1.4, 0.002, 800.0, torch.Generator().manual_seed(0), "cpu")
    assert s.dtype == torch.float64 and s.min() >= 0.002 and s.max() <= 800
    assert abs(s.log().mean().item() + 1.0) < 0.02 and abs(s.log().std().item() - 1.4) < 0.02


# --- 2-D quality ------------------------------------------------------------------------------------------------

def test_toy_sct_and_scd_beat_the_teachers_one_step_euler(toy_teacher):
    """A diffusion.py teacher (600 steps, conftest), sCD from it and sCT from scratch (600 steps each, lr 3e-4,
    128-wide MLP). Sliced W2 (256 projections) to 4096 held-out points; measured: teacher Heun 0.063, teacher 1-step
    Euler 0.70, sCD 1-step 0.11, sCT 1-step 0.14. With the sign of g's dF term flipped, both diverge (> 100)."""
    teacher, d_heun, d_euler, held_out, eps = toy_teacher
    cfg = scm.Config(sigma_max=80.0, tangent="fused", tangent_warmup=150)
    student = nets.build_net("mlp", (2,), width=128, depth=3, logvar=True)
    student.load_state_dict(teacher.state_dict(), strict=False)  # sCD starts from the teacher
    d_scd = sliced_wasserstein(scm.sample(train_toy(scm, cfg, student, 600, 3e-4, teacher=teacher), eps, cfg), held_out)
    torch.manual_seed(0)
    scratch = nets.build_net("mlp", (2,), width=128, depth=3, logvar=True)
    d_sct = sliced_wasserstein(scm.sample(train_toy(scm, cfg, scratch, 600, 3e-4), eps, cfg), held_out)
    print(f"SW2: teacher heun {d_heun:.3f}, teacher euler-1 {d_euler:.3f}, sCD-1 {d_scd:.3f}, sCT-1 {d_sct:.3f}")
    assert d_heun < 0.1 and d_euler > 0.5
    assert d_scd < 0.25 and d_scd < 0.4 * d_euler
    assert d_sct < 0.25 and d_sct < 0.4 * d_euler
