"""MeanFlow: one-step generation by learning the average velocity.
Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", arXiv:2505.13447v1.
Where the paper leaves a choice open, the reference implementation decides: NVIDIA FastGen, commit 34f30e8;
`mean_flow.py` below means fastgen/methods/consistency_model/mean_flow.py, `config_mean_flow.py`
fastgen/configs/methods/config_mean_flow.py, `config_mf_cifar10.py` lies in fastgen/configs/experiments/EDM/, and
`config_mf_b.py`, `config_mf_xl.py` in fastgen/configs/experiments/DiT/.

Convention: rectified-flow time, t = 0 is data and t = 1 is noise, z_t = (1 - t) x + t eps, r <= t.
The net predicts the average velocity over [r, t], so z_r = z_t - (t - r) u(z_t, t, r); at r = t it is
the instantaneous velocity v. Training uses the MeanFlow identity (Eq. 6):
    u(z_t, t, r) = v(z_t, t) - (t - r) du/dt,   du/dt = v . d_z u + d_t u   (r held fixed).

| paper      | code        | meaning                                            | shape      |
|------------|-------------|----------------------------------------------------|------------|
| x          | x           | data                                               | (B, *D)    |
| eps        | eps         | noise, N(0, I)                                     | (B, *D)    |
| t, r       | t, r        | times, 0 <= r <= t <= t_max                        | (B,)       |
| z_t        | z           | (1 - t) x + t eps                                  | (B, *D)    |
| v          | v           | eps - x, or its batch estimate given z (**)        | (B, *D)    |
| v~         | v_tgt       | target velocity: v, CFG-mixed v, or a teacher's v  | (B, *D)    |
| u_theta    | u           | network output                                     | (B, *D)    |
| du/dt      | dudt        | JVP of u along (v~, 1, 0) in (z, t, r) (*)         | (B, *D)    |
| u_tgt      | u_tgt       | sg(v~ - (t - r) du/dt)                             | (B, *D)    |
| v(z, t)    | velocity()  | a net's instantaneous velocity u(z, t, t)          | (B, *D)    |
(*) along (sg v(z, t), 1, 0), the net's own velocity, with tangent_v="net" (as Improved MeanFlow, arXiv:2512.02012).
(**) batch_target: (z - D) / t, D the batch's posterior mean of x given z (as "Stable Target Field", arXiv:2302.00670).

Network call (student and teacher): `u = net(z, t, r, y)` with z (B, *D), t and r (B,) in [0, 1] (raw, not scaled),
y one-hot (B, label_dim) with all-zero rows as the null label, or None. No preconditioning: the output is u.
`tangent="fused"` additionally needs `net(z, t, r, y, tangents=(dz, dt, dr)) -> (u, du)` (nets.py has it).

Implemented: (t, r) sampling as mean_flow.py, training-time CFG with omega/kappa on a t-interval and label dropout,
distillation from a teacher velocity with guidance, three tangents (torch.func.jvp; fused in the net;
finite differences), along v~ or the net's own velocity, tangent warm-up, adaptive loss weight (per row, or one
for the r = t rows), the batch's posterior velocity as v (batch_target; 2-D), 1-step and multi-step samplers.
Not implemented: mean_flow.py's "opt_grad" loss variant (MeanFlowModel._mf_pred_to_loss), which no MeanFlow
config there uses.
"""
import math
from contextlib import contextmanager
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
    # (t, r) distribution: logit-normal each, t = max, r = min (mean_flow.py, MeanFlowModel.single_train_step); the
    # values are config_mf_cifar10.py's
    P_mean_t: float = -0.6  # finite
    P_std_t: float = 1.6  # >= 0
    P_mean_r: float = -4.0  # finite
    P_std_r: float = 1.6  # >= 0
    t_max: float = 0.999  # in (0, 1]; config_mf_cifar10.py's cap on t and r (the sampler's start: sample_ts[0])
    ratio_r_neq_t: float = 0.75  # in [0, 1]; fraction of samples with r != t (CIFAR 0.75, DiT 0.25)
    # Loss: w = 1 / (sg(L) + c)^p, L = sum over dims of (u - u_tgt)^2 (mean_flow.py, MeanFlowModel._mf_pred_to_loss)
    norm_p: float = 0.75  # >= 0
    norm_c: float = 1e-3  # > 0
    # the r = t rows' weight: "row" each its own (mean_flow.py) | "mean" one for all of a micro-batch's r = t rows,
    # 1 / (their mean sg(L) + c)^p
    norm_r_eq_t: str = "row"  # row or mean
    # "jvp": torch.func.jvp | "fused": the net returns (u, du) | "fd": finite difference
    tangent: str = "jvp"  # jvp, fused or fd
    # the tangent's z-direction: "target" the target velocity v~ (mean_flow.py) | "net" the net's own sg u(z, t, t)
    tangent_v: str = "target"  # target or net
    fd_step: float = 1e-4  # in (0, 1); absolute step in t for tangent="fd" (config_mean_flow.py)
    # steps over which the du/dt term ramps from 0 to 1 (0: off, as config_mean_flow.py)
    tangent_warmup: int = 0  # >= 0
    # Deviation (not in mean_flow.py): v = eps - x replaced by the batch's E[v | z_t] = (z_t - D) / t, D the batch's
    # E[x | z_t] (the reference-batch posterior of "Stable Target Field", arXiv:2302.00670; cm.py's batch target), in
    # the target and the tangent alike (a teacher's velocity replaces either)
    batch_target: bool = False  # bool
    # Classifier-free guidance baked into training (mean_flow.py, MeanFlowModel._get_velocity); omega 1, kappa 0: none
    label_dropout: float = 0.0  # in [0, 1)
    cfg_omega: float = 1.0  # >= 0
    cfg_kappa: float = 0.0  # in [0, 1)
    # guidance applies for t in [cfg_t_min, cfg_t_max]
    cfg_t_min: float = 0.0  # in [0, 1], <= cfg_t_max
    cfg_t_max: float = 1.0  # in [0, 1]
    guidance_scale: float = 1.0  # >= 0; teacher CFG scale in distillation
    # Sampler: the time grid, first entry is the start (0.999: config_mf_cifar10.py's cap on t; the paper starts at 1)
    sample_ts: tuple = (0.999, 0.0)  # decreasing, in [0, 1]

    def __post_init__(self):
        for name, choices in (("tangent", ("jvp", "fused", "fd")), ("tangent_v", ("target", "net")),
                              ("norm_r_eq_t", ("row", "mean"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose {', '.join(choices)}")
        check_ranges(self, RANGES)
        if not self.cfg_t_min <= self.cfg_t_max:
            raise ValueError(f"cfg_t_min must be <= cfg_t_max, got {self.cfg_t_min} and {self.cfg_t_max}")
        ts = tuple(self.sample_ts)
        if len(ts) < 2 or not all(0 <= t <= 1 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"sample_ts must decrease from <= 1 to >= 0 with at least two entries, got {ts}")

    # Copied from diffusion.py: Config.from_preset
    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


# every numeric / bool field's range, as its comment states
RANGES = dict(P_mean_t="finite", P_std_t=">= 0", P_mean_r="finite", P_std_r=">= 0", t_max="in (0, 1]",
              ratio_r_neq_t="in [0, 1]", norm_p=">= 0", norm_c="> 0", fd_step="in (0, 1)", tangent_warmup=">= 0",
              label_dropout="in [0, 1)", cfg_omega=">= 0", cfg_kappa="in [0, 1)", cfg_t_min="in [0, 1]",
              cfg_t_max="in [0, 1]", guidance_scale=">= 0", batch_target="bool")
TIME_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # edges in t for train.py's loss-by-time log
NET_NEEDS = dict(use_r=True)  # what train.py must build into the net: a second time input r
TEACHERS = ("meanflow",)  # checkpoints train.py accepts as --teacher: their net gives v(z, t) = u(z, t, t)
INIT = ("meanflow",)  # checkpoints train.py accepts as --init
NEEDS_INIT = False  # trains from scratch

# --- Time distribution ------------------------------------------------------------------------------------------------


def logit_normal(n, P_mean, P_std, t_max, gen, device):
    n_ = torch.randn(n, generator=gen, device=device, dtype=torch.float64)
    return t_max * torch.sigmoid(P_mean + P_std * n_)


def first_k_mask(n, fraction, gen, device):
    """(n,) bool, True for the first k samples, k ~ Binomial(n, fraction). mean_flow.py puts the r = t samples
    (MeanFlowModel.single_train_step) and the label-dropped samples (MeanFlowModel._mix_condition) at the front of
    the batch on purpose, so they overlap."""
    k = (torch.rand(n, generator=gen, device=device) < fraction).sum()
    return torch.arange(n, device=device) < k


def sample_t_r(n, cfg, gen, device):
    """(t, r), float64, shape (n,); the first ~(1 - ratio_r_neq_t) n samples get r = t (flow-matching samples)."""
    t_ = logit_normal(n, cfg.P_mean_t, cfg.P_std_t, cfg.t_max, gen, device)
    r_ = logit_normal(n, cfg.P_mean_r, cfg.P_std_r, cfg.t_max, gen, device)
    t = torch.maximum(t_, r_)
    r = torch.minimum(t_, r_)
    r = torch.where(first_k_mask(n, 1 - cfg.ratio_r_neq_t, gen, device), t, r)
    return t, r

# --- Parameterization -------------------------------------------------------------------------------------------------
# None: u is the raw network output and z_r = z_t - (t - r) u.


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


def velocity(net, z, t, y=None):
    """Instantaneous velocity v(z, t) = u(z, t, t): how a MeanFlow net serves as a flow teacher."""
    return net(z, t, t, y)


@contextmanager
def eval_mode(net):
    """net in eval mode (no dropout) for guidance passes, restoring its previous mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)

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


def target_velocity(net, z, t, v, y, y_mixed, dropped, cfg, teacher=None):
    """v~ under no grad: the direction of the tangent and the target (mean_flow.py, MeanFlowModel._get_velocity).
    y_mixed is y with the rows where `dropped` (B,) is True set to the null label."""
    t_in = t.to(z.dtype)
    on = bcast(((t >= cfg.cfg_t_min) & (t <= cfg.cfg_t_max)).double(), z)  # guidance interval
    if teacher is not None:
        if y_mixed is None:
            return velocity(teacher, z, t_in)
        v_c = velocity(teacher, z, t_in, y_mixed)
        v_null = velocity(teacher, z, t_in, torch.zeros_like(y_mixed))
        omega = 1 + (cfg.guidance_scale - 1) * on
        return v_null + omega * (v_c - v_null)  # dropped rows: v_c = v_null, unguided
    if y is None or (cfg.cfg_omega == 1 and cfg.cfg_kappa == 0):
        return v
    bare = getattr(net, "module", net)  # no-grad passes bypass a DDP wrapper (see u_and_dudt)
    with eval_mode(bare):
        v_null = bare(z, t_in, t_in, torch.zeros_like(y))
        v_c = bare(z, t_in, t_in, y)
    # Casts cached by autocast under no_grad have no grad_fn; drop them before the differentiable pass.
    torch.clear_autocast_cache()
    omega = 1 + (cfg.cfg_omega - 1) * on
    kappa = cfg.cfg_kappa * on
    v_tgt = omega * v + (1 - omega - kappa) * v_null + kappa * v_c  # effective scale omega / (1 - kappa)
    return torch.where(bcast(dropped, z) > 0, v, v_tgt)  # label-dropped samples learn the unguided velocity


def u_and_dudt(net, z, t, r, y, v_tgt, cfg):
    """The differentiable u = u_theta(z, t, r, y) and the stop-gradient du/dt along (v~, 1, 0), with the same
    dropout masks (as mean_flow.py, MeanFlowModel._jvp). `net` may be DDP-wrapped: the differentiable call goes
    through the wrapper (so DDP synchronises gradients); the no-grad JVP / FD passes run on the bare module, because
    torch.func.jvp cannot trace through DDP (train.py's docstring; checked by
    tests/test_train.py::test_two_gloo_ranks_match_one_process)."""
    t_in, r_in = t.to(z.dtype), r.to(z.dtype)
    if cfg.tangent == "fused":
        u, dudt = fused_call(net, z, t_in, r_in, y, tangents=(v_tgt, torch.ones_like(t_in), torch.zeros_like(r_in)))
        check_shape(dudt, z.shape, "meanflow.loss: the net's du must have the shape of z (B, *D)", "one per entry")
        check_shape(u, z.shape, "meanflow.loss: the net's u must have the shape of z (B, *D)", "one per entry")
        return u, dudt.double()
    bare = getattr(net, "module", net)
    devices = [z.device] if z.device.type == "cuda" else []
    # fp32 (as config_mf_b.py's JVP under bf16), no graph; fork_rng restores the RNG after each pass, so all
    # passes draw the same dropout masks.
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        if cfg.tangent == "jvp":
            def u_fn(z_, t_, r_):  # tangents (v~, 1, 0) along (z, t, r)
                return bare(z_, t_, r_, y)
            with torch.random.fork_rng(devices):
                tangents = (v_tgt.to(z.dtype), torch.ones_like(t_in), torch.zeros_like(r_in))
                _, dudt = jvp_explained(u_fn, (z, t_in, r_in), tangents)
            dudt = dudt.double()
        else:  # "fd"
            dudt = _dudt_fd(bare, z, t, r, y, v_tgt, cfg, devices)
    u = net(z, t_in, r_in, y)
    check_shape(u, z.shape, "meanflow.loss: the net's u must have the shape of z (B, *D)", "one per entry")
    return u, dudt


def fused_call(net, *args, **kwargs):
    """net(*args, tangents=..., **kwargs); a net without the tangents argument gets a one-line error."""
    try:
        return net(*args, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument 'tangents'" not in str(e):
            raise
        raise TypeError("tangent='fused' needs a net that propagates tangents (nets.py's nets do); use "
                        "tangent='jvp' or 'fd'") from None


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


def _dudt_fd(net, z, t, r, y, v_tgt, cfg, devices):
    """Finite-difference du/dt: central where t +- h stay in (r, t_max], one-sided otherwise (mean_flow.py,
    MeanFlowModel._estimate_jvp_finite_difference)."""
    h = cfg.fd_step
    t_plus = torch.where(t + h <= cfg.t_max, t + h, t)
    t_minus = torch.where((t - h >= 0) & (t - h > r), t - h, t)
    outs = []
    for t_ in (t_plus, t_minus):
        z_ = z + bcast(t_ - t, z) * v_tgt.to(z.dtype)
        with torch.random.fork_rng(devices):
            outs.append(net(z_, t_.to(z.dtype), r.to(z.dtype), y).double())
    # t_plus == t_minus only when r = t and t > t_max - h; there (t - r) du/dt = 0, so any finite value will do.
    return (outs[0] - outs[1]) / bcast((t_plus - t_minus).clamp_min(h), outs[0])


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example MeanFlow loss (B,) and per-example logs. x: (B, *D) data, y: one-hot labels or None,
    step: 1-based optimizer step (tangent warm-up), gen: torch.Generator for eps, t, r and label dropout,
    teacher: None, or a frozen MeanFlow-style net (eval mode) whose velocity u(z, t, t, y) is distilled.
    images (training images seen) is unused: the signature is the same in every method."""
    B = x.shape[0]
    t, r = sample_t_r(B, cfg, gen, x.device)  # float64
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    z = bcast(1 - t, x) * x + bcast(t, x) * eps
    v = eps - x
    if cfg.batch_target:  # (z - D) / t = eps - x + (x - D) / t: exact where D = x (small t). A teacher replaces v
        with torch.no_grad():
            D = batch_denoise(x, z, 1 - t, t, y)
            v = (v.double() + (x.double() - D) / bcast(t, D)).to(x.dtype)

    # Label dropout: the first samples get the null label (mean_flow.py, MeanFlowModel._mix_condition). Deviation:
    # applied in distillation too, where mean_flow.py skips it.
    y_mixed, dropped = y, torch.zeros(B, dtype=torch.bool, device=x.device)
    if y is not None and cfg.label_dropout > 0:
        dropped = first_k_mask(B, cfg.label_dropout, gen, x.device)
        y_mixed = torch.where(dropped[:, None], torch.zeros_like(y), y)
    with torch.no_grad():
        v_tgt = target_velocity(net, z, t, v, y, y_mixed, dropped, cfg, teacher)
        dz = v_tgt
        if cfg.tangent_v == "net":  # not in mean_flow.py: Improved MeanFlow's JVP input (arXiv:2512.02012; not its
            # v-loss form or guidance input). The target keeps v~; at the optimum u(z, t, t) = E[v~ | z].
            with eval_mode(getattr(net, "module", net)) as bare:
                dz = velocity(bare, z, t.to(z.dtype), y_mixed).to(z.dtype)
            torch.clear_autocast_cache()  # as in target_velocity

    u, dudt = u_and_dudt(net, z, t, r, y_mixed, dz, cfg)
    rho = min(1.0, step / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
    u_tgt = v_tgt.double() - rho * bcast(t - r, dudt) * dudt  # MeanFlow identity, Eq. 6 (arXiv:2505.13447v1)

    err = (u.double() - u_tgt).flatten(1)
    L = err.square().sum(dim=1)  # (B,), summed over dimensions
    w = 1 / (L.detach() + cfg.norm_c) ** cfg.norm_p  # adaptive weight, sg(L)
    if cfg.norm_r_eq_t == "mean":  # not in mean_flow.py: a weight per row makes the r = t rows a robust fit whose
        # minimiser is not E[v~ | z]; one weight for all of them keeps u(z, t, t) the least-squares velocity
        eq = t == r
        w = torch.where(eq, 1 / ((L.detach() * eq).sum() / eq.sum().clamp_min(1) + cfg.norm_c) ** cfg.norm_p, w)
    logs = dict(t=t, mse_v=(u.detach().double() - v.double()).flatten(1).square().mean(dim=1), L=L.detach())
    return w * L, logs

# --- Sampler ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, ts=None, euler=False):
    """z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_i, t_{i+1}), starting from z = t_0 eps.
    euler=True uses u(z, t_i, t_i), the instantaneous velocity: a plain flow-matching Euler sampler.
    No CFG at sampling: guidance is baked into training (mean_flow.py, MeanFlowModel._student_sample_loop, "ode").
    Call with the EMA net in eval mode."""
    ts = cfg.sample_ts if ts is None else ts
    z = ts[0] * eps
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((eps.shape[0],), t_cur, device=eps.device, dtype=eps.dtype)
        r = t if euler else torch.full_like(t, t_next)
        z = z - (t_cur - t_next) * net(z, t, r, y)
    return z

# --- Presets ----------------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads (net, batch, steps, optimizer, lr, ema, ...).


EMA_DECAYS = (0.9999, 0.99995, 0.9996)  # three constant EMAs, the first evaluated (FastGen's EMA_CONST_CALLBACKS)
# ImageNet-256 on SD-VAE latents (data.py encode-latents): config_mf_b.py. bf16 with tangent="jvp": the JVP pass runs
# fully in fp32, as config_mf_b.py's; "fused" under bf16 would linearise around the bf16 primal instead (a few % off,
# docs/training.md "Precision").
IMAGENET256_DIT = dict(cond=True, batch=1024, steps=1_200_000, optimizer="adam", lr=1e-4, betas=(0.9, 0.95),
                       ema=EMA_DECAYS, precision="bf16", tangent="jvp", P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4,
                       P_std_r=1.0, ratio_r_neq_t=0.25, norm_p=1.0, norm_c=1.0, label_dropout=0.1)
PRESETS = {
    # MeanFlow on CIFAR-10: config_mf_cifar10.py, 1-NFE FID 2.82 (FastGen's
    # fastgen/methods/consistency_model/README.md). Dataset x-flips plus EDM's augmentation pipeline at p = 0.12
    # without y-flips and rotations (augment.py "meanflow": 6-d labels, augment_dim=6).
    "cifar10": dict(
        net="ddpmpp", dropout=0.2, cond=False, xflip=True, augment=0.12, augment_pipe="meanflow",
        batch=1024, steps=1_000_000,
        optimizer="adam", lr=6e-4, betas=(0.9, 0.999), lr_warmup=9765, ema=EMA_DECAYS,
        tangent="fused",
    ),
    # DiT-B/2: config_mf_b.py.
    "imagenet256": dict(IMAGENET256_DIT, net="dit-b2", cfg_omega=1.0, cfg_kappa=0.5),
    # DiT-XL/2: config_mf_xl.py (1-NFE FID 3.19, same README): a different guidance mix, on t in [0, 0.75] only.
    "imagenet256-xl": dict(IMAGENET256_DIT, net="dit-xl2", cfg_omega=0.2, cfg_kappa=0.92, cfg_t_max=0.75),
    # 2-D points on CPU, about 70 s with train.py --threads 2; CIFAR-style (t, r). Deviations, chosen on
    # benchmarks/toy_suite.py (docs/presets.md): r != t for half the batch (CIFAR: 0.75); the adaptive weight with
    # p = 0.5, c = 4 (CIFAR: 0.75, 1e-3): with c << L each sample's loss is divided by its own size^p, a median-like fit
    # that biases the velocity (spirals, 128 Euler steps of u(z, t, t): 0.39 with c = 1e-3, 0.21 with this preset, as
    # the diffusion teacher); mlp-small at batch 1024, lr 2e-3 (points seen matter more than width); the batch target
    # (Config.batch_target): with eps - x the weight per row gives separate modes the wrong mass (held-out clouds).
    "toy": dict(
        net="mlp-small", cond=False, batch=1024, steps=2800, optimizer="adam", lr=2e-3, betas=(0.9, 0.999),
        lr_warmup=100, ema=(0.999,), ema_warmup=True, tangent="fused", norm_p=0.5, norm_c=4.0, ratio_r_neq_t=0.5,
        batch_target=True,
    ),
}
