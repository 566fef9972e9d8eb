"""EDM diffusion: denoiser training with EDM preconditioning, and the deterministic Heun sampler.
Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364v2. The teacher every distillation here starts from, and the "plain step" JVP methods are
measured against. Reference implementation (for the sigma clamp and the truncated sampling): NVIDIA FastGen, commit
34f30e8; `noise_schedule.py` below means fastgen/networks/noise_schedule.py.

Convention: EDM noise level sigma, small = data, x_sigma = x + sigma eps, sigma in [sigma_min, sigma_max].
PF-ODE: dx/dsigma = (x - D(x, sigma)) / sigma.

| paper            | code            | meaning                                       | shape      |
|------------------|-----------------|-----------------------------------------------|------------|
| x, y             | x, y            | data, one-hot labels (all-zero row: null)     | (B, *D)    |
| sigma            | sigma           | noise level, float64                          | (B,)       |
| sigma_data       | sigma_data      | data std (default 0.5)                        |            |
| F_theta          | net             | raw network                                   |            |
| D_theta          | denoise(...)    | c_skip x + c_out F(c_in x, c_noise)           | (B, *D)    |
| lambda(sigma)    | weight          | (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 | (B,)     |

Network call: `F = net(x_in, c_noise, y=y)` with x_in = c_in x_sigma (B, *D), c_noise = ln(sigma) / 4 (B,),
y one-hot or None. Any EDM-preconditioned net works, including EDM's own (same parameter names in nets.py).

Implemented: log-normal sigma (truncated to the sampler's range), the EDM loss (Eq. 2 with lambda = 1/c_out^2),
the Heun sampler (Alg. 1, no churn; 18 steps = 35 network evaluations) and its 1-step Euler special case.
Deviation, off by default: the batch's posterior mean as the target (batch_target; for 2-D points).
Not implemented: stochastic sampling (S_churn).
"""
import math
from dataclasses import dataclass, fields

import torch

# --- Config -----------------------------------------------------------------------------------------------------------


def check_ranges(cfg, ranges):
    """ValueError naming the first field outside its range: "bool", "finite", "> a", ">= a" or "in (a, b]" (any
    brackets). NaN and inf are never in range."""
    for name, rule in ranges.items():
        v = getattr(cfg, name)
        if rule == "bool":
            ok = v in (True, False)
        elif rule.startswith("in "):
            lo, hi = (float(b) for b in rule[4:-1].split(","))
            ok = (lo <= v if rule[3] == "[" else lo < v) and (v <= hi if rule[-1] == "]" else v < hi)
        else:
            bound = -math.inf if rule == "finite" else float(rule.lstrip(">= "))
            ok = math.isfinite(v) and (v >= bound if rule.startswith(">=") else v > bound)
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {v}")


@dataclass
class Config:
    # Training noise levels (EDM Table 1): ln(sigma) ~ N(P_mean, P_std^2)
    P_mean: float = -1.2  # finite
    P_std: float = 1.2  # > 0
    sigma_data: float = 0.5  # > 0
    # sampler's range; training sigma is truncated to it (Deviation: EDM does not truncate, which changes about 2e-5
    # of the probability mass)
    sigma_min: float = 0.002  # > 0, < sigma_max
    sigma_max: float = 80.0  # > 0
    # Heun sampler (EDM Alg. 1, deterministic)
    sample_steps: int = 18  # >= 1
    rho: float = 7.0  # > 0
    # Deviation (not in EDM): the target x replaced by the batch's E[x | x_sigma], the reference-batch posterior of
    # "Stable Target Field" (arXiv:2302.00670; cm.py's batch target); for low-dimensional data (no preset sets it)
    batch_target: bool = False  # bool

    def __post_init__(self):
        check_ranges(self, RANGES)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} and {self.sigma_max}")

    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


RANGES = dict(P_mean="finite", P_std="> 0", sigma_data="> 0", sigma_min="> 0", sigma_max="> 0", sample_steps=">= 1",
              rho="> 0", batch_target="bool")  # every numeric field's range, as its comment states
TIME_BINS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 1000.0)  # edges in sigma for train.py's loss-by-time log
NET_NEEDS = dict()  # a plain EDM net: no second time input, no log-variance head
TEACHERS = ()  # trained from data only
INIT = ("diffusion",)  # --init: continue from a diffusion checkpoint
NEEDS_INIT = False  # trains from scratch

# --- Time distribution ------------------------------------------------------------------------------------------------


def sample_sigma(n, P_mean, P_std, sigma_lo, sigma_hi, gen, device):
    """Truncated log-normal, float64 (n,): ln(sigma) ~ N(P_mean, P_std^2) restricted to [sigma_lo, sigma_hi],
    by inverse CDF (FastGen noise_schedule.py, EDMNoiseSchedule._truncated_lognormal_sample)."""
    a = torch.special.ndtr(torch.tensor((math.log(sigma_lo) - P_mean) / P_std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((math.log(sigma_hi) - P_mean) / P_std, dtype=torch.float64))
    u = a + (b - a) * torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    return torch.exp(P_mean + P_std * torch.special.ndtri(u)).clamp(sigma_lo, sigma_hi)

# --- Parameterization -------------------------------------------------------------------------------------------------


def check_shape(out, shape, what, fix):
    """ValueError unless out.shape == shape: a net output of another shape would broadcast silently in the loss.
    what: "<where>: the net's <output> must have shape <symbols>"; compares shapes only (no host sync)."""
    if out.shape != shape:
        raise ValueError(f"{what} = {tuple(shape)}, got {tuple(out.shape)}: {fix}")


def bcast(a, x):
    """(B,) -> (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return a.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)


def denoise(net, x, sigma, y, sigma_data):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y), EDM Table 1; coefficients in float64."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.clamp_min(1e-6).log() / 4  # the reference clamps before the log
    F = net(bcast(c_in, x) * x, c_noise.to(x.dtype), y=y)
    check_shape(F, x.shape, "denoise: the net's output F must have its input's shape (B, *D)", "one per entry")
    return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


class FlowVelocity(torch.nn.Module):
    """A diffusion model read as a rectified-flow velocity, the teacher of flow-map distillation (flowmap.py): on
    z_t = (1 - t) x + t eps, x_sigma = z_t / (1 - t) at sigma = t / (1 - t), so E[eps - x | z_t] = (z_t - D) / t =
    A z_t - B F(z_t / s, ln(sigma) / 4) with s = sqrt(t^2 + sigma_data^2 (1 - t)^2), A = (t - sigma_data^2 (1 - t))
    / s^2, B = sigma_data / s (denoise's coefficients, the 1 / t cancelled). Called as the flow nets are,
    u = net(z, t, r, y), r unused (u(z, t, r) = v(z, t)); t is clamped to the teacher's reach, sigma in
    [sigma_min, sigma_max] (Config's: the sampler's range)."""

    def __init__(self, net, sigma_data, sigma_min=Config.sigma_min, sigma_max=Config.sigma_max):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.t_min, self.t_max = sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)

    def forward(self, z, t, r=None, y=None):
        sd, t = self.sigma_data, t.double().clamp(self.t_min, self.t_max)
        s = (t**2 + sd**2 * (1 - t) ** 2).sqrt()
        F = self.net(bcast(1 / s, z) * z, ((t / (1 - t)).log() / 4).to(z.dtype), y=y)
        check_shape(F, z.shape, "FlowVelocity: the net's output F must have its input's shape (B, *D)", "one per row")
        return bcast((t - sd**2 * (1 - t)) / s**2, z) * z - bcast(sd / s, z) * F.to(z.dtype)


# Copied from cm.py: batch_denoise
def batch_denoise(x, x_t, scale, std, y=None):
    """E[x | x_t] when the data are the batch's own samples x_1..x_B and x_t = scale x + std n (scale, std: (B,)):
    sum_k w_k x_k, w_k = softmax_k(-||x_t - scale x_k||^2 / (2 std^2)) over the samples with x_t's label (y one-hot or
    all-zero rows). The reference-batch estimate of the posterior mean of Xu et al. 2023 ("Stable Target Field",
    arXiv:2302.00670), which Wang et al. 2024 (SCT, arXiv:2410.18958) use for consistency tuning. Each row's
    ||x_t||^2 drops out of its softmax, leaving one matmul. float64 (B, *D)."""
    xs, xt = x.flatten(1).double(), x_t.flatten(1).double()
    scale, std = scale.double()[:, None], std.double()[:, None]
    logits = (xt * (scale / std**2)) @ xs.T  # in place below: B^2 entries, allocated once
    logits.addcmul_(scale**2 / (2 * std**2), xs.square().sum(dim=1)[None, :], value=-1)
    if y is not None:
        ids = torch.where(y.flatten(1).any(dim=1), y.flatten(1).argmax(dim=1), -1)
        logits.masked_fill_(ids[:, None] != ids[None, :], -math.inf)
    return (logits.softmax(dim=1) @ xs).reshape(x.shape)


# --- Loss -------------------------------------------------------------------------------------------------------------


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example EDM loss (B,): lambda(sigma) * sum over dims of (D(x + sigma eps, sigma) - x)^2 (EDM sums over
    pixels); with cfg.batch_target the batch's E[x | x_sigma] in place of x. step, teacher and images are unused
    (the signature is the same in every method)."""
    sigma = sample_sigma(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, gen, x.device)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x_sigma = x + bcast(sigma, x) * eps
    D = denoise(net, x_sigma, sigma, y, cfg.sigma_data)
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2  # = 1 / c_out^2
    with torch.no_grad():  # the same minimiser E[x | x_sigma], a target with less noise where sigma is large
        target = batch_denoise(x, x_sigma, torch.ones_like(sigma), sigma, y) if cfg.batch_target else x.double()
    err = (D.double() - target).flatten(1).square().sum(dim=1)
    return weight * err, dict(t=sigma, mse=err.detach() / x[0].numel())

# --- Sampler ----------------------------------------------------------------------------------------------------------


def karras_sigmas(n, sigma_min, sigma_max, rho):
    """n noise levels from sigma_max down to sigma_min (EDM Eq. 5), then 0."""
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample(net, eps, cfg, y=None, sigmas=None):
    """Deterministic Heun sampler, EDM Alg. 1 without churn: 2 n - 1 network evaluations for n steps.
    With sigmas = (sigma_max, 0) it is one Euler step: x = D(sigma_max eps, sigma_max)."""
    sigmas = karras_sigmas(cfg.sample_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho) if sigmas is None else \
        torch.as_tensor(sigmas, dtype=torch.float64)
    sigmas = sigmas.to(eps.device)
    x = eps * sigmas[0].to(eps.dtype)
    ones = torch.ones(eps.shape[0], dtype=torch.float64, device=eps.device)
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(net, x, s_cur * ones, y, cfg.sigma_data)) / s_cur.to(x.dtype)
        x_next = x + (s_next - s_cur).to(x.dtype) * d
        if s_next > 0:  # second-order correction
            d_next = (x_next - denoise(net, x_next, s_next * ones, y, cfg.sigma_data)) / s_next.to(x.dtype)
            x_next = x + (s_next - s_cur).to(x.dtype) * (d + d_next) / 2
        x = x_next
    return x

# --- Presets ----------------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads.


PRESETS = {
    # EDM's CIFAR-10 DDPM++ recipe (EDM Table 7: batch 512, Adam lr 1e-3 warmed up over 10 Mimg, dropout 0.13,
    # 200 Mimg), with EDM's augmentation pipeline at p = 0.12 (9-d labels, augment_dim=9 as EDM's checkpoints) and
    # no dataset x-flips. Deviation: constant EMA 0.9999 instead of EDM's 0.5 Mimg half-life.
    "cifar10": dict(
        net="ddpmpp", dropout=0.13, cond=False, xflip=False, augment=0.12, augment_pipe="edm", batch=512, steps=390_625,
        optimizer="adam", lr=1e-3, betas=(0.9, 0.999), adam_eps=1e-8, lr_warmup=19_531, ema=(0.9999,),
    ),
    # 2-D points on CPU: the teacher and --init of the toy sCD / CD / sCT / CT runs. 4000 steps, about a minute with
    # train.py --threads 2. The net takes Fourier features of the point (mlp-fourier): the plain MLP never leaves the
    # best linear denoiser on thin spirals. sigma_data 1: the toy points have unit variance per axis (EDM: the data's
    # std). Deviation: P_mean -0.5, EDM's -1.2 plus ln 2, so that sigma / sigma_data is drawn as in EDM. The numbers
    # behind both: docs/presets.md.
    "toy": dict(
        net="mlp-fourier", cond=False, batch=256, steps=4000, optimizer="adam", lr=1e-3, lr_warmup=100, ema=(0.999,),
        ema_warmup=True, sample_steps=32, sigma_data=1.0, P_mean=-0.5,
    ),
}
