"""diffusion.py (float64): EDM preconditioning, the loss is minimised by the exact Gaussian denoiser, the Karras
grid, the Heun sampler solves the PF-ODE of Gaussian data, and a denoiser read as a flow velocity is the exact one."""
import pytest
import torch
from torch import nn

import diffusion
from conftest import GaussianOracle

SD = 0.5
S = 0.3  # data std


def bc(a, x):
    return a.reshape(-1, *[1] * (x.ndim - 1))


class GaussianDenoiser(nn.Module):
    """Raw net F(c_in x, c_noise) whose preconditioned output (sigma_data, EDM Table 1) is a * D*(x_sigma), D* =
    mean + std^2 / (std^2 + sigma^2) (x_sigma - mean) = E[x | x_sigma] for N(mean, std^2 I) data; sigma and x_sigma
    recovered from the inputs."""

    def __init__(self, a=1.0, mean=0.0, std=S, sigma_data=SD):
        super().__init__()
        self.a, self.mean, self.std, self.sd = a, mean, std, sigma_data

    def forward(self, x_in, c_noise, y=None):
        sigma, sd = torch.exp(4 * c_noise), self.sd
        x = x_in * bc((sigma**2 + sd**2).sqrt(), x_in)
        D = self.a * (self.mean + bc(self.std**2 / (self.std**2 + sigma**2), x) * (x - self.mean))
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return (D - bc(c_skip, x) * x) / bc(c_out, x)


def test_preconditioning_unit_variance_and_c_skip():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(200_000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_sigma = x * (SD**2 + sigma**2).sqrt()  # variance SD^2 + sigma^2 per column
    c_in = 1 / (sigma**2 + SD**2).sqrt()
    torch.testing.assert_close((c_in * x_sigma).std(dim=0), torch.ones(4, dtype=torch.float64), rtol=0.01, atol=0)
    ident = nn.Identity()

    def zero_net(x_in, c, y=None):
        return torch.zeros_like(ident(x_in))
    D = diffusion.denoise(zero_net, torch.ones(1, 1, dtype=torch.float64), torch.tensor([SD], dtype=torch.float64), None, SD)
    assert D.item() == 0.5  # c_skip(sigma_data) = 1/2


def test_loss_is_minimised_by_the_exact_denoiser():
    """E[lambda ||a D* - x||^2] has its minimum at a = 1 (D* = E[x | x_sigma]); its derivative there is zero up to
    Monte-Carlo error while a = 0.9 / 1.1 are clearly worse."""
    x = S * torch.randn(200_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = diffusion.Config()
    losses = {a: diffusion.loss(GaussianDenoiser(a), x, None, cfg, 1, torch.Generator().manual_seed(1))[0].mean().item()
              for a in (0.9, 0.99, 1.0, 1.01, 1.1)}
    assert losses[1.0] < min(losses[0.9], losses[1.1]) * 0.99
    slope = (losses[1.01] - losses[0.99]) / 0.02
    curvature = (losses[1.1] + losses[0.9] - 2 * losses[1.0]) / 0.01
    assert abs(slope) < 0.01 * curvature  # stationary point


@pytest.mark.parametrize("labelled", [False, True])
def test_batch_target_is_the_batch_posterior_mean(labelled):
    """batch_target with the exact denoiser as the net: each row's loss is lambda(sigma) |D*(x_sigma) - D_batch|^2,
    D_batch the batch's E[x | x_sigma] written out one sample at a time (with labels: over the samples of the row's
    label), on the loss's own draws of sigma and eps."""
    from conftest import posterior_mean_by_definition
    x = S * torch.randn(96, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.eye(3, dtype=torch.float64)[torch.arange(96) % 3] if labelled else None
    cfg = diffusion.Config(batch_target=True)
    got, _ = diffusion.loss(GaussianDenoiser(), x, y, cfg, 1, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # the loss's draws, in its order
    sigma = diffusion.sample_sigma(96, cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, gen, "cpu")
    x_sigma = x + bc(sigma, x) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    exact = bc(S**2 / (S**2 + sigma**2), x_sigma) * x_sigma  # D* of N(0, S^2 I) data
    weight = (sigma**2 + SD**2) / (sigma * SD) ** 2
    expected = weight * (exact - posterior_mean_by_definition(x, x_sigma, torch.ones_like(sigma), sigma, y)).square().sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_batch_target_lowers_the_target_noise_and_is_off_by_default():
    """On 4,096 Gaussian points the batch's E[x | x_sigma] is far closer to D* than x is: the exact denoiser's loss
    falls to under a tenth (measured: 1/120). Off by default, and a copy of cm.py's batch_denoise."""
    import inspect

    import cm
    x = S * torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean = {on: diffusion.loss(GaussianDenoiser(), x, None, diffusion.Config(batch_target=on), 1,
                               torch.Generator().manual_seed(1))[0].mean() for on in (False, True)}
    assert mean[True] < 0.1 * mean[False]
    assert diffusion.Config().batch_target is False and "batch_target" not in diffusion.PRESETS["toy"]
    assert inspect.getsource(diffusion.batch_denoise) == inspect.getsource(cm.batch_denoise)
    assert "# Copied from cm.py: batch_denoise\ndef batch_denoise(" in inspect.getsource(diffusion)


def test_karras_grid_matches_reference_values():
    """The 1000-level Karras grid of FastGen's EDMNoiseSchedule (fastgen/networks/noise_schedule.py, commit 34f30e8;
    its 1-step list starts at index 998): sigma_998 = 79.5638 and sigma_500 = 2.5265 (ascending indices)."""
    s = diffusion.karras_sigmas(1000, 0.002, 80.0, 7.0)[:-1].flip(0)  # ascending
    assert abs(s[998].item() - 79.5638) < 1e-4 and abs(s[500].item() - 2.5265) < 1e-4
    assert abs(s[0].item() - 0.002) < 1e-15 and abs(s[999].item() - 80) < 1e-12


def test_heun_solves_the_gaussian_pf_ode():
    """With D*, the PF-ODE maps x_sigma to x_sigma * S / sqrt(S^2 + sigma^2). Heun converges to it at second order
    (error / 16 for 4x the steps), 18 steps cost 35 evaluations, and one Euler step from sigma_max collapses."""
    eps = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = 80 * eps * S / (S**2 + 80**2) ** 0.5
    calls = []

    class Counting(GaussianDenoiser):
        def forward(self, *args, **kw):
            calls.append(1)
            return super().forward(*args, **kw)
    errors = {}
    for n in (18, 50, 200):
        x = diffusion.sample(Counting(), eps, diffusion.Config(sample_steps=n))
        errors[n] = ((x - exact).abs().max() / exact.abs().max()).item()
    assert len(calls) == 35 + 99 + 399
    assert errors[18] < 0.1 and errors[200] < 1e-3 and 12 < errors[50] / errors[200] < 20
    x1 = diffusion.sample(GaussianDenoiser(), eps, diffusion.Config(), sigmas=(80.0, 0.0))
    assert x1.std() < 0.01 * exact.std()


def test_point_net_leaves_the_zero_output_saddle_on_isotropic_unit_data():
    """On points whose covariance is sigma_data^2 I, c_skip x_sigma is already the best linear denoiser and F = 0 is a
    saddle: with the image nets' near-zero inits for the MLP's branch outputs and output layer the loss stays at its
    F = 0 value, which is why nets.py's MLP does not use them. The toy preset's net and noise levels, 300 Adam steps on
    the 8 Gaussians standardised to unit variance with sigma_data 1, must beat the F = 0 denoiser by 10 % at
    sigma = 0.3 (measured: 0.76 of its squared error; 1.00 with those near-zero inits)."""
    import data
    import nets
    torch.manual_seed(0)
    pts = data.toy_points(100_000, seed=0)
    pts = pts / pts.square().sum(1).mean().div(2).sqrt()
    preset = diffusion.PRESETS["toy"]
    cfg = diffusion.Config(sigma_data=preset["sigma_data"], P_mean=preset["P_mean"])
    net = nets.build_net(preset["net"], (2,))
    opt = torch.optim.Adam(net.parameters(), lr=preset["lr"])
    gen = torch.Generator().manual_seed(0)
    for step in range(300):
        opt.zero_grad()
        batch = pts[torch.randint(len(pts), (256,), generator=gen)]
        diffusion.loss(net, batch, None, cfg, step, gen)[0].mean().backward()
        opt.step()
    x, eps = pts[:4096], torch.randn(4096, 2, generator=gen)
    s = 0.3
    with torch.no_grad():
        err = (diffusion.denoise(net, x + s * eps, torch.full((4096,), s), None, cfg.sigma_data) - x).square().mean()
    zero = (cfg.sigma_data**2 / (cfg.sigma_data**2 + s**2) * (x + s * eps) - x).square().mean()
    assert err < 0.9 * zero, (err / zero).item()



@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_a_diffusion_model_read_as_a_flow_velocity(sigma_data):
    """diffusion.FlowVelocity of the exact EDM denoiser of Gaussian data is the exact flow velocity u(z, t, t) (the
    Gaussian oracle) to 1e-12 on the teacher's reach (sigma in [0.002, 80]), r unused; outside it, that at the clamp."""
    mean, std = 0.7, 0.5
    v = diffusion.FlowVelocity(GaussianDenoiser(mean=mean, std=std, sigma_data=sigma_data), sigma_data)
    oracle = GaussianOracle(mean, std)
    t = torch.linspace(0.002 / 1.002, 80 / 81, 50, dtype=torch.float64)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(v(z, t, 0.3 * t), oracle(z, t, t), rtol=1e-12, atol=1e-12)
        edge = torch.tensor([1e-9, 0.9999], dtype=torch.float64)
        torch.testing.assert_close(v(z[:2], edge), oracle(z[:2], *[torch.tensor([0.002 / 1.002, 80 / 81],
                                                                               dtype=torch.float64)] * 2))
