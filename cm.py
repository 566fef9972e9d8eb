"""Consistency models: consistency training (CT) and distillation (CD) with the ECT curriculum on the gap sigma - r.
Song et al., "Consistency Models", arXiv:2303.01469v2; Geng et al., "Consistency Models Made Easy" (ECT),
arXiv:2406.14548v2. Formulas and defaults follow the reference implementation: NVIDIA FastGen, commit 34f30e8.
Its files are cited by name: `CM.py` below means fastgen/methods/consistency_model/CM.py, `ct_schedule.py`
fastgen/callbacks/ct_schedule.py, `noise_schedule.py` fastgen/networks/noise_schedule.py, `model.py`
fastgen/methods/model.py, and config files (methods/config_cm.py, EDM/config_cm_cifar10.py, EDM2/config_cm_s.py ...)
live under fastgen/configs/ (experiments/ for EDM/ and EDM2/); its results table is
fastgen/methods/consistency_model/README.md.

Convention: EDM noise level sigma, small = data, x_sigma = x + sigma eps. The consistency function is an
EDM-preconditioned network, f(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4), trained so that
f(x_sigma, sigma) = f(x_r, r) for the less noisy partner r = r(sigma) < sigma on the same trajectory.

| paper        | code             | meaning                                                        | shape   |
|--------------|------------------|----------------------------------------------------------------|---------|
| x, eps       | x, eps           | data, noise N(0, I)                                            | (B, *D) |
| t (sigma)    | sigma            | noise level, truncated log-normal, float64                     | (B,)    |
| r            | r                | partner level r(sigma) = max(sigma - Delta(sigma), r_min)      | (B,)    |
| x_r          | x_r              | partner point: CT x + r eps or the batch target; CD ODE step   | (B, *D) |
| a            | ratio            | ECT ratio 1 - q^-(stage + 1), capped at ratio_limit            |         |
| f_theta      | f                | consistency function (EDM preconditioning)                     | (B, *D) |
| f_theta-     | target           | sg(f(x_r, r)) of the online net, same dropout masks            | (B, *D) |
|              | target_at_r_zero | the target where r = 0: x_r for CT, the data x for CD          | (B, *D) |
| d            | d                | ||f - target|| over all dimensions, float64                    | (B,)    |

Network call: `F = net(x_in, c_noise, y=y)` with x_in = c_in x (B, *D), c_noise = ln(sigma) / 4 (B,), y one-hot or
None (all-zero row: null label). The CD teacher is a frozen EDM-preconditioned net with the same call (a diffusion.py
checkpoint). Any EDM net works unchanged; training usually starts from one (--init, "consistency tuning").

Implemented: CT with shared noise and the online network as target (no EMA target), CD with one Euler or Heun step of
the teacher's PF-ODE and CFG, the ECT r(sigma) map with its stage schedule in images seen, pseudo-Huber loss with the
reference's weightings, optional boundary-condition parameterisation, 1-step and multi-step samplers, and (not in the
reference) CT's lower-variance batch target, batch_target below. Presets and the sweeps behind the toy ones:
docs/presets.md.
"""
import math
from dataclasses import dataclass, fields

import torch

# --- Config ----------------------------------------------------------------------------------------------


# Copied from diffusion.py: check_ranges
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
    # sigma ~ truncated log-normal on [sigma_min, sigma_max] (FastGen configs/config.py, SampleTConfig; CIFAR-10)
    P_mean: float = -1.1  # finite
    P_std: float = 2.0  # > 0
    sigma_data: float = 0.5  # > 0
    sigma_min: float = 0.002  # > 0, < sigma_max
    sigma_max: float = 80.0  # > 0
    # ECT curriculum: the ratio a steps up every kimg_per_stage thousand images of the global batch (FastGen
    # ct_schedule.py, CTScheduleCallback; 6400 kimg: methods/config_cm.py)
    q: float = 2.0  # > 1
    kimg_per_stage: float = 6400.0  # > 0
    ratio_limit: float = 0.999  # in (0, 1)
    # Floor of r: 0.002 = FastGen (CM.py, CMModel._compute_cm_loss floors r at the schedule's min_t; target = net at
    # 0.002); 0 = ECT (target = data at r = 0)
    r_min: float = 0.002  # >= 0, < sigma_max
    # Loss: pseudo-Huber sqrt(d^2 + c^2) - c of the per-sample L2 distance, times a weight (CM.py, _pred_to_loss).
    # c ~ 0: plain L2 norm (methods/config_cm.py, CIFAR-10); 0.06 on ImageNet-64 (EDM2/config_cm_s.py)
    huber_c: float = 1e-8  # >= 0
    # inv_gap 1/(sigma - r) | inv_sqrt_gap | inv_c_out_sq | inv_c_out | inv_sigma_sq | one
    weighting: str = "inv_gap"  # one of WEIGHTINGS
    # True: the CM boundary form (arXiv:2303.01469v2, App. C), f(x, sigma_min) = x exactly (ECT's evaluation form).
    # FastGen and EDM initialisations use plain EDM coefficients (False), where f(x, 0.002) = x only approximately.
    boundary: bool = False  # bool
    # CT's partner point x_r. False (ECT, the reference): x + r eps, the sample's own noise path, which is the Euler
    # step of the PF-ODE with D(x_sigma) = x, a one-sample estimate of E[x | x_sigma]. True: the Euler step with the
    # batch's estimate of E[x | x_sigma] (batch_denoise), a lower-variance target. Deviation: the toy presets use it.
    batch_target: bool = False  # bool
    # Distillation (--teacher): x_r from one step of the teacher's PF-ODE
    # "euler" (FastGen CM.py, ode_solver) | "heun" (EDM, arXiv:2206.00364v2, Alg. 1)
    teacher_solver: str = "euler"  # euler or heun
    guidance_scale: float = 1.0  # >= 0; CFG on the teacher, D + (w - 1)(D - D_null)
    # Sampler: the sigma list. FastGen's 1-step default (noise_schedule.py, EDMNoiseSchedule.get_t_list) starts at
    # sigma_998 = 79.5638, index 998 of its ascending 1000-point Karras grid on [0.002, 80]
    sample_sigmas: tuple = (79.5638, 0.0)  # finite, decreasing to 0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.teacher_solver not in ("euler", "heun"):
            raise ValueError(f"unknown teacher_solver {self.teacher_solver!r}; choose euler or heun")
        check_ranges(self, RANGES)
        for name in ("sigma_min", "r_min"):
            if not getattr(self, name) < self.sigma_max:
                raise ValueError(f"{name} must be < sigma_max, got {getattr(self, name)} and {self.sigma_max}")
        s = tuple(self.sample_sigmas)
        if len(s) < 2 or not all(map(math.isfinite, s)) or any(a <= b for a, b in zip(s, s[1:])) or s[-1] != 0:
            raise ValueError(f"sample_sigmas must decrease to 0 with at least two entries, got {s}")

    # Copied from diffusion.py: Config.from_preset
    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


RANGES = dict(P_mean="finite", P_std="> 0", sigma_data="> 0", sigma_min="> 0", sigma_max="> 0", q="> 1",
              kimg_per_stage="> 0", ratio_limit="in (0, 1)", r_min=">= 0", huber_c=">= 0", boundary="bool",
              batch_target="bool", guidance_scale=">= 0")  # every numeric / bool field's range, as its comment states
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
    by inverse CDF (FastGen noise_schedule.py, EDMNoiseSchedule._truncated_lognormal_sample)."""
    a = torch.special.ndtr(torch.tensor((math.log(sigma_lo) - P_mean) / P_std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((math.log(sigma_hi) - P_mean) / P_std, dtype=torch.float64))
    u = a + (b - a) * torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    return torch.exp(P_mean + P_std * torch.special.ndtri(u)).clamp(sigma_lo, sigma_hi)


def ect_ratio(images, cfg):
    """a = min(1 - q^-(stage + 1), ratio_limit), stage = floor(images / (1000 kimg_per_stage)). `images` counts the
    training images seen before this step with the true global batch: FastGen updates the ratio after each step
    from iteration x global batch (ct_schedule.py, CTScheduleCallback._get_cur_stage and _update_schedule)."""
    stage = math.floor(images / (1000 * cfg.kimg_per_stage))
    return min(1 - cfg.q ** -(stage + 1), cfg.ratio_limit)


def partner_sigma(sigma, ratio, cfg):
    """(sigma, r): r = max(sigma - Delta, r_min), Delta = sigma (1 - a)(1 + 8 sigmoid(-sigma)), ECT's map (FastGen
    CM.py, t_to_r_sigmoid); where the floor leaves r >= sigma - 1e-6, sigma moves to r + 1e-6 (the safety check of
    CMModel._compute_cm_loss). float64."""
    delta = sigma * (1 - ratio) * (1 + 8 * torch.sigmoid(-sigma))
    r = (sigma - delta).clamp_min(cfg.r_min)
    sigma = torch.where(r >= sigma - 1e-6, r + 1e-6, sigma)
    return sigma, r

# --- Parameterization --------------------------------------------------------------------------------------------


# Copied from diffusion.py: check_shape
def check_shape(out, shape, what, fix):
    """ValueError unless out.shape == shape: a net output of another shape would broadcast silently in the loss.
    what: "<where>: the net's <output> must have shape <symbols>"; compares shapes only (no host sync)."""
    if out.shape != shape:
        raise ValueError(f"{what} = {tuple(shape)}, got {tuple(out.shape)}: {fix}")


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
    check_shape(F, x.shape, "denoise: the net's output F must have its input's shape (B, *D)", "one per entry")
    return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


def consistency_fn(net, x, sigma, y, cfg):
    """f(x, sigma). Plain EDM coefficients (FastGen), or with cfg.boundary the CM form (arXiv:2303.01469v2, App. C)
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), c_out = (sigma - sigma_min) sigma_data /
    sqrt(sigma^2 + sigma_data^2)."""
    if not cfg.boundary:
        return denoise(net, x, sigma, y, cfg.sigma_data)
    sigma_data, sigma_above_min = cfg.sigma_data, sigma - cfg.sigma_min
    c_skip = sigma_data**2 / (sigma_above_min**2 + sigma_data**2)
    c_out = sigma_above_min * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    F = net(bcast(c_in, x) * x, (sigma.clamp_min(1e-6).log() / 4).to(x.dtype), y=y)
    check_shape(F, x.shape, "consistency_fn: the net's output F must have its input's shape (B, *D)", "one per entry")
    return bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


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


def ct_partner(x, x_sigma, eps, sigma, r, y, cfg):
    """CT's x_r (no grad): x + r eps (ECT), or with cfg.batch_target the Euler step from x_sigma to r of the PF-ODE
    dx/dsigma = (x - D) / sigma with D the batch's E[x | x_sigma] (at D = x it is x + r eps again)."""
    if not cfg.batch_target:
        return x + bcast(r, x) * eps
    D = batch_denoise(x, x_sigma, torch.ones_like(sigma), sigma, y)
    x_sigma64 = x_sigma.double()
    return (x_sigma64 + bcast(r - sigma, x_sigma64) * (x_sigma64 - D) / bcast(sigma, x_sigma64)).to(x.dtype)


def loss_weight(sigma, r, cfg):
    """Per-sample weight, float64: FastGen's weighting_ct_loss default, sqrt, c_out_sq, c_out, sigma_sq, one in that
    order (CM.py, CMModel._pred_to_loss)."""
    gap = sigma - r
    c_out = sigma * cfg.sigma_data / (sigma**2 + cfg.sigma_data**2).sqrt()
    weights = dict(inv_gap=1 / gap, inv_sqrt_gap=gap.rsqrt(), inv_c_out_sq=c_out**-2, inv_c_out=1 / c_out,
                   inv_sigma_sq=sigma**-2, one=torch.ones_like(sigma))
    return weights[cfg.weighting]

# --- Loss --------------------------------------------------------------------------------------------------------


def teacher_step(teacher, x_sigma, sigma, r, y, cfg):
    """x_r from one step of the teacher's PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma, with CFG on D; FastGen applies
    it to the velocity (x - D) / sigma, the same step (CM.py, ode_solver). Euler (FastGen) or Heun (EDM,
    arXiv:2206.00364v2, Alg. 1); no grad."""
    def guided_D(x, s):
        D = denoise(teacher, x, s, y, cfg.sigma_data)
        if cfg.guidance_scale != 1 and y is not None:
            D = D + (cfg.guidance_scale - 1) * (D - denoise(teacher, x, s, torch.zeros_like(y), cfg.sigma_data))
        return D
    dsigma = bcast(r - sigma, x_sigma)
    slope = (x_sigma - guided_D(x_sigma, sigma)) / bcast(sigma, x_sigma)  # dx/dsigma at sigma
    x_r = x_sigma + dsigma * slope
    if cfg.teacher_solver == "heun":
        r_safe = r.clamp_min(1e-12)  # at r = 0 the Euler result is kept
        slope_r = (x_r - guided_D(x_r, r_safe)) / bcast(r_safe, x_r)
        x_r = torch.where(bcast(r, x_r) > 0, x_sigma + dsigma * (slope + slope_r) / 2, x_r)
    return x_r


def distance_loss(f, target, sigma, r, cfg):
    """Per-example weighted pseudo-Huber loss, float64: w(sigma, r) (sqrt(d^2 + c^2) - c), d = ||f - target||."""
    d = (f.double() - target.double()).flatten(1).norm(dim=1)
    return loss_weight(sigma, r, cfg) * ((d**2 + cfg.huber_c**2).sqrt() - cfg.huber_c), d


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example CM loss (B,) and logs (FastGen CM.py, CMModel._compute_cm_loss). CT when teacher is None (x_r =
    x + r eps with the same eps, or the batch target: ct_partner), CD with a frozen EDM-preconditioned teacher (eval
    mode). images: training images seen before this step (global), for the ECT stage. The target is the online net
    under no grad, with the same dropout masks as the gradient pass; `net` may be DDP-wrapped (the no-grad target
    pass uses the bare module)."""
    if images is None:
        raise ValueError("cm.loss needs images=, the number of training images seen before this step, e.g. "
                         "(step - 1) * batch: the ECT curriculum counts them")
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
        target_at_r_zero = x_r if teacher is None else x
        target = consistency_target(getattr(net, "module", net), target_at_r_zero, x_r, r, y, cfg)
    # Casts cached by autocast under no_grad have no grad_fn; drop them before the differentiable pass.
    torch.clear_autocast_cache()
    f = consistency_fn(net, x_sigma, sigma, y, cfg)
    per_example, d = distance_loss(f, target, sigma, r, cfg)
    return per_example, dict(t=sigma, gap=sigma - r, d=d.detach(), ratio=torch.full_like(sigma, ratio))


def consistency_target(net, target_at_r_zero, x_r, r, y, cfg):
    """The target sg(f(x_r, r)) in train mode with the dropout masks the gradient pass will draw (RNG replayed);
    target_at_r_zero where r = 0 (ECT's floor); NaN-safe. As FastGen's CM.py, CMModel._compute_cm_loss: fork_rng
    around the pass that draws first, the data where r <= 0, nan_to_num."""
    devices = [x_r.device] if x_r.device.type == "cuda" else []
    with torch.random.fork_rng(devices):
        target = consistency_fn(net, x_r, r.clamp_min(1e-12), y, cfg)
    target = torch.where(bcast(r, target_at_r_zero) > 0, target, target_at_r_zero)
    return torch.nan_to_num(target)

# --- Sampler -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, sigmas=None, gen=None):
    """Multistep consistency sampling (arXiv:2303.01469v2, Alg. 1, re-noised to sigma_{i+1} itself as FastGen's
    model.py, FastGenModel._student_sample_loop with type "sde"): x = sigma_0 eps; x0 = f(x, sigma_i); re-noise
    x = x0 + sigma_{i+1} eps_i with fresh noise while sigma_{i+1} > 0. Call with the EMA net in eval mode."""
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


EMA_DECAYS = (0.9999, 0.99995, 0.9996)  # FastGen's three constant EMAs, the first evaluated
IMAGENET64_EDM2 = dict(cond=True, batch=1024, steps=150_000, optimizer="adam", betas=(0.9, 0.99), lr_ref_steps=2000,
                       ema=(0.01, 0.05, 0.10), ema_kind="power", P_mean=-0.8, P_std=1.6, q=4.0, kimg_per_stage=3200.0,
                       ratio_limit=0.9961, huber_c=0.06, weighting="inv_c_out_sq", sample_sigmas=(79.5638, 0.0))
# The 2-D toy recipe (presets toy, toy-cd): the net of the diffusion.py toy run that CT tunes and CD distils.
TOY_RECIPE = dict(net="mlp-fourier", cond=False, batch=256, steps=3200, optimizer="adam", lr=1e-4, betas=(0.9, 0.999),
                  lr_warmup=100, ema=(0.999,), ema_warmup=True, kimg_per_stage=50.0, sigma_data=1.0)
PRESETS = {
    # ECT CIFAR-10 as FastGen runs it (EDM/config_cm_cifar10.py on methods/config_cm.py), tuning EDM's unconditional
    # VP checkpoint: 1-step FID 2.92 (FastGen's results table; ECT's paper reports 3.60). 2-step list that config
    # recommends: 80, 0.821, 0.
    "cifar10": dict(
        net="ddpmpp", dropout=0.2, cond=False, batch=512, steps=350_000, optimizer="radam", lr=1e-4,
        betas=(0.9, 0.999), ema=EMA_DECAYS,
    ),
    # ECT ImageNet-64 with EDM2-S as FastGen runs it (EDM2/config_cm_s.py; 1-step FID 4.05 in its results table), from
    # EDM2's post-hoc EMA 0.075 checkpoint (convert.py). Dropout at 16x16 and 8x8 only, as that config. Power EMAs,
    # sigma_rel 0.01 evaluated. 2-step list that config recommends: 80, 1.526, 0.
    "imagenet64": dict(IMAGENET64_EDM2, net="edm2-s", dropout_res=(16, 8), dropout=0.4, lr=1e-3),
    # The same with EDM2-XL (EDM2/config_cm_xl.py), from the post-hoc 0.040 checkpoint.
    "imagenet64-xl": dict(IMAGENET64_EDM2, net="edm2-xl", dropout_res=(16, 8), dropout=0.5, lr=7e-4),
    # 2-D points on CPU (a minute with train.py --threads 2): CT tuning a diffusion toy run (--init), as ECT tunes EDM's
    # CIFAR-10 model. Stages of 50 kimg: the ratio reaches its limit after 9 x 50 kimg = 1760 steps of 256. sigma_data
    # 1: the points have unit variance per axis (diffusion.py's toy preset). Deviation: batch_target, x_r from the
    # batch's E[x | x_sigma]: worst cell of benchmarks/toy_suite.py 0.43 -> 0.32 (a cell the mean of 8 draws; arms_ring
    # / checkerboard 0.43 / 0.355 -> 0.28 / 0.32). The sweeps behind the other settings: docs/presets.md.
    "toy": dict(TOY_RECIPE, batch_target=True),
    # CD on points (--teacher a diffusion toy run, which also starts the student), 2500 steps. Deviation: ratio limit
    # 0.99, reached after 6 x 50 kimg = 1172 steps: of 0.99 / 0.95 / 0.9 it scores best on arms_ring
    # (benchmarks/toy_suite.py 0.28 / 0.41 / 0.65), and at sigma_data 0.5 CT's 0.999 contracted CD to a blob there.
    # Sweep: docs/presets.md.
    "toy-cd": dict(TOY_RECIPE, distill=True, steps=2500, ratio_limit=0.99),
}
