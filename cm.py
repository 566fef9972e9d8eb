"""Consistency models: consistency training (CT) and distillation (CD) with the ECT curriculum on the gap sigma - r.
Song et al., "Consistency Models", arXiv:2303.01469v2; Geng et al., "Consistency Models Made Easy" (ECT),
arXiv:2406.14548v2. Formulas and defaults follow the reference implementation (NVIDIA FastGen), REFERENCE §2.

Convention: EDM noise level sigma, small = data, x_sigma = x + sigma eps. The consistency function is an
EDM-preconditioned network, f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4), trained so that
f(x_sigma, sigma) = f(x_r, r) for the less noisy partner r = r(sigma) < sigma on the same trajectory.

| paper        | code        | meaning                                                        | shape   |
|--------------|-------------|----------------------------------------------------------------|---------|
| x, eps       | x, eps      | data, noise N(0, I)                                            | (B, *D) |
| t (sigma)    | sigma       | noise level, truncated log-normal, float64                     | (B,)    |
| r            | r           | partner level r(sigma) = max(sigma - Delta(sigma), r_min)      | (B,)    |
| x_r          | x_r         | partner point: CT x + r eps or the batch target; CD ODE step   | (B, *D) |
| a            | ratio       | ECT ratio 1 - q^-(stage + 1), capped at ratio_limit            |         |
| f_theta      | f           | consistency function (EDM preconditioning)                     | (B, *D) |
| f_theta-     | target      | sg(f(x_r, r)) of the online net, same dropout masks            | (B, *D) |
| d            | d           | ||f - target|| over all dimensions, float64                    | (B,)    |

Network call: `F = net(x_in, c_noise, y=y)` with x_in = c_in x (B, *D), c_noise = ln(sigma) / 4 (B,), y one-hot or
None (all-zero row: null label). The CD teacher is a frozen EDM-preconditioned net with the same call (a diffusion.py
checkpoint). Any EDM net works unchanged; training usually starts from one (--init, "consistency tuning").

Implemented: CT with shared noise and the online network as target (no EMA target), CD with one Euler or Heun step of
the teacher's PF-ODE and CFG, the ECT r(sigma) map with its stage schedule in images seen, pseudo-Huber loss with the
reference's weightings, optional boundary-condition parameterisation, 1-step and multi-step samplers, and (not in the
reference) CT's lower-variance batch target, batch_target below.
"""
import math
from dataclasses import dataclass

import torch

# --- Config ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    # sigma ~ truncated log-normal on [sigma_min, sigma_max] (REFERENCE §2.5, CIFAR-10)
    P_mean: float = -1.1
    P_std: float = 2.0
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # ECT curriculum (REFERENCE §2.1): the ratio a steps up every kimg_per_stage thousand images (global batch)
    q: float = 2.0
    kimg_per_stage: float = 6400.0
    ratio_limit: float = 0.999
    r_min: float = 0.002  # floor of r: 0.002 = the reference (target = net at 0.002); 0 = ECT (target = data at r = 0)
    # Loss: pseudo-Huber sqrt(d^2 + c^2) - c of the per-sample L2 distance, times a weight (REFERENCE §2.2)
    huber_c: float = 1e-8  # ~plain L2 norm (CIFAR-10); 0.06 on ImageNet-64
    weighting: str = "inv_gap"  # inv_gap 1/(sigma - r) | inv_sqrt_gap | inv_c_out_sq | inv_c_out | inv_sigma_sq | one
    boundary: bool = False  # True: CM boundary form, f(x, sigma_min) = x exactly (ECT's evaluation form); the
    # reference and EDM initialisations use plain EDM coefficients (False), where f(x, 0.002) = x only approximately
    # CT's partner point x_r. False (ECT, the reference): x + r eps, the sample's own noise path, which is the Euler
    # step of the PF-ODE with D(x_sigma) = x, a one-sample estimate of E[x | x_sigma]. True: the Euler step with the
    # batch's estimate of E[x | x_sigma] (batch_denoise), a lower-variance target. Deviation: the toy presets use it.
    batch_target: bool = False
    # Distillation (--teacher): x_r from one step of the teacher's PF-ODE
    teacher_solver: str = "euler"  # "euler" (the reference) | "heun"
    guidance_scale: float = 1.0  # CFG on the teacher, D + (w - 1)(D - D_null)
    # Sampler: the sigma list (REFERENCE §1.4): the reference's 1-step default starts at sigma_998 = 79.5638
    sample_sigmas: tuple = (79.5638, 0.0)

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.teacher_solver not in ("euler", "heun"):
            raise ValueError(f"unknown teacher_solver {self.teacher_solver!r}; choose euler or heun")
        if not (0 < self.sigma_min < self.sigma_max and 0 <= self.r_min < self.sigma_max and 0 < self.ratio_limit < 1):
            raise ValueError("need 0 < sigma_min < sigma_max, 0 <= r_min < sigma_max and 0 < ratio_limit < 1")
        s = tuple(self.sample_sigmas)
        if len(s) < 2 or any(a <= b for a, b in zip(s, s[1:])) or s[-1] != 0:
            raise ValueError(f"sample_sigmas must decrease to 0 with at least two entries, got {s}")


WEIGHTINGS = ("inv_gap", "inv_sqrt_gap", "inv_c_out_sq", "inv_c_out", "inv_sigma_sq", "one")
TIME_BINS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 1000.0)  # edges in sigma for train.py's loss-by-time log
NET_NEEDS = dict()  # a plain EDM net
TEACHERS = ("diffusion",)  # --teacher: a denoiser D(x, sigma) whose PF-ODE the CD step follows (a CM is not one)
INIT = ("diffusion", "cm", "tcm", "scm")  # --init: any EDM-preconditioned checkpoint
NEEDS_INIT = True  # ECT tunes a pretrained diffusion model (--init)

# --- Time distribution -------------------------------------------------------------------------------------------


# Copied from diffusion.py: sample_sigma
def sample_sigma(n, P_mean, P_std, sigma_lo, sigma_hi, gen, device):
    """Truncated log-normal, float64 (n,): ln(sigma) ~ N(P_mean, P_std^2) restricted to [sigma_lo, sigma_hi],
    by inverse CDF (REFERENCE §1.3)."""
    a = torch.special.ndtr(torch.tensor((math.log(sigma_lo) - P_mean) / P_std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((math.log(sigma_hi) - P_mean) / P_std, dtype=torch.float64))
    u = a + (b - a) * torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    return torch.exp(P_mean + P_std * torch.special.ndtri(u)).clamp(sigma_lo, sigma_hi)


def ect_ratio(images, cfg):
    """a = min(1 - q^-(stage + 1), ratio_limit), stage = floor(images / (1000 kimg_per_stage)). `images` counts the
    training images seen before this step with the true global batch (REFERENCE §2.1, §9.7)."""
    stage = math.floor(images / (1000 * cfg.kimg_per_stage))
    return min(1 - cfg.q ** -(stage + 1), cfg.ratio_limit)


def partner_sigma(sigma, ratio, cfg):
    """(sigma, r): r = max(sigma - Delta, r_min), Delta = sigma (1 - a)(1 + 8 sigmoid(-sigma)) (ECT); where the floor
    leaves r >= sigma - 1e-6, sigma moves to r + 1e-6 (the reference's safety). float64."""
    delta = sigma * (1 - ratio) * (1 + 8 * torch.sigmoid(-sigma))
    r = (sigma - delta).clamp_min(cfg.r_min)
    sigma = torch.where(r >= sigma - 1e-6, r + 1e-6, sigma)
    return sigma, r

# --- Parameterization --------------------------------------------------------------------------------------------


# Copied from diffusion.py: bcast
def bcast(a, x):
    """(B,) -> (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    return a.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)


# Copied from diffusion.py: denoise
def denoise(net, x, sigma, y, sigma_data):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y), EDM Table 1; coefficients in float64."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.clamp_min(1e-6).log() / 4  # the reference clamps before the log
    F = net(bcast(c_in, x) * x, c_noise.to(x.dtype), y=y)
    return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


def consistency_fn(net, x, sigma, y, cfg):
    """f(x, sigma). Plain EDM coefficients (the reference), or with cfg.boundary the CM form (CM paper App. C)
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)."""
    if not cfg.boundary:
        return denoise(net, x, sigma, y, cfg.sigma_data)
    sd, shifted = cfg.sigma_data, sigma - cfg.sigma_min
    c_skip = sd**2 / (shifted**2 + sd**2)
    c_out = shifted * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    F = net(bcast(c_in, x) * x, (sigma.clamp_min(1e-6).log() / 4).to(x.dtype), y=y)
    return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


def batch_denoise(x, x_t, scale, std, y=None):
    """E[x | x_t] when the data are the batch's own samples x_1..x_B and x_t = scale x + std n (scale, std: (B,)):
    sum_k w_k x_k, w_k = softmax_k(-||x_t - scale x_k||^2 / (2 std^2)) over the samples with x_t's label (y one-hot or
    all-zero rows). The reference-batch estimate of the posterior mean of Xu et al. 2023 ("Stable Target Field",
    arXiv:2302.00670), which Wang et al. 2024 (SCT, arXiv:2410.18958) use for consistency tuning. Each row's
    ||x_t||^2 drops out of its softmax, leaving one matmul. float64 (B, *D)."""
    xs, xt = x.flatten(1).double(), x_t.flatten(1).double()
    scale, std = scale.double()[:, None], std.double()[:, None]
    logits = (scale * (xt @ xs.T) - scale**2 * xs.square().sum(dim=1) / 2) / std**2
    if y is not None:
        ids = torch.where(y.flatten(1).any(dim=1), y.flatten(1).argmax(dim=1), -1)
        logits = logits.masked_fill(ids[:, None] != ids[None, :], -math.inf)
    return (logits.softmax(dim=1) @ xs).reshape(x.shape)


def ct_partner(x, x_sigma, eps, sigma, r, y, cfg):
    """CT's x_r (no grad): x + r eps (ECT), or with cfg.batch_target the Euler step from x_sigma to r of the PF-ODE
    dx/dsigma = (x - D) / sigma with D the batch's E[x | x_sigma] (at D = x it is x + r eps again)."""
    if not cfg.batch_target:
        return x + bcast(r, x) * eps
    D = batch_denoise(x, x_sigma, torch.ones_like(sigma), sigma, y)
    xs = x_sigma.double()
    return (xs + bcast(r - sigma, xs) * (xs - D) / bcast(sigma, xs)).to(x.dtype)


def loss_weight(sigma, r, cfg):
    """Per-sample weight (REFERENCE §2.2), float64."""
    gap = sigma - r
    c_out = sigma * cfg.sigma_data / (sigma**2 + cfg.sigma_data**2).sqrt()
    weights = dict(inv_gap=1 / gap, inv_sqrt_gap=gap.rsqrt(), inv_c_out_sq=c_out**-2, inv_c_out=1 / c_out,
                   inv_sigma_sq=sigma**-2, one=torch.ones_like(sigma))
    return weights[cfg.weighting]

# --- Loss --------------------------------------------------------------------------------------------------------


def teacher_step(teacher, x_sigma, sigma, r, y, cfg):
    """x_r from one step of the teacher's PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma, with CFG on D (equivalently on
    the velocity, REFERENCE §2.3). Euler (the reference) or Heun; no grad."""
    def guided_D(x, s):
        D = denoise(teacher, x, s, y, cfg.sigma_data)
        if cfg.guidance_scale != 1 and y is not None:
            D = D + (cfg.guidance_scale - 1) * (D - denoise(teacher, x, s, torch.zeros_like(y), cfg.sigma_data))
        return D
    step = bcast(r - sigma, x_sigma)
    d = (x_sigma - guided_D(x_sigma, sigma)) / bcast(sigma, x_sigma)
    x_r = x_sigma + step * d
    if cfg.teacher_solver == "heun":
        r_safe = r.clamp_min(1e-12)  # at r = 0 the Euler result is kept
        d_r = (x_r - guided_D(x_r, r_safe)) / bcast(r_safe, x_r)
        x_r = torch.where(bcast(r, x_r) > 0, x_sigma + step * (d + d_r) / 2, x_r)
    return x_r


def distance_loss(f, target, sigma, r, cfg):
    """Per-example weighted pseudo-Huber loss, float64: w(sigma, r) (sqrt(d^2 + c^2) - c), d = ||f - target||."""
    d = (f.double() - target.double()).flatten(1).norm(dim=1)
    return loss_weight(sigma, r, cfg) * ((d**2 + cfg.huber_c**2).sqrt() - cfg.huber_c), d


def loss(net, x, y, cfg, step, gen, teacher=None, images=0):
    """Per-example CM loss (B,) and logs. CT when teacher is None (x_r = x + r eps with the same eps, or the batch
    target: ct_partner), CD with a frozen EDM-preconditioned teacher (eval mode). images: training images seen before this step (global), for the ECT stage.
    The target is the online net under no grad, with the same dropout masks as the gradient pass; `net` may be
    DDP-wrapped (the no-grad target pass uses the bare module)."""
    sigma = sample_sigma(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, gen, x.device)
    ratio = ect_ratio(images, cfg)
    sigma, r = partner_sigma(sigma, ratio, cfg)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x_sigma = x + bcast(sigma, x) * eps
    with torch.no_grad():
        if teacher is None:
            x_r = ct_partner(x, x_sigma, eps, sigma, r, y, cfg)
        else:
            x_r = teacher_step(teacher, x_sigma, sigma, r, y, cfg)
        # Where r = 0 the target is the data; for CT that is x_r itself (x + 0 eps, or the batch's E[x | x_sigma]).
        x_at_0 = x_r if teacher is None else x
        target = target_fn(getattr(net, "module", net), x_at_0, x_r, r, y, cfg)
    # Casts cached by autocast under no_grad have no grad_fn; drop them before the differentiable pass.
    torch.clear_autocast_cache()
    f = consistency_fn(net, x_sigma, sigma, y, cfg)
    per_example, d = distance_loss(f, target, sigma, r, cfg)
    return per_example, dict(t=sigma, gap=sigma - r, d=d.detach(), ratio=torch.full_like(sigma, ratio))


def target_fn(net, x, x_r, r, y, cfg):
    """sg(f(x_r, r)) in train mode with the dropout masks the gradient pass will draw (RNG replayed); x (the data)
    where r = 0 (ECT's floor); NaN-safe (REFERENCE §2.2, §9.6)."""
    devices = [x_r.device] if x_r.device.type == "cuda" else []
    with torch.random.fork_rng(devices):
        target = consistency_fn(net, x_r, r.clamp_min(1e-12), y, cfg)
    target = torch.where(bcast(r, x) > 0, target, x)
    return torch.nan_to_num(target)

# --- Sampler -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, sigmas=None, gen=None):
    """Consistency sampling (REFERENCE §1.4): x = sigma_0 eps; x0 = f(x, sigma_i); re-noise x = x0 + sigma_{i+1} eps_i
    with fresh noise while sigma_{i+1} > 0. Call with the EMA net in eval mode."""
    sigmas = cfg.sample_sigmas if sigmas is None else sigmas
    x = sigmas[0] * eps
    ones = torch.ones(eps.shape[0], dtype=torch.float64, device=eps.device)
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = consistency_fn(net, x, s_cur * ones, y, cfg)
        if s_next > 0:
            x = x0 + s_next * torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    return x0

# --- Presets -----------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads. ECT tunes a diffusion model: pass --init RUN.


EMA3 = (0.9999, 0.99995, 0.9996)
IN64 = dict(cond=True, batch=1024, steps=150_000, optimizer="adam", betas=(0.9, 0.99), lr_ref_steps=2000,
            ema=(0.01, 0.05, 0.10), ema_kind="power", P_mean=-0.8, P_std=1.6, q=4.0, kimg_per_stage=3200.0,
            ratio_limit=0.9961, huber_c=0.06, weighting="inv_c_out_sq", sample_sigmas=(79.5638, 0.0))
TOY = dict(net="mlp", cond=False, batch=256, steps=3200, optimizer="adam", lr=1e-4, betas=(0.9, 0.999), lr_warmup=100,
           ema=(0.999,), ema_warmup=True, kimg_per_stage=50.0, sigma_data=1.0)
PRESETS = {
    # Reference ECT CIFAR-10 (REFERENCE §2.5): 1-step FID 2.92 from EDM's unconditional VP checkpoint.
    # 2-step list recommended there: 80, 0.821, 0.
    "cifar10": dict(
        net="ddpmpp", dropout=0.2, cond=False, batch=512, steps=350_000, optimizer="radam", lr=1e-4,
        betas=(0.9, 0.999), ema=EMA3,
    ),
    # Reference ECT ImageNet-64 with EDM2-S (REFERENCE §2.5; 1-step FID 4.05), from the post-hoc EMA 0.075 checkpoint
    # (convert.py). Dropout at 16x16 and 8x8 only, as the reference's configs. Power EMAs, sigma_rel 0.01 evaluated.
    "imagenet64": dict(IN64, net="edm2-s", dropout_res=(16, 8), dropout=0.4, lr=1e-3),
    # The same with EDM2-XL, from the post-hoc 0.040 checkpoint.
    "imagenet64-xl": dict(IN64, net="edm2-xl", dropout_res=(16, 8), dropout=0.5, lr=7e-4),
    # 2-D points on CPU, CT tuning a diffusion toy run (--init), as ECT tunes EDM's CIFAR-10 model; one minute with
    # train.py --threads 2: stages of 50 kimg, so the ratio reaches its limit after 9 x 50 kimg = 1760 steps of 256.
    # sigma_data 1: the points have unit variance per axis (diffusion.py's toy preset). Deviation: batch_target, the
    # ODE step to r with the batch's E[x | x_sigma] instead of x + r eps. benchmarks/toy_suite.py (a cell is the mean
    # of 8 draws of samples): worst cell 0.43 -> 0.32, arms_ring / checkerboard 0.43 / 0.355 -> 0.28 / 0.32 (seed 1:
    # 0.43 / 0.43 -> 0.31 / 0.36), every other cloud <= 0.31 (README, 2-D suite). The rest of this comment is without
    # it. arms_ring with sigma_data 0.5:
    # 0.60, with 1: 0.42 / 0.46 (seeds 0 / 1), 0.42 from a teacher trained with P_mean -0.5; then P_mean -0.4: 0.46,
    # lr 2e-4: 0.41 / 0.45 (the two teachers), ratio limit 0.99: 0.44, stages of 100 kimg: 0.46, P_std 1.6: 0.44,
    # pseudo-Huber c 0.01: 0.52. Scored as the suite now scores (the mean of 8 draws of samples; one draw, as in the
    # rest of this comment, varies by ~0.04), arms_ring / checkerboard: this preset 0.43 / 0.355 (seed 1: 0.43 / 0.43);
    # ratio limit 0.99: 0.45 / 0.33; P_mean -0.4: 0.45 / 1.39 (collapsed); lr 2e-4: 0.46 / 0.61; c 0.01: 0.45 / 0.32;
    # betas (0.9, 0.99): 0.41 / 0.33; power EMA sigma_rel 0.1: 0.43 / 0.35, 0.02: 0.46 / 0.36; no EMA warm-up (a
    # constant 0.999): 1.16 / 0.90; batch 512 for 1600 steps: 0.39 / 0.60, at lr 1e-4 (the same points): batch 384
    # 0.39 / 0.35, 512 0.37 / 0.39 (seed 1: 0.38 / 0.40), 768 0.365 / 0.345, 1024 0.36 / 0.39; batch 768 for 1067 steps
    # on the whole suite: 8 Gaussians 0.42 (a blurred ring; this preset 0.20), spirals 0.36, TCM on it 0.59 on the 8
    # Gaussians, so not adopted; a squared distance (c 1 / 0.1) weighted 1 / (sigma - r)^2 (a local edit): 0.95 /
    # 0.52, 0.87 / 0.57; weight 1 / sigma^2 with c 1 or 10: diverged (3.7-4.9). More steps: 0.41 / 0.43 / 0.39 /
    # 0.38 (checkerboard 0.37 / 0.36 / 0.42 / 0.41) at steps 1600 / 3200 / 4800 / 6400. The seed moves a cell by up
    # to 0.08 (checkerboard). Everything below: sigma_data 0.5.
    # benchmarks/toy_suite.py ratios (one seed; ~0.1 is run-to-run noise), arms_ring / circles at 3200 steps: 0.60 /
    # 0.31 (from scratch 0.61 / 0.63); lr 2e-4: 0.70 / 0.32; lr 5e-5: 0.60 on arms_ring; ratio limit 0.99: 0.62 / 0.34,
    # 0.95: 0.77 / 0.39; P_mean -0.4: 0.59 / 0.40; pseudo-Huber c 0.01: 0.52 on arms_ring, c 0.1 / 1 (towards a squared
    # L2, the fix MeanFlow's weight needed): arms_ring 0.62 / 0.66, swiss roll 0.59 / 0.58 (this preset 0.37; stages of
    # 100 kimg 0.35, lr 5e-5 0.37); weight 1 instead of 1 / (sigma - r): 0.98 on arms_ring; stages of 25 kimg: 0.60 /
    # 2.06 (circles collapsed to a disc). arms_ring with seed 1: 0.56. Longer runs, arms_ring: 0.57 at 4800 steps; at
    # 6400, 1.72 for seed 0 (collapsed to a filled disc) and 0.61 for seed 1; ratio limit 0.99 at 6400: 0.58 / 0.62,
    # dropout 0.1: 0.66; circles at 6400: 0.26. Along a run (snapshots, toy_suite.py --curve-every), arms_ring: the EMA
    # settles at 0.61-0.69 from step 1400 (the ratio's limit comes at 1760) while the online weights swing between 0.37
    # and 1.54 from one snapshot to the next; a 9600-step run collapses (2.2 at step 6000, a point at 9600). The same
    # plateau with an inverse-sqrt lr decay (lr_ref_steps 400, lr 1e-4 / 2e-4: 0.65 / 0.66), r_min 0 (0.66), the
    # boundary form (0.65), stages of 100 kimg (0.65). Pseudo-Huber c 0.003 / 0.01 settle lower on arms_ring (0.51-0.55)
    # and cost the rest (c 0.003: moons / circles / swiss roll / checkerboard / spirals 0.32 / 0.37 / 0.40 / 0.37 /
    # 0.40; c 0.01: moons / circles / swiss roll 0.37 / 0.46 / 0.49). On mlp-small CT is unstable at batch 256 too (2.06
    # at step 1600, 1.01 at the end), at batch 1024 with c 0.003 it reaches 0.42 at step 2000 and collapses by 3200 (c
    # 1: no collapse, 0.74-1.05 throughout; dropout 0.1: no collapse, 0.61 at the end), and CD (toy-cd) gets 0.35 on
    # arms_ring with it (the mlp: 0.30). Dropout 0.1 on this preset: 0.64 at step 2800, then a collapse (2.12 at 3200).
    # MeanFlow's toy trade (net mlp-small at batch 1024, tuning a diffusion run trained the same way): arms_ring
    # collapsed to a point (6.6; stages of 50 or 200 kimg), swiss roll 0.30 with 200-kimg stages (this preset: 0.37).
    # From scratch nested and thin clouds stayed a blur at this budget, and no setting beat noise on circles /
    # arms_ring (ratio limit 0.99: 0.62 / 0.69; lr 2e-4: 0.55 / 0.66; pseudo-Huber c 0.03: 0.62 / 0.84; P_mean 0.0:
    # 0.65 / 0.65, 1.0: 0.56 / 1.07; sigma_data 1.0: 0.55 on circles); more steps helped slowly (arms_ring: 0.76 at
    # 2000 steps, 0.53 at 4000, 0.49 at 8000).
    "toy": dict(TOY, batch_target=True),
    # CD on points (--init and --teacher a diffusion toy run), 2500 steps: the ratio stops at 0.99 (after 6 x 50 kimg =
    # 1172 steps). With sigma_data 1 (the toy presets'), arms_ring: limit 0.99 0.28, 0.95 0.41, 0.9 0.65. With
    # sigma_data 0.5 (the rest of this comment; the preset had 0.95): with CT's 0.999 CD contracted to a blob on the
    # thin arms_ring cloud of benchmarks/toy_suite.py (ratio 1.76 / 1.09 for seeds 0 / 1; checkerboard 0.32 / 0.42);
    # limit 0.95: 0.32 / 0.36 (checkerboard 0.37 / 0.46); 0.9: 0.52 / 0.49 (0.55 / 0.60); 0.75: 1.47. CT from scratch
    # does not gain from it (0.95: 0.83 and 0.53, against 0.76 and 0.46).
    "toy-cd": dict(TOY, distill=True, steps=2500, ratio_limit=0.99),
}
