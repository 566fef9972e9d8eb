"""Shortcut models: one network conditioned on the step size, sampled in 1, 2, 4, ... or 128 steps.
Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut Models", arXiv:2410.12557v3.
Where the paper leaves a choice open, the official JAX code decides: kvfrans/shortcut-models, commit 6010043;
`targets_shortcut.py` below means its get_targets, `train.py` its model_config defaults and update.loss_fn,
`helper_inference.py` its do_inference sampler, and `model.py` its DiT.

Convention: rectified-flow time as meanflow.py, t = 0 is data and t = 1 is noise, z_t = (1 - t) x + t eps. The paper
runs time the other way: its t' = 1 - t (t' = 0 noise, t' = 1 data, x_t' = (1 - t') x_0 + t' x_1 with x_0 the noise),
its velocity x_1 - x_0 is -(eps - x) here, and its shortcut s(x_t', t', d) is -u(z_t, t, t - d) here. A step of size
d, x_{t'+d} = x_t' + d s(x_t', t', d), is z_{t-d} = z_t - d u(z_t, t, t - d): the same map. u(z, t, r) is the average
velocity over [r, t] (as meanflow.py's), at r = t the instantaneous velocity v. Self-consistency (paper Sec. 3, its
s(x_t', t', 2d) = s(x_t', t', d) / 2 + s(x'_{t'+d}, t' + d, d) / 2), with d here the paper's 2d and h = d / 2:
    u(z_t, t, t - d) = [u(z_t, t, t - h) + u(z', t - h, t - d)] / 2,   z' = z_t - h u(z_t, t, t - h).

| paper        | code            | meaning                                                   | shape      |
|--------------|-----------------|-----------------------------------------------------------|------------|
| x_1          | x               | data                                                      | (B, *D)    |
| x_0          | eps             | noise, N(0, I)                                            | (B, *D)    |
| 1 - t'       | t               | time, a multiple of 1/M (flow rows) or of d (self-cons.)  | (B,)       |
| 2d           | d               | the step a self-consistency row trains (0: flow row)      | (B,)       |
| d            | h               | its half step, d / 2                                      | (B,)       |
| x_t'         | z               | (1 - t) x + t eps                                         | (B, *D)    |
| x_1 - x_0    | -v              | v = eps - x (or its batch estimate), the flow target      | (B, *D)    |
| s_theta      | -u              | network output u(z, t, r), r = t - d                      | (B, *D)    |
| s_target     | -u_tgt          | sg of the two-half-step average (bootstrap_target)        | (B, *D)    |
| M            | denoise_timesteps | finest number of steps, 128                             |            |
| k            | 1/bootstrap_every | fraction of the batch with self-consistency targets     |            |

Network call: `u = net(z, t, r, y)` with z (B, *D), t and r = t - d (B,) in [0, 1] (raw), y one-hot (B, label_dim)
with all-zero rows as the null label, or None. nets.py's MLP embeds t and r; its DiT embeds t and t - r = d, as
model.py embeds t and the step (Deviation: model.py embeds the level log2(1/d), an integer 0..log2 M, not d itself;
here d is a time like r, so a MeanFlow net and checkpoint are the same kind of net).
Base case: the step sizes are 1, 1/2, ..., 1/M, and targets_shortcut.py gives the flow-matching rows and the half
steps of the smallest shortcut (d = 2/M) the same level log2 M; here that level is d = 0, r = t (the paper's base
case, s(x_t, t, 0) = the flow velocity): every query of a step d <= 1/M is a query at r = t (query_r).

Implemented: targets_shortcut.py's batch layout (self-consistency rows first, dyadic step sizes in equal counts or
weighted to the largest two (bootstrap_dt_bias), t on the grid of each row's step), bootstrap targets under no grad
with z' and the target clipped, guidance baked into the smallest shortcut's targets (bootstrap_cfg), label dropout on
flow rows, the mean-over-dimensions MSE of train.py's loss_fn, and helper_inference.py's N-step Euler sampler with
optional CFG; for 2-D data the batch's posterior velocity as the flow target (batch_target, as meanflow.py's).
Not implemented: the EMA as the bootstrap net (see loss), the 1e-5 of targets_shortcut.py's
x_t = (1 - (1 - 1e-5) t') x_0 + t' x_1 (the path is meanflow.py's exactly linear one).
"""
import math
from dataclasses import dataclass, fields

import torch

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


def is_power_of_two(n):
    return float(n).is_integer() and n >= 1 and (int(n) & (int(n) - 1)) == 0


@dataclass
class Config:
    # M: the finest step is 1/M, the self-consistency steps are 2/M ... 1 (train.py, denoise_timesteps 128)
    denoise_timesteps: int = 128  # >= 2; a power of two
    # B // bootstrap_every rows of each batch get self-consistency targets: 4 is the paper's Table 3 (ratio of
    # empirical to bootstrap targets 0.75); train.py's default is 8, which its README commands keep
    bootstrap_every: int = 4  # >= 1
    # False: the self-consistency rows split evenly over the log2 M step sizes; True: (n / 2) // log2 M of them for
    # each of d = 2/M .. 1/4, n / 4 for d = 1/2, the rest for d = 1 (39 % at M = 128) (train.py bootstrap_dt_bias)
    bootstrap_dt_bias: bool = False  # bool
    # label dropout on the flow-matching rows (train.py class_dropout_prob; ImageNet 0.1); self-consistency rows keep
    # their labels (targets_shortcut.py)
    label_dropout: float = 0.0  # in [0, 1)
    # guidance scale of the bootstrap targets of the smallest shortcut (targets_shortcut.py with bootstrap_cfg 1; the
    # README's ImageNet command: 1.5); 1: none (bootstrap_cfg 0)
    cfg_scale: float = 1.0  # >= 0
    # z' and the target are clipped to [-c, c] (targets_shortcut.py: 4)
    bootstrap_clip: float = 4.0  # > 0
    # Deviation (not in the paper or targets_shortcut.py): the flow rows' v = eps - x replaced by the batch's
    # E[eps - x | z_t] = (z_t - D) / t, D the batch's E[x | z_t] (meanflow.py's batch target); the 2-D preset sets it
    batch_target: bool = False  # bool
    # Sampler: N Euler steps of size 1/N from pure noise, N a power of two (helper_inference.py); guidance at every
    # step (helper_inference.py inference_cfg_scale, default 1: none)
    sample_steps: int = 1  # >= 1; a power of two
    sample_cfg_scale: float = 1.0  # >= 0

    def __post_init__(self):
        check_ranges(self, RANGES)
        for name in ("denoise_timesteps", "sample_steps"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")

    # Copied from diffusion.py: Config.from_preset
    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


RANGES = dict(denoise_timesteps=">= 2", bootstrap_every=">= 1", bootstrap_dt_bias="bool", label_dropout="in [0, 1)",
              cfg_scale=">= 0", bootstrap_clip="> 0", sample_steps=">= 1", sample_cfg_scale=">= 0",
              batch_target="bool")  # as commented
TIME_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # edges in t for train.py's loss-by-time log
NET_NEEDS = dict(use_r=True)  # what train.py must build into the net: a second time input r = t - d
TEACHERS = ()  # trains from data only
INIT = ("shortcut", "meanflow")  # checkpoints train.py accepts as --init: a MeanFlow net is the same u(z, t, r)
NEEDS_INIT = False  # trains from scratch

# --- Time distribution ------------------------------------------------------------------------------------------------


def sample_t_d(n, cfg, gen, device):
    """(t, d), float64, shape (n,), as targets_shortcut.py: the first n // bootstrap_every rows are self-consistency
    rows, n_k = that // log2 M of them with step d = 2^-k for k = log2 M - 1, ..., 0 (smallest first), the remainder
    with d = 1 (bootstrap_dt_bias: (that // 2) // log2 M for k = log2 M - 1, ..., 2, then that // 4 with d = 1/2, the
    rest d = 1); t is uniform on {d, 2d, ..., 1}. The other rows are flow-matching rows, d = 0, t uniform on
    {1/M, 2/M, ..., 1}. (t = 1 is the paper's t' = 0: pure noise; t = 0 is never drawn, as t' = 1 is not.)"""
    M = cfg.denoise_timesteps
    levels = int(math.log2(M))
    n_boot = n // cfg.bootstrap_every
    if cfg.bootstrap_dt_bias:
        k = torch.arange(levels - 1, 1, -1, device=device).repeat_interleave((n_boot // 2) // levels)
        k = torch.cat([k, torch.ones(n_boot // 4, dtype=k.dtype, device=device)])
    else:
        k = torch.arange(levels - 1, -1, -1, device=device).repeat_interleave(n_boot // levels)
    k = torch.cat([k, torch.zeros(n_boot - len(k), dtype=k.dtype, device=device)])
    d_boot = 2.0 ** -k.double()
    # Deviation: t of the two kinds of rows are independent draws; targets_shortcut.py draws both from one key.
    j = torch.floor(torch.rand(n_boot, generator=gen, device=device, dtype=torch.float64) / d_boot)  # 0 .. 1/d - 1
    t_boot = 1 - j * d_boot
    j = torch.floor(torch.rand(n - n_boot, generator=gen, device=device, dtype=torch.float64) * M)  # 0 .. M - 1
    t_flow = 1 - j / M
    d_flow = torch.zeros(n - n_boot, dtype=torch.float64, device=device)
    return torch.cat([t_boot, t_flow]), torch.cat([d_boot, d_flow])

# --- Parameterization -------------------------------------------------------------------------------------------------
# None: u is the raw network output and z_{t-d} = z_t - d u(z_t, t, t - d).


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


def query_r(t, d, cfg):
    """The r a step of size d from t asks the net for: t - d, or t (d = 0, the velocity) for d <= 1/M, the base case
    (targets_shortcut.py's level log2 M serves both the flow rows and the smallest half steps)."""
    return torch.where(d * cfg.denoise_timesteps <= 1, t, t - d)


def shortcut(net, z, t, d, y, cfg, scale=None):
    """u(z, t, query_r(t, d), y); with labels, a per-row guidance scale (B,) > 1 where given mixes in the null label:
    u_null + w (u_c - u_null) on those rows only (targets_shortcut.py's v_cfg; rows with w = 1 keep u_c exactly)."""
    t_in, r_in = t.to(z.dtype), query_r(t, d, cfg).to(z.dtype)
    u = net(z, t_in, r_in, y)
    check_shape(u, z.shape, "shortcut: the net's u must have the shape of z (B, *D)", "one per entry")
    if y is None or scale is None:
        return u
    rows = (scale != 1).nonzero().squeeze(1)  # possibly none: it still runs (a sharded net's forward is collective)
    u_null = net(z[rows], t_in[rows], r_in[rows], torch.zeros_like(y[rows]))
    w = bcast(scale[rows], u)
    return u.index_copy(0, rows, u_null + w * (u[rows] - u_null))

# --- Loss -------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def bootstrap_target(net, z, t, d, y, cfg):
    """u_tgt = clip([u(z, t, t - d/2) + u(z', t - d/2, t - d)] / 2), z' = clip(z - d/2 u(z, t, t - d/2)), under no
    grad, in eval mode (targets_shortcut.py calls the model with train=False); rows whose half step d/2 <= 1/M (both
    queries at r = t, the flow velocity) are guided with cfg_scale. `net` may be DDP-wrapped: these passes run on the
    bare module, as every no-grad pass in meanflow.py."""
    bare = getattr(net, "module", net)
    h = d / 2
    scale = torch.where(h * cfg.denoise_timesteps <= 1, cfg.cfg_scale, 1.0) if cfg.cfg_scale != 1 else None
    c = cfg.bootstrap_clip
    was_training = bare.training
    bare.eval()
    try:
        u_1 = shortcut(bare, z, t, h, y, cfg, scale)
        z_mid = (z - bcast(h, z) * u_1).clamp(-c, c)
        u_2 = shortcut(bare, z_mid, t - h, h, y, cfg, scale)
    finally:
        bare.train(was_training)
    return ((u_1 + u_2) / 2).clamp(-c, c)  # self-consistency, paper Sec. 3


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


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example shortcut loss (B,) and per-example logs. x: (B, *D) data, y: one-hot labels or None, gen:
    torch.Generator for t, eps and label dropout. step, teacher and images are unused: the signature is the same in
    every method. Rows 0 .. B // bootstrap_every - 1 regress u(z, t, t - d) onto the bootstrap target, the rest
    u(z, t, t) onto v = eps - x; the loss is the squared error averaged over dimensions, both kinds of rows weighted
    alike (train.py, loss_fn: mse_v)."""
    B = x.shape[0]
    t, d = sample_t_d(B, cfg, gen, x.device)  # float64
    # Deviation: every row is its own example with its own noise; targets_shortcut.py builds its flow rows from the
    # first B - B/k images again, so its first B/k images serve both kinds of rows and its last B/k none.
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    # Deviation: exactly linear; targets_shortcut.py keeps 1e-5 of the noise at t' = 1 (t = 0, which is never drawn).
    z = bcast(1 - t, x) * x + bcast(t, x) * eps
    v = eps - x
    if cfg.batch_target:  # (z - D) / t = eps - x + (x - D) / t: exact where D = x (small t)
        with torch.no_grad():
            D = batch_denoise(x, z, 1 - t, t, y)
            v = (v.double() + (x.double() - D) / bcast(t, D)).to(x.dtype)
    n_boot = B // cfg.bootstrap_every
    is_boot = torch.arange(B, device=x.device) < n_boot

    y_in = y
    if y is not None and cfg.label_dropout > 0:
        dropped = (torch.rand(B, generator=gen, device=x.device) < cfg.label_dropout) & ~is_boot
        y_in = torch.where(dropped[:, None], torch.zeros_like(y), y)

    # Deviation: the bootstrap net is the online net (targets_shortcut.py with bootstrap_ema 0); the reference's
    # default, bootstrap_ema 1, uses its EMA (decay 0.999), which the loss signature shared by every method here
    # does not carry (train.py's EMAs are for evaluation).
    u_boot = bootstrap_target(net, z[:n_boot], t[:n_boot], d[:n_boot], None if y is None else y[:n_boot], cfg)
    # Casts cached by autocast under no_grad have no grad_fn; drop them before the differentiable pass.
    torch.clear_autocast_cache()
    u_tgt = torch.cat([u_boot.to(v.dtype), v[n_boot:]])

    u = shortcut(net, z, t, d, y_in, cfg)  # r = t - d on self-consistency rows, r = t on flow rows
    L = (u.double() - u_tgt.double()).flatten(1).square().mean(dim=1)  # (B,), mean over dimensions
    Ld = L.detach()
    logs = dict(t=t, L_flow=torch.where(is_boot, 0.0, Ld), L_boot=torch.where(is_boot, Ld, 0.0))  # sum to the loss
    return L, logs

# --- Sampler ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, steps=None):
    """N = steps (default cfg.sample_steps) Euler steps of size d = 1/N from z = eps at t = 1:
    z <- z - d u(z, t, t - d), t = 1, 1 - d, ..., d (helper_inference.py; N >= M queries r = t, a flow-matching Euler
    sampler). Guidance with sample_cfg_scale at every step when y is given. Call with the EMA net in eval mode."""
    N = cfg.sample_steps if steps is None else steps
    if not is_power_of_two(N):
        raise ValueError(f"steps must be a power of two, got {N}")
    B = eps.shape[0]
    # Deviation: for N > M helper_inference.py asks for the level log2 N, which the net never trained on; here a step
    # of 1/N < 1/M queries r = t (query_r), the velocity. For N <= M the two are the same.
    d = torch.full((B,), 1 / N, device=eps.device, dtype=torch.float64)
    scale = None if cfg.sample_cfg_scale == 1 else torch.full((B,), float(cfg.sample_cfg_scale), device=eps.device,
                                                              dtype=torch.float64)
    z = eps
    for i in range(N):
        t = torch.full((B,), 1 - i / N, device=eps.device, dtype=torch.float64)
        z = z - (1 / N) * shortcut(net, z, t, d, y, cfg, scale)
    return z

# --- Presets ----------------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads (net, batch, steps, optimizer, lr, ema, ...).


# The reference recipe (train.py model_config; paper Table 3): AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 0.1,
# no warm-up, EMA 0.999 (target_update_rate, also the bootstrap net there), bf16 (model.py DiT dtype).
OFFICIAL_RECIPE = dict(optimizer="adamw", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, ema=(0.999,),
                       precision="bf16")
# The README's ImageNet-256 command: SD-VAE latents (data.py encode-latents), batch 256, 810k steps, label dropout 0.1,
# guided bootstrap targets at 1.5. Deviation: no x-flips (the reference flips the images before encoding them every
# step; latents here are encoded once).
IMAGENET256 = dict(OFFICIAL_RECIPE, cond=True, batch=256, steps=810_000, label_dropout=0.1, cfg_scale=1.5)
PRESETS = {
    # The README's CelebA-HQ 256 command (DiT-B/2 on 4x32x32 SD-VAE latents, unconditional, batch 64, 410k steps,
    # 1/4/128-step FID 20.5 / 13.8 / 6.9) on CIFAR-10 pixels: DiT-B/2 on 3x32x32 sees the same 256 tokens. Deviation:
    # the paper trains no CIFAR-10 model. Random x-flips, as the reference's data loader.
    "cifar10": dict(OFFICIAL_RECIPE, net="dit-b2", cond=False, xflip=True, batch=64, steps=410_000),
    # DiT-B/2 (README: 1/4/128-step FID 40.3 / 28.3 / 15.5) and DiT-XL/2 (10.6 / 7.8 / 3.8).
    "imagenet256": dict(IMAGENET256, net="dit-b2"),
    "imagenet256-xl": dict(IMAGENET256, net="dit-xl2"),
    # 2-D points on CPU. Deviation: meanflow.py's toy recipe (mlp-small, batch 1024, Adam lr 2e-3, warm-up 100, EMA
    # 0.999 warmed up) for 5000 steps instead of 2800, with half of each batch on self-consistency (bootstrap_every 2,
    # the paper's 4): benchmarks/toy_suite.py's worst tuning cloud 0.41 -> 0.29 (5000 steps alone 0.34, bootstrap_every
    # 2 alone 0.36; docs/presets.md), at about 250 CPU-seconds a run instead of 130 (one thread). The batch target
    # (Config.batch_target): held-out spirals 0.60 / 0.68 -> 0.48 / 0.39, every held-out cell as low or lower.
    "toy": dict(
        net="mlp-small", cond=False, batch=1024, steps=5000, optimizer="adam", lr=2e-3, betas=(0.9, 0.999),
        lr_warmup=100, ema=(0.999,), ema_warmup=True, bootstrap_every=2, batch_target=True,
    ),
}
