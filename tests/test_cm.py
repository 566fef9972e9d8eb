"""cm.py: boundary condition, the ECT r(sigma) map and stage schedule (hand-computed), shared dropout masks, weights,
the CD exact oracle on Gaussian data (loss -> 0 with the ODE-step error as the gap shrinks), the batch target (against
its definition and the exact Gaussian posterior), 2-D quality."""
import math

import pytest
import torch
from torch import nn

import cm
import diffusion
import nets
from conftest import posterior_mean_by_definition, randomize_, sliced_wasserstein, train_toy

SD, S = 0.5, 0.3  # sigma_data; std of the Gaussian data in the oracle tests


def bc(a, x):
    return a.reshape(-1, *[1] * (x.ndim - 1))


# --- Parameterisation ------------------------------------------------------------------------------------------

def test_boundary_condition():
    """boundary=True: f(x, sigma_min) = x exactly for any net. Plain EDM coefficients (FastGen): only
    approximately, |f - x| <= (1 - c_skip)|x| + c_out |F| with c_out(0.002) ~ 0.002."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (3,)).double())
    x = torch.randn(16, 3, dtype=torch.float64)
    sigma_min = torch.full((16,), 0.002, dtype=torch.float64)
    f = cm.consistency_fn(net, x, sigma_min, None, cm.Config(boundary=True))
    assert torch.equal(f, x)
    f_plain = cm.consistency_fn(net, x, sigma_min, None, cm.Config())
    c_skip, c_out, c_in = SD**2 / (0.002**2 + SD**2), 0.002 * SD / math.sqrt(0.002**2 + SD**2), 1 / math.sqrt(0.002**2 + SD**2)
    F = net(c_in * x, torch.full((16,), math.log(0.002) / 4, dtype=torch.float64))
    bound = (1 - c_skip) * x.abs() + c_out * F.abs()
    assert ((f_plain - x).abs() <= bound + 1e-15).all() and (f_plain - x).abs().max() > 0
    sigma = torch.full((16,), 1.0, dtype=torch.float64)
    assert (cm.consistency_fn(net, x, sigma, None, cm.Config(boundary=True)) - x).abs().max() > 0.1


# --- ECT curriculum (FastGen 34f30e8, fastgen/callbacks/ct_schedule.py, CTScheduleCallback) -------------------

@pytest.mark.parametrize("step, batch, ratio", [
    (1, 512, 0.5),                 # no images seen yet: stage 0, a = 1 - 2^-1
    (12_500, 512, 0.5),            # 12,499 x 512 = 6,399,488 < 6.4 M images: still stage 0
    (12_501, 512, 0.75),           # 6.4 M images: stage 1
    (12_501, 1024, 0.875),         # the same step with a twice larger global batch is two stages further
    (12_501, 256, 0.5),            # ... and half the batch half as far
    (100_001, 512, 1 - 2**-9),     # 51.2 M images: stage 8, a = 0.998046875
    (112_501, 512, 0.999),         # stage 9: 1 - 2^-10 = 0.99902 is capped at ratio_limit 0.999
])
def test_ect_ratio_counts_images_with_the_global_batch(step, batch, ratio):
    """CIFAR-10: q = 2, 6400 kimg per stage; train.py passes images = (step - 1) x global batch."""
    assert cm.ect_ratio((step - 1) * batch, cm.Config()) == ratio


@pytest.mark.parametrize("sigma, a, r_min, expected_sigma, expected_r", [
    # r = sigma - sigma (1 - a)(1 + 8 sigmoid(-sigma)); sigmoid(-1) = 1 / (1 + e) = 0.2689414...
    (1.0, 0.9375, 0.002, 1.0, 1 - 0.0625 * (1 + 8 / (1 + math.e))),           # 0.8030292893...
    (1.0, 0.999, 0.002, 1.0, 0.9968484686290401),
    (10.0, 0.5, 0.002, 10.0, 4.998184085251902),
    (80.0, 0.999, 0.002, 80.0, 79.92),                                         # sigmoid(-80) = 0 in float64
    (1.0, 0.5, 0.002, 1.0, 0.002),                                             # Delta > sigma: floored at r_min
    (1.0, 0.5, 0.0, 1.0, 0.0),                                                 # ECT's floor: r = 0, target = data
    (0.002, 0.999, 0.002, 0.002 + 1e-6, 0.002),                                # FastGen's safety: sigma = r + 1e-6
])
def test_partner_sigma_table(sigma, a, r_min, expected_sigma, expected_r):
    s, r = cm.partner_sigma(torch.tensor([sigma], dtype=torch.float64), a, cm.Config(r_min=r_min))
    assert abs(s.item() - expected_sigma) < 1e-12 and abs(r.item() - expected_r) < 1e-12


def test_loss_weights_and_pseudo_huber():
    sigma = torch.tensor([2.0], dtype=torch.float64)
    r = torch.tensor([1.5], dtype=torch.float64)
    c_out = 2 * SD / math.sqrt(4 + SD**2)
    expected = dict(inv_gap=2.0, inv_sqrt_gap=math.sqrt(2), inv_c_out_sq=c_out**-2, inv_c_out=1 / c_out,
                    inv_sigma_sq=0.25, one=1.0)
    for name, value in expected.items():
        assert abs(cm.loss_weight(sigma, r, cm.Config(weighting=name)).item() - value) < 1e-12, name
    f = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    loss, d = cm.distance_loss(f, torch.zeros_like(f), sigma, r, cm.Config(weighting="one", huber_c=1e-8))
    assert d.item() == 5.0 and abs(loss.item() - 5.0) < 1e-7  # c ~ 0: the plain L2 norm, not squared
    loss, _ = cm.distance_loss(f, torch.zeros_like(f), sigma, r, cm.Config(weighting="one", huber_c=0.06))
    assert abs(loss.item() - (math.sqrt(25 + 0.06**2) - 0.06)) < 1e-12


def test_target_and_gradient_pass_share_dropout_masks():
    """With x_r = x_sigma and r = sigma the target must equal the gradient pass bitwise (dropout 0.5 on)."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (3,), dropout=0.5).double()).train()
    x = torch.randn(32, 3, dtype=torch.float64)
    sigma = torch.rand(32, dtype=torch.float64) + 0.5
    target = cm.consistency_target(net, x, x, sigma, None, cm.Config())
    f = cm.consistency_fn(net, x, sigma, None, cm.Config())
    assert torch.equal(target, f)
    assert not torch.equal(cm.consistency_fn(net, x, sigma, None, cm.Config()), f)  # masks do differ otherwise



@pytest.mark.parametrize("distill, solver, guidance, teacher_passes", [
    (False, "euler", 1.0, 0), (True, "euler", 1.0, 1), (True, "heun", 1.0, 2), (True, "euler", 2.0, 2)])
def test_passes_per_step(distill, solver, guidance, teacher_passes):
    """Forward passes of one step, each over the whole batch: the net once without grad (the target) and once with
    it; a CD teacher once per PF-ODE evaluation (Euler 1, Heun 2), twice per evaluation with CFG (FastGen CM.py,
    ode_solver), always without grad."""
    torch.manual_seed(0)
    net, teacher = (nets.build_net("mlp", (3,), label_dim=4, dropout=0.2).double().train() for _ in range(2))
    calls = {net: [], teacher: []}
    for m in calls:
        m.register_forward_pre_hook(lambda m, args: calls[m].append((args[0].shape[0], torch.is_grad_enabled())))
    y = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).double()
    cfg = cm.Config(teacher_solver=solver, guidance_scale=guidance)
    cm.loss(net, torch.randn(8, 3, dtype=torch.float64), y, cfg, 1, torch.Generator().manual_seed(0),
            teacher=teacher.eval() if distill else None, images=0)
    assert calls[net] == [(8, False), (8, True)] and calls[teacher] == [(8, False)] * teacher_passes

def test_r_zero_targets_the_data():
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (2,)).double())
    x = torch.randn(4, 2, dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    target = cm.consistency_target(net, x, x + 1, r, None, cm.Config(r_min=0.0))
    assert torch.equal(target[0], x[0]) and torch.equal(target[2], x[2]) and not torch.equal(target[1], x[1])


# --- Batch target ------------------------------------------------------------------------------------------------

def test_batch_denoise_is_the_posterior_mean_over_the_batch_and_label():
    """Against the definition written out (float64, 1e-12), without and with labels; an all-zero label row is a class
    of its own (here: only the sample itself)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, 3, dtype=torch.float64, generator=g)
    scale = 0.5 + torch.rand(9, dtype=torch.float64, generator=g)
    std = 0.5 + torch.rand(9, dtype=torch.float64, generator=g)
    x_t = bc(scale, x) * x + bc(std, x) * torch.randn(x.shape, dtype=torch.float64, generator=g)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1]), 3).double()
    y[8] = 0  # an all-zero label row: its own class
    for labels in (None, y):
        expected = posterior_mean_by_definition(x, x_t, scale, std, labels)
        assert (expected - x).abs().max() > 0.3  # the weights are spread, not one-hot on the own sample
        torch.testing.assert_close(cm.batch_denoise(x, x_t, scale, std, labels), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(cm.batch_denoise(x, x_t, scale, std, y)[8], x[8])


def test_the_weights_benchmark_reads_the_weights_batch_denoise_sums():
    """benchmarks/batch_target_weights.py writes the softmax out again to report it: its weights times the batch are
    cm.batch_denoise (float64, 1e-12)."""
    from conftest import benchmark
    btw = benchmark("batch_target_weights")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 2, dtype=torch.float64, generator=g)
    sigma = torch.rand(16, dtype=torch.float64, generator=g) + 0.5
    x_sigma = x + bc(sigma, x) * torch.randn(x.shape, dtype=torch.float64, generator=g)
    w = btw.posterior_weights(x, x_sigma, sigma)
    torch.testing.assert_close((w @ x.flatten(1)).reshape(x.shape), cm.batch_denoise(x, x_sigma, torch.ones_like(sigma), sigma),
                               rtol=1e-12, atol=1e-12)


def test_batch_target_of_one_sample_is_the_ct_target():
    """With a batch of one, E[x | x_sigma] = x and the Euler step to r lands on x + r eps (float64, 1e-12)."""
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(1, 5, dtype=torch.float64, generator=g) for _ in range(2))
    sigma, r = torch.tensor([1.7], dtype=torch.float64), torch.tensor([1.2], dtype=torch.float64)
    x_sigma = x + sigma * eps
    x_r = cm.ct_partner(x, x_sigma, eps, sigma, r, None, cm.Config(batch_target=True))
    torch.testing.assert_close(x_r, x + r * eps, rtol=1e-12, atol=1e-12)
    assert torch.equal(cm.ct_partner(x, x_sigma, eps, sigma, r, None, cm.Config()), x + r * eps)


def test_batch_target_follows_the_exact_ode_step_of_gaussian_data():
    """Data N(0, S^2 I): E[x | x_sigma] = S^2 / (S^2 + sigma^2) x_sigma, and the Euler step with it is the target a
    perfect teacher gives. The single-sample x + r eps is that step plus (sigma - r) / sigma (x - E[x | x_sigma]);
    the batch target (4096 samples) is within a tenth of that error."""
    g = torch.Generator().manual_seed(0)
    x = S * torch.randn(4096, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(x.shape, dtype=torch.float64, generator=g)
    sigma = torch.exp(torch.randn(4096, dtype=torch.float64, generator=g) - 1)  # 0.05 to 5
    r = 0.6 * sigma
    x_sigma = x + bc(sigma, x) * eps
    D = exact_denoiser(x_sigma, sigma)
    exact = x_sigma + bc(r - sigma, x) * (x_sigma - D) / bc(sigma, x)
    rms = {}
    for batch_target in (False, True):
        x_r = cm.ct_partner(x, x_sigma, eps, sigma, r, None, cm.Config(batch_target=batch_target))
        rms[batch_target] = (x_r - exact).square().mean().sqrt().item()
    assert rms[True] < 0.1 * rms[False]


def test_ct_loss_uses_the_batch_target_and_its_value_at_r_zero():
    """cm.loss with batch_target, replayed by hand (the same generator draws) with the posterior mean written out:
    at stage 0 with r_min = 0 many partners sit at r = 0, where the target is E[x | x_sigma] itself."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("mlp", (2,)).double())
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = cm.Config(batch_target=True, r_min=0.0, P_mean=0.0, sigma_data=1.0)
    per_example, logs = cm.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(2), images=0)
    g = torch.Generator().manual_seed(2)
    sigma = cm.sample_sigma(64, cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, g, x.device)
    sigma, r = cm.partner_sigma(sigma, cm.ect_ratio(0, cfg), cfg)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    x_sigma = x + bc(sigma, x) * eps
    D = posterior_mean_by_definition(x, x_sigma, torch.ones_like(sigma), sigma)
    x_r = x_sigma + bc(r - sigma, x) * (x_sigma - D) / bc(sigma, x)
    target = torch.where(bc(r, x) > 0, cm.consistency_fn(net, x_r, r.clamp_min(1e-12), None, cfg), x_r)
    d = (cm.consistency_fn(net, x_sigma, sigma, None, cfg) - target).norm(dim=1)
    assert 0 < (r == 0).sum() < 64
    torch.testing.assert_close(per_example, cm.loss_weight(sigma, r, cfg) * ((d**2 + cfg.huber_c**2).sqrt() - cfg.huber_c),
                               rtol=1e-10, atol=1e-12)


# --- CD exact oracle ---------------------------------------------------------------------------------------------

class RawFromDenoiser(nn.Module):
    """A closed-form x0-predictor D(x_sigma, sigma) as a raw EDM net (so that c_skip x + c_out F = D)."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x_in, c_noise, y=None):
        sigma = torch.exp(4 * c_noise)
        x = x_in * bc((sigma**2 + SD**2).sqrt(), x_in)
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / (sigma**2 + SD**2).sqrt()
        return (self.D(x, sigma) - bc(c_skip, x) * x) / bc(c_out, x)


def exact_denoiser(x, sigma):
    return bc(S**2 / (S**2 + sigma**2), x) * x  # E[x | x_sigma] for x ~ N(0, S^2)


def exact_consistency(x, sigma):
    return bc(S / (S**2 + sigma**2).sqrt(), x) * x  # the PF-ODE scales x_sigma with sqrt(S^2 + sigma^2)


@pytest.mark.parametrize("solver, order", [("euler", 2), ("heun", 3)])
def test_cd_with_exact_teacher_and_student(solver, order):
    """Exact teacher and exact consistency function: the CD distance is only the teacher step's local error,
    O(gap^2) for Euler and O(gap^3) for Heun, so it vanishes as sigma - r shrinks (halving the gap divides it by
    ~2^order)."""
    x0 = S * torch.randn(512, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((512,), 2.0, dtype=torch.float64)
    x_sigma = x0 + bc(sigma, x0) * torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    teacher, student = RawFromDenoiser(exact_denoiser), RawFromDenoiser(exact_consistency)
    cfg = cm.Config(teacher_solver=solver)
    distances = []
    for gap in (0.2, 0.1, 0.05):
        r = sigma - gap
        x_r = cm.teacher_step(teacher, x_sigma, sigma, r, None, cfg)
        f = cm.consistency_fn(student, x_sigma, sigma, None, cfg)
        target = cm.consistency_target(student, x0, x_r, r, None, cfg)
        distances.append(cm.distance_loss(f, target, sigma, r, cfg)[1].mean().item())
    assert distances[0] > distances[1] > distances[2] and distances[2] < 1e-3
    for big, small in zip(distances, distances[1:]):
        assert 0.7 * 2**order < big / small < 1.4 * 2**order
    assert (cm.consistency_fn(student, x_sigma, sigma, None, cfg) - exact_consistency(x_sigma, sigma)).abs().max() < 1e-12


def test_copied_helpers_stay_identical():
    import inspect
    for name in ("sample_sigma", "bcast", "denoise"):
        assert inspect.getsource(getattr(cm, name)) == inspect.getsource(getattr(diffusion, name)), name
    assert "# Copied from diffusion.py: denoise" in inspect.getsource(cm)


def test_sampler_with_exact_consistency_function():
    eps = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = cm.Config()
    student = RawFromDenoiser(exact_consistency)
    x = cm.sample(student, eps, cfg)
    s0 = cfg.sample_sigmas[0]
    torch.testing.assert_close(x, s0 * eps * S / math.sqrt(S**2 + s0**2))
    x2 = cm.sample(student, eps, cfg, sigmas=(80.0, 1.0, 0.0), gen=torch.Generator().manual_seed(3))
    assert abs(x2.std().item() - S) < 0.01


# --- 2-D quality -----------------------------------------------------------------------------------------------------

def test_toy_ct_and_cd_beat_the_teachers_one_step_euler(toy_teacher, toy_ct):
    """600 steps each (lr 3e-4, 15 kimg stages: a reaches 0.999 at step ~530), 128-wide MLP. Measured (sliced W2 to 4096
    held-out points): teacher 1-step Euler 0.70; CT from scratch 0.087, CT tuned from the teacher (ECT) 0.062, CD 0.083."""
    teacher, _, d_euler, held_out, eps = toy_teacher
    ct, cfg = toy_ct
    distances = {"ct": sliced_wasserstein(cm.sample(ct, eps, cfg), held_out)}
    for name, init, t in (("ct_tuned", True, None), ("cd", True, teacher)):
        torch.manual_seed(0)
        net = nets.build_net("mlp", (2,), width=128, depth=3)
        if init:
            net.load_state_dict(teacher.state_dict())
        distances[name] = sliced_wasserstein(cm.sample(train_toy(cm, cfg, net, 600, 3e-4, teacher=t), eps, cfg), held_out)
    print("SW2:", {k: round(v, 3) for k, v in distances.items()}, "teacher euler-1", round(d_euler, 3))
    for d in distances.values():
        assert d < 0.2 and d < 0.3 * d_euler
