"""sCM: continuous-time consistency models in TrigFlow, trained by consistency training (sCT) or distillation (sCD).
Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", arXiv:2410.11081v1.
Where the paper leaves a choice open, the reference implementation decides: NVIDIA FastGen, commit 34f30e8; `sCM.py`
below means fastgen/methods/consistency_model/sCM.py, `config_scm.py` fastgen/configs/methods/config_scm.py, and
`config_sct_cifar10.py`, `config_scd_cifar10.py`, `config_scd_in64.py` lie in fastgen/configs/experiments/EDM/.

Convention: TrigFlow time t in [0, pi/2), t = 0 is data: x_t = cos(t) x + sin(t) z with z ~ N(0, sigma_data^2 I).
Relation to EDM (our derivation, checked in float64 by tests/test_scm.py): sigma = sigma_data tan(t) and
x_sigma = x_t / cos(t). The TrigFlow network is an EDM-preconditioned raw network with a sign flip, and the consistency
function is exactly EDM's denoiser:
    F_theta(x_t, t) = -F_raw(x_t / sigma_data, c_noise),   c_noise = ln(sigma_data tan t) / 4 = ln(sigma) / 4
    f(x_t, t) = cos(t) x_t - sigma_data sin(t) F_theta(x_t, t) = D(x_sigma, sigma)          (f(x, 0) = x)
So EDM-style teachers and students (diffusion.py checkpoints, EDM's weights) are used unchanged, and the JVP
tangent of c_noise along cos(t) sin(t) d/dt is exactly 1/4 (no division by sin t anywhere; sCM.py's TrigFlowPrecond
computes F_theta = (cos t x_t - D) / (sigma_data sin t) instead).

| paper             | code      | meaning                                                      | shape   |
|-------------------|-----------|--------------------------------------------------------------|---------|
| x, z              | x, z      | data; noise sigma_data eps                                   | (B, *D) |
| t                 | t         | TrigFlow time arctan(sigma / sigma_data), float64            | (B,)    |
| x_t               | x_t       | cos t x + sin t z                                            | (B, *D) |
| dx_t/dt           | dxdt      | sCT: cos t z - sin t x; sCD: sigma_data F_teacher(x_t, t)    | (B, *D) |
| F_theta           | F         | TrigFlow network output (-F_raw)                             | (B, *D) |
| cos sin dF/dt     | dF        | JVP of F along (cos t sin t dxdt, cos t sin t), no grad      | (B, *D) |
| g                 | g         | cos t df-/dt, warmed up and normalised (Eq. 8 / Alg. 1)      | (B, *D) |
| w_phi = -lambda   | logvar    | learned log-variance (adaptive weight), one per sample       | (B,)    |

Network call: `F_raw = net(x_in, c_noise, y=y)` and `F_raw, logvar = net(x_in, c_noise, y=y, return_logvar=True)`,
x_in = x_t / sigma_data, c_noise (B,), y one-hot or None. `tangent="fused"` additionally needs
`net(..., return_logvar=True, tangents=(dx_in, dc_noise, None)) -> ((F_raw, dF_raw), logvar)` (nets.py has it).
The sCD teacher is any EDM-preconditioned net with the plain call (a frozen diffusion.py checkpoint).

Implemented: sCT, sCD with CFG, three tangents (torch.func.jvp, fused, finite difference), tangent warm-up,
RMS (sCM.py) or Euclidean (paper) tangent normalisation, prior weight 1/sigma, learned adaptive weight,
1-step and multi-step samplers. Not implemented: the paper's adaptive double normalisation, semi-discrete time.
"""
import math
from dataclasses import dataclass, fields

import torch
from torch.func import jvp

# --- Config -----------------------------------------------------------------------------------------------------------


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
    # sigma ~ truncated log-normal on [sigma_min, sigma_max], t = arctan(sigma / sigma_data) (sCM.py,
    # SCMModel._compute_scm_loss); the values are config_scm.py's and config_sct_cifar10.py's
    P_mean: float = -1.0  # finite
    P_std: float = 1.4  # > 0; config_scm.py (a comment there suggests 1.8 for sCT from an EDM checkpoint)
    sigma_data: float = 0.5  # > 0
    sigma_min: float = 0.002  # > 0, < sigma_max
    # sCT trains to 800 although sampling starts at 80 (config_sct_cifar10.py); sCD uses 80
    sigma_max: float = 800.0  # > 0
    # "jvp": torch.func.jvp | "fused": the net returns (F, dF) | "fd": finite difference
    tangent: str = "jvp"  # jvp, fused or fd
    tangent_warmup: int = 10000  # >= 0; rho_k = min(1, k / warmup) scales g's second term (0: off); config_scm.py
    tangent_norm: str = "rms"  # rms or paper: "rms": g / (RMS(g) + c), sCM.py's | "paper": g / (||g|| + c)
    tangent_norm_c: float = 0.1  # > 0
    # tangent="fd": h = max(fd_rel_step |t|, 1e-6) in TrigFlow time (config_scm.py)
    fd_rel_step: float = 1e-3  # in (0, 1)
    # sCD: teacher CFG, dxdt + (w - 1)(dxdt - dxdt_null); the null label is all zeros
    guidance_scale: float = 1.0  # >= 0
    # sCT's dx_t/dt. False (sCM.py): cos t z - sin t x, the sample's own path, which is (cos t x_t - D) / sin t with
    # D = x, a one-sample estimate of E[x | x_t]. True: D = the batch's estimate of E[x | x_t] (batch_denoise), a
    # lower-variance tangent. Deviation: the toy preset uses it.
    batch_target: bool = False  # bool
    # sCT: 80 (config_sct_cifar10.py); sCD and FastGen's 1-step default: 79.5638
    sample_sigmas: tuple = (80.0, 0.0)  # finite, decreasing to 0

    def __post_init__(self):
        if self.tangent not in ("jvp", "fused", "fd"):
            raise ValueError(f"unknown tangent {self.tangent!r}; choose jvp, fused or fd")
        if self.tangent_norm not in ("rms", "paper"):
            raise ValueError(f"unknown tangent_norm {self.tangent_norm!r}; choose rms or paper")
        check_ranges(self, RANGES)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        s = tuple(self.sample_sigmas)
        if len(s) < 2 or not all(map(math.isfinite, s)) or any(a <= b for a, b in zip(s, s[1:])) or s[-1] != 0:
            raise ValueError(f"sample_sigmas must decrease to 0 with at least two entries, got {s}")

    # Copied from diffusion.py: Config.from_preset
    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


RANGES = dict(P_mean="finite", P_std="> 0", sigma_data="> 0", sigma_min="> 0", sigma_max="> 0",
              tangent_warmup=">= 0", tangent_norm_c="> 0", fd_rel_step="in (0, 1)", guidance_scale=">= 0",
              batch_target="bool")  # every numeric / bool field's range, as its comment states
TIME_BINS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 1000.0)  # edges in sigma for train.py's loss-by-time log
NET_NEEDS = dict(logvar=True)  # the learned adaptive weight is the net's log-variance head
TEACHERS = ("diffusion",)  # --teacher: a diffusion model, whose sigma_data F_trig is the PF-ODE dx_t/dt (a CM's is not)
INIT = ("diffusion", "scm")  # --init: EDM-preconditioned checkpoints (a diffusion model's net lacks the logvar head)
NEEDS_INIT = True  # sCT and sCD start from a pretrained diffusion model (--init); from scratch is possible but slow

# --- Time distribution ------------------------------------------------------------------------------------------------


# Copied from diffusion.py: sample_sigma
def sample_sigma(n, P_mean, P_std, sigma_lo, sigma_hi, gen, device):
    """Truncated log-normal, float64 (n,): ln(sigma) ~ N(P_mean, P_std^2) restricted to [sigma_lo, sigma_hi],
    by inverse CDF (FastGen noise_schedule.py, EDMNoiseSchedule._truncated_lognormal_sample)."""
    a = torch.special.ndtr(torch.tensor((math.log(sigma_lo) - P_mean) / P_std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((math.log(sigma_hi) - P_mean) / P_std, dtype=torch.float64))
    u = a + (b - a) * torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    return torch.exp(P_mean + P_std * torch.special.ndtri(u)).clamp(sigma_lo, sigma_hi)

# --- Parameterization -------------------------------------------------------------------------------------------------


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


def c_noise(t, sigma_data):
    """EDM's time input ln(sigma) / 4 at TrigFlow time t (float64)."""
    return (sigma_data * t.tan()).clamp_min(1e-6).log() / 4


def trig_F(net, x_t, t, y, sigma_data):
    """F_theta(x_t, t) = -F_raw(x_t / sigma_data, c_noise(t)): the TrigFlow network (the identity in the docstring
    above; sCM.py's TrigFlowPrecond.forward computes the same F_theta by division)."""
    return -net(x_t / sigma_data, c_noise(t, sigma_data).to(x_t.dtype), y=y)

# --- Loss -------------------------------------------------------------------------------------------------------------


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


def target_dxdt(x, z, x_t, t, y, cfg, teacher=None):
    """dx_t/dt under no grad: the direction of the tangent and g's target (sCM.py, SCMModel._compute_scm_loss).
    sCT: the conditional cos t z - sin t x, or with cfg.batch_target (cos t x_t - D) / sin t with D the batch's
    E[x | x_t]. sCD: the teacher's PF-ODE sigma_data F_teacher(x_t, t), with CFG dxdt + (w - 1)(dxdt - dxdt_null)
    when guidance_scale != 1 (teacher in eval mode)."""
    if teacher is None and cfg.batch_target:
        D = batch_denoise(x, x_t, t.cos(), cfg.sigma_data * t.sin(), y)
        return ((bcast(t.cos(), D) * x_t.double() - D) / bcast(t.sin(), D)).to(x.dtype)
    if teacher is None:
        return bcast(t.cos(), x) * z - bcast(t.sin(), x) * x
    dxdt = cfg.sigma_data * trig_F(teacher, x_t, t, y, cfg.sigma_data)
    if cfg.guidance_scale != 1 and y is not None:
        dxdt_null = cfg.sigma_data * trig_F(teacher, x_t, t, torch.zeros_like(y), cfg.sigma_data)
        dxdt = dxdt + (cfg.guidance_scale - 1) * (dxdt - dxdt_null)
    return dxdt


def F_and_dF(net, x, z, x_t, t, y, dxdt, cfg, distill):
    """The differentiable F_theta(x_t, t) and log-variance, and the stop-gradient dF = cos t sin t dF_theta/dt along
    (dxdt, 1), with the same dropout masks (Deviation: sCM.py's SCMModel._jvp draws new masks for the JVP pass;
    sharing makes dF the derivative of the function whose value is sg(F), as in MeanFlow). `net` may be DDP-wrapped:
    the differentiable call goes through the wrapper (so DDP synchronises gradients); the no-grad JVP / FD passes run
    on the bare module, because torch.func.jvp cannot trace through DDP (train.py's docstring; checked by
    tests/test_train.py::test_two_gloo_ranks_match_one_process)."""
    sd = cfg.sigma_data
    cos_sin = t.cos() * t.sin()
    x_in = x_t / sd
    c_noise_in = c_noise(t, sd).to(x_t.dtype)
    # Tangents of the raw net's inputs along cos t sin t d/dt: x_in gets cos t sin t dxdt / sigma_data, and
    # c_noise gets cos t sin t / (4 sin t cos t) = 1/4 exactly.
    dx_in = bcast(cos_sin, x_t) * dxdt.to(x_t.dtype) / sd
    dc_noise_in = torch.full_like(c_noise_in, 0.25)
    if cfg.tangent == "fused":
        tangents = (dx_in, dc_noise_in, None)
        (F_raw, dF_raw), logvar = fused_call(net, x_in, c_noise_in, y=y, return_logvar=True, tangents=tangents)
        check_shape(dF_raw, x_t.shape, "scm.loss: the net's dF must have the shape of x_t (B, *D)", "one per entry")
        check_shape(F_raw, x_t.shape, "scm.loss: the net's F must have the shape of x_t (B, *D)", "one per entry")
        check_shape(logvar, t.shape, "scm.loss: the net's logvar must have shape (B,)",
                    "return one log-variance per sample")
        return -F_raw, -dF_raw.double(), logvar
    bare = getattr(net, "module", net)
    devices = [x_t.device] if x_t.device.type == "cuda" else []
    # fp32 (as config_scd_in64.py's JVP under bf16), no graph; fork_rng restores the RNG after each pass, so all
    # passes draw the same dropout masks.
    with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
        if cfg.tangent == "jvp":
            def F_raw_fn(x_in_, c_noise_in_):  # tangents (cos t sin t dxdt / sigma_data, 1/4) along (x_in, c_noise)
                return bare(x_in_, c_noise_in_, y=y)
            with torch.random.fork_rng(devices):
                _, dF_raw = jvp_explained(F_raw_fn, (x_in, c_noise_in), (dx_in, dc_noise_in))
            dF = -dF_raw.double()
        else:  # "fd"
            dF = _dF_fd(bare, x, z, x_t, t, y, dxdt, cfg, distill, devices)
    F_raw, logvar = net(x_in, c_noise_in, y=y, return_logvar=True)
    check_shape(F_raw, x_t.shape, "scm.loss: the net's F must have the shape of x_t (B, *D)", "one per entry")
    check_shape(logvar, t.shape, "scm.loss: the net's logvar must have shape (B,)",
                "return one log-variance per sample")
    return -F_raw, dF, logvar


# Copied from meanflow.py: fused_call
def fused_call(net, *args, **kwargs):
    """net(*args, tangents=..., **kwargs); a net without the tangents argument gets a one-line error."""
    try:
        return net(*args, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument 'tangents'" not in str(e):
            raise
        raise TypeError("tangent='fused' needs a net that propagates tangents (nets.py's nets do); use "
                        "tangent='jvp' or 'fd'") from None


# Copied from meanflow.py: jvp_explained
def jvp_explained(fn, primals, tangents):
    """torch.func.jvp(fn, primals, tangents); a failure is re-raised with its known causes (tests/test_contracts.py
    builds a net with each)."""
    try:
        return jvp(fn, primals, tangents)
    except (RuntimeError, NotImplementedError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise RuntimeError(f"tangent='jvp': torch.func.jvp failed ({type(e).__name__}). Known causes: a train-mode "
                           "BatchNorm (functorch's in-place error) and fused attention kernels without a forward-AD "
                           "rule (F.scaled_dot_product_attention on CPU; the math backend has one): use tangent='fd', "
                           "or 'fused' with nets.py's nets") from e


def _dF_fd(net, x, z, x_t, t, y, dxdt, cfg, distill, devices):
    """Central difference of F_theta in TrigFlow time with relative step h, times cos t sin t (sCM.py,
    SCMModel._estimate_jvp_finite_difference). sCT moves along the conditional path x_t(t) = cos t x + sin t z, as
    sCM.py. sCD moves along the teacher's direction, x_t + (t' - t) dxdt (Deviation: sCM.py follows the conditional
    path for sCD too, which ignores the teacher and gives a different estimator than the JVP; tests/test_scm.py)."""
    h = (cfg.fd_rel_step * t.abs()).clamp_min(1e-6)
    t_lim = math.pi / 2 - 1e-5
    t_plus, t_minus = (t + h).clamp(-t_lim, t_lim), (t - h).clamp(-t_lim, t_lim)
    outs = []
    for t_ in (t_plus, t_minus):
        if distill:
            x_ = x_t + bcast(t_ - t, x_t) * dxdt.to(x_t.dtype)
        else:
            x_ = bcast(t_.cos(), x) * x + bcast(t_.sin(), x) * z
        with torch.random.fork_rng(devices):
            outs.append(trig_F(net, x_, t_, y, cfg.sigma_data).double())
    return bcast(t.cos() * t.sin() / (t_plus - t_minus), outs[0]) * (outs[0] - outs[1])


def tangent_g(F, dF, x_t, t, dxdt, cfg, step):
    """g = cos t df-/dt with f- = cos t x_t - sigma_data sin t sg(F), the dF term warmed up, then normalised
    (sCM.py, SCMModel._scm_pred_to_loss); float64. Minimising ||F - sg(F) - g||^2 moves F along +g."""
    sd = cfg.sigma_data
    F, dF, x_t, dxdt = F.double(), dF.double(), x_t.double(), dxdt.double()
    cos, sin = bcast(t.cos(), F), bcast(t.sin(), F)
    rho = min(1.0, step / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
    g = -cos**2 * (sd * F - dxdt) - rho * (cos * sin * x_t + sd * dF)
    norm = g.flatten(1).norm(dim=1)  # (B,)
    if cfg.tangent_norm == "rms":  # sCM.py's; = sqrt(D) times the paper's form with c' = c sqrt(D)
        norm = norm / math.sqrt(g[0].numel())
    return g / bcast(norm + cfg.tangent_norm_c, g)


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example sCM loss (B,) and logs. sCD when `teacher` (a frozen EDM-preconditioned net, eval mode) is given,
    sCT otherwise. step: 1-based optimizer step (tangent warm-up); gen: generator for sigma and noise; images: unused.
        loss_i = exp(-logvar_i) L_i / (sigma_i D) + logvar_i,   L_i = mean (rms) or sum (paper) of (F - sg(F) - g)^2
    (prior weight 1/sigma; the extra 1/D is sCM.py's, SCMModel._scm_pred_to_loss with divide_x_0_spatial_dim)."""
    sd = cfg.sigma_data
    sigma = sample_sigma(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max, gen, x.device)
    t = torch.atan2(sigma, torch.full_like(sigma, sd))  # float64, in (0, pi/2)
    z = sd * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x_t = bcast(t.cos(), x) * x + bcast(t.sin(), x) * z
    with torch.no_grad():
        dxdt = target_dxdt(x, z, x_t, t, y, cfg, teacher)

    F, dF, logvar = F_and_dF(net, x, z, x_t, t, y, dxdt, cfg, distill=teacher is not None)
    g = tangent_g(F.detach(), dF, x_t, t, dxdt, cfg, step)
    diff = (F.double() - F.detach().double() - g).flatten(1).square()  # value g^2; gradient -2 g wrt F
    L = diff.mean(dim=1) if cfg.tangent_norm == "rms" else diff.sum(dim=1)
    D = x[0].numel()
    logvar = logvar.double()
    per_example = torch.exp(-logvar) * L / (sigma * D) + logvar
    return per_example, dict(t=sigma, g_sq=L.detach(), logvar=logvar.detach())

# --- Sampler ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, sigmas=None, gen=None):
    """Multistep consistency sampling (CM, arXiv:2303.01469v2, Alg. 1) with f = D: x = sigma_0 eps; x0 = D(x, sigma_i);
    re-noise x = x0 + sigma_{i+1} eps_i with fresh noise while sigma_{i+1} > 0 (FastGen fastgen/methods/model.py,
    FastGenModel._student_sample_loop, "sde"). Call with the EMA net in eval mode."""
    sigmas = cfg.sample_sigmas if sigmas is None else sigmas
    x = sigmas[0] * eps
    ones = torch.ones(eps.shape[0], dtype=torch.float64, device=eps.device)
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoise(net, x, s_cur * ones, y, cfg.sigma_data)
        if s_next > 0:
            x = x0 + s_next * torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    return x0

# --- Presets ----------------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads. The CIFAR-10 runs start from an EDM checkpoint:
#   sCT: --init edm.pt;   sCD: --teacher edm.pt (preset cifar10-scd; the student starts as the teacher)


EMA_DECAYS = (0.9999, 0.99995, 0.9996)  # three constant EMAs, the first evaluated (FastGen's EMA_CONST_CALLBACKS)
# The 2-D toy recipe: sCT / sCD tune a diffusion.py toy run (--init), as FastGen tunes EDM's CIFAR-10 model. sigma_data
# 1: the points have unit variance per axis. Deviations, chosen on benchmarks/toy_suite.py (docs/presets.md): P_mean
# 1.7 = 1.0 + ln 2 (P_mean 1.0 at sigma_data 0.5: more weight on large sigma; the CIFAR -1.0 / 1.4 left sCD blurred,
# swissroll 1.04 -> 0.33), P_std 1.6, sigma_max 80, lr 1e-4 and a 625-step tangent warm-up (sCD with lr 3e-4 and a
# 1000-step warm-up: arms_ring 0.87 against 0.67), a short warmed-up EMA. The net is the diffusion run's (mlp-fourier).
TOY_RECIPE = dict(net="mlp-fourier", cond=False, batch=256, steps=3000, optimizer="adam", lr=1e-4, betas=(0.9, 0.99),
                  lr_warmup=100, ema=(0.999,), ema_warmup=True, sigma_max=80.0, P_mean=1.7, P_std=1.6,
                  tangent_warmup=625, tangent="fused", sigma_data=1.0, tangent_norm_c=1.0)
PRESETS = {
    # sCT on CIFAR-10: config_sct_cifar10.py over config_scm.py, 1-step FID 3.23 (FastGen's
    # fastgen/methods/consistency_model/README.md).
    "cifar10": dict(
        net="ddpmpp", dropout=0.2, cond=False, batch=512, steps=350_000, optimizer="radam", lr=1e-4, betas=(0.9, 0.99),
        ema=EMA_DECAYS, sigma_max=800.0, sample_sigmas=(80.0, 0.0), tangent="fused",
    ),
    # sCD on CIFAR-10: config_scd_cifar10.py, 1-step FID 3.22 (same README). The student starts as the teacher.
    "cifar10-scd": dict(
        net="ddpmpp", dropout=0.0, cond=False, distill=True, batch=512, steps=500_000, optimizer="radam", lr=1e-4,
        betas=(0.9, 0.99), ema=EMA_DECAYS, sigma_max=80.0, sample_sigmas=(79.5638, 0.0), tangent="fused",
    ),
    # sCD on ImageNet-64 with EDM's ADM: config_scd_in64.py (teacher: convert.py on edm-imagenet-64x64-cond-adm.pkl).
    # bf16 with an fp32 JVP, hence tangent="jvp" ("fused" under bf16 linearises around the bf16 primal: on this
    # full-size net its dF differs from the fp32 JVP by 1.7-2.0 %, its g by up to 1.4 %; benchmarks/bf16_tangent.py,
    # docs/training.md "Precision").
    "imagenet64-scd": dict(
        net="adm", dropout=0.0, cond=True, distill=True, batch=1024, steps=600_000, optimizer="adam", lr=7e-5,
        betas=(0.9, 0.99), adam_eps=1e-11, lr_ref_steps=35_000, grad_clip=10.0, precision="bf16", ema=EMA_DECAYS,
        sigma_max=80.0, P_std=1.6, sample_sigmas=(79.5638, 0.0), tangent="jvp",
    ),
    # sCT on 2-D points, 3000 steps, under a minute with train.py --threads 2. Deviation: tangent_norm_c 1, not 0.1
    # (less of the per-sample tangent normalisation; arms_ring 0.38 -> 0.35). Deviation: batch_target, dx_t/dt with
    # the batch's E[x | x_t] instead of the sample's x (benchmarks/toy_suite.py, a cell the mean of 8 draws of
    # samples: worst cell 0.39 -> 0.32). Sweeps and the settings tried: docs/presets.md.
    "toy": dict(TOY_RECIPE, batch_target=True),
    # sCD on 2-D points (--teacher a diffusion toy run, which also starts the student), 2500 steps (one minute with
    # --threads 2: the teacher's passes cost a step more), with sCM.py's tangent_norm_c 0.1: every cloud of
    # benchmarks/toy_suite.py <= 0.28 (docs/presets.md).
    "toy-scd": dict(TOY_RECIPE, distill=True, steps=2500, tangent_norm_c=0.1),
}
