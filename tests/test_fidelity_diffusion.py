"""diffusion.py pinned value by value (float64): the per-example EDM loss of a linear "net" recomputed independently
(truncated log-normal sigma, lambda(sigma) = 1/c_out^2, sum over dimensions), Config defaults (EDM Table 1) and the
CIFAR-10 preset (EDM Table 7)."""
import pytest
import torch

import diffusion
from conftest import param_grads
from test_fidelity_cm import LinF, data, edm_D, lognormal


@pytest.mark.parametrize("labels", [False, True])
def test_loss_value_and_gradient(labels):
    """loss_i = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 * sum_D (D(x + sigma eps, sigma) - x)^2, mse log =
    sum / D. Tolerance 1e-10 (value and gradient)."""
    cfg = diffusion.Config()
    net = LinF(0).train()
    x, y = data(B=10, labels=labels)
    got, logs = diffusion.loss(net, x, y, cfg, 1, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    sigma = lognormal(torch.rand(10, generator=g, dtype=torch.float64), -1.2, 1.2, 0.002, 80.0)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    c_out_sq = sigma**2 * 0.25 / (sigma**2 + 0.25)
    err = (edm_D(net, x + sigma[:, None] * eps, sigma, y) - x).square().sum(dim=1)
    want = err / c_out_sq
    torch.testing.assert_close(logs["t"], sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(logs["mse"], err.detach() / x.shape[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(param_grads(net, got), param_grads(net, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_config_defaults_are_edm_table_1():
    c = diffusion.Config()
    assert (c.P_mean, c.P_std, c.sigma_data, c.sigma_min, c.sigma_max, c.sample_steps, c.rho) == (
        -1.2, 1.2, 0.5, 0.002, 80.0, 18, 7.0)


def test_cifar10_preset_is_edm_table_7():
    """Batch 512, 200 Mimg = 390,625 steps, Adam lr 1e-3 (eps 1e-8) warmed up over 10 Mimg = 19,531 steps, dropout
    0.13, EDM's augmentation pipeline at p = 0.12 (its x-flips included, no dataset x-flips); TF32 off."""
    import recipe
    _, cfg, _, _ = recipe.resolve_config(["--method", "diffusion", "--data", "toy", "--preset", "cifar10"])
    want = dict(net="ddpmpp", dropout=0.13, cond=False, xflip=False, augment=0.12, augment_pipe="edm", batch=512,
                steps=390_625, optimizer="adam", lr=1e-3, betas=(0.9, 0.999), adam_eps=1e-8, lr_warmup=19_531,
                ema=(0.9999,), precision="fp32", tf32="off", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    for k, v in want.items():
        got = tuple(cfg[k]) if isinstance(v, tuple) else cfg[k]
        assert got == v, f"cifar10.{k}: {got} != {v}"
