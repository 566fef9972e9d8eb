"""Flow maps by self-distillation: a diagonal flow-matching term plus a Lagrangian, Eulerian or progressive term.
Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: Learning flow maps via self-distillation",
arXiv:2505.18825v2. Where the paper leaves a choice open, the official JAX code decides: nmboffi/flow-maps;
`losses.py` below means its common/losses.py (diagonal_term, lsd_term, esd_term, psd_term, setup_loss), `loss_args.py`
common/loss_args.py (get_loss_fn_args_randomness), `flow_map.py` common/flow_map.py (FlowMap, sample), and
`cifar10_paper.py` its CIFAR-10 experiment config (loss_type, psd_type, stopgrad_type list; EDM2 U-Net).

Convention: rectified-flow time as meanflow.py, t = 0 is data and t = 1 is noise, z_t = (1 - t) x + t eps. The paper
runs time the other way (tau = 0 noise, tau = 1 data, I_tau = (1 - tau) x_0 + tau x_1, x_0 the noise): tau = 1 - t.
Its flow map X_{s,t}(x) = x + (t - s) v_{s,t}(x), s <= t, is here X(z; t, r) = z - (t - r) u(z, t, r) with
t = 1 - s_paper >= r = 1 - t_paper, so v_{s,t} = -u(z, t, r) and the velocity b = v_{t,t} = -u(z, t, t) = -v.
The paper's three characterisations of the flow map, in these symbols (X = X(z; t, r), v(z, t) = u(z, t, t)):
    LSD (Lagrangian):  d_r X = -v(X, r)     <=>  u - (t - r) d_r u = v(X, r)
    ESD (Eulerian):    d_t X + grad_z X v(z, t) = 0  <=>  u + (t - r) (d_t u + grad_z u v) = v(z, t)   (MeanFlow's)
    PSD (progressive): X(.; t, r) = X(X(.; t, m); m, r)  <=>  u(z, t, r) = (1 - h) u(z, t, m) + h u(z', m, r),
                       m = h t + (1 - h) r, z' = X(z; t, m)  (loss_args.py: u = h s + (1 - h) t in the paper's time)

| paper        | code        | meaning                                                   | shape      |
|--------------|-------------|-----------------------------------------------------------|------------|
| x_1          | x           | data                                                      | (B, *D)    |
| x_0          | eps         | noise, N(0, I)                                            | (B, *D)    |
| 1 - s, 1 - t | t, r        | start and end time, r <= t (r = t on diagonal rows)       | (B,)       |
| 1 - u        | m           | PSD's intermediate time, r <= m <= t                      | (B,)       |
| I_s          | z           | (1 - t) x + t eps                                         | (B, *D)    |
| -I_dot       | v           | eps - x, the flow-matching target                         | (B, *D)    |
| -v_{s,t}     | u           | network output u(z, t, r)                                 | (B, *D)    |
| X_{s,t}(I_s) | X           | z - (t - r) u                                             | (B, *D)    |
| -b_t         | v(z, t)     | u(z, t, t), the diagonal: the instantaneous velocity      | (B, *D)    |

Network call: `u = net(z, t, r, y)` with z (B, *D), t and r (B,) in [0, 1] (raw), y one-hot or None; tangent="fused"
also needs `net(z, t, r, y, tangents=(dz, dt, dr)) -> (u, du)` (nets.py). The same net as meanflow.py's; with
learned_weight also `net(..., return_logvar=True) -> (out, w)`, w (B,) a function of (t, r) only.
Implemented: losses.py's three terms with its stop-gradients (LSD and PSD "convex", ESD "full" as in
cifar10_paper.py), the diagonal / off-diagonal batch split, uniform or midpoint PSD, N-step flow-map sampler, the
learned time weight exp(-w) L + w of every term (`learned_weight`; w(t, r) from the net's log-variance head, as
edm2_net.py's PrecondFlowMap.calc_weight: embeddings of both times, then a linear layer).
Flow-map distillation (`teacher`): a frozen teacher's velocity v_T(z, t) = u_T(z, t, t) (a MeanFlow, shortcut or
flow-map net, or a diffusion model seen as one) replaces the net's own diagonal: in LSD's v(X, r), in ESD's v(z, t),
and as the diagonal rows' target (Lagrangian / Eulerian map distillation, "Flow map matching", arXiv:2406.07507;
AYF-LMD / EMD in "Align Your Flow", arXiv:2506.14603). PSD has no velocity besides the diagonal's: there the teacher
acts on the diagonal rows only.
Not implemented: label dropout and guidance (labels, with --cond, reach every pass with their rows: a
class-conditional flow map), losses.py's other regularisers (constraints, two-stage).
"""
import inspect
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
    # off-diagonal term: "lsd" (the paper's best, its abstract), "esd" or "psd" (losses.py, setup_loss)
    loss_kind: str = "lsd"  # lsd, esd or psd
    # PSD's intermediate time: "uniform" (h ~ U(0, 1)) or "midpoint" (h = 1/2) (loss_args.py)
    psd_type: str = "uniform"  # uniform or midpoint
    # the first max(1, int(B diag_fraction)) rows are diagonal (flow matching) rows (cifar10_paper.py: 0.75)
    diag_fraction: float = 0.75  # in (0, 1]
    # "jvp": torch.func.jvp | "fused": the net returns (u, du) | "fd": central finite difference
    tangent: str = "jvp"  # jvp, fused or fd
    fd_step: float = 1e-4  # in (0, 1); step in t (ESD), r (LSD) and along v (ESD) for tangent="fd"
    # the learned time weight (network.use_weight; cifar10_paper.py: on, the 2-D configs: off): each row's loss is
    # exp(-w) L + w, w = w(t, r) the net's log-variance head (EDM2's uncertainty weight; edm2_net.py, calc_weight).
    # Deviation: off in every preset here: the official code pairs it with EDM2's magnitude-preserving head (|w| at
    # most the norm of its time embedding); with nets.py's linear heads every 2-D run diverged (docs/presets.md)
    learned_weight: bool = False  # bool
    # Sampler: N uniform steps of the flow map from t = 1 (flow_map.py, sample: linspace(0, 1, N + 1))
    sample_steps: int = 1  # >= 1

    def __post_init__(self):
        for name, choices in (("loss_kind", ("lsd", "esd", "psd")), ("psd_type", ("uniform", "midpoint")),
                              ("tangent", ("jvp", "fused", "fd"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose {', '.join(choices)}")
        check_ranges(self, RANGES)

    # Copied from diffusion.py: Config.from_preset
    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset's method settings (the rest of PRESETS[name] is train.py's recipe), then overrides (checked)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in PRESETS[name].items() if k in names}, **overrides})


# each field's range, as its comment states
RANGES = dict(diag_fraction="in (0, 1]", fd_step="in (0, 1)", learned_weight="bool", sample_steps=">= 1")
TIME_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # edges in t for train.py's loss-by-time log
NET_NEEDS = dict(use_r=True)  # what train.py must build into the net: a second time input r


def net_needs(cfg):
    """NET_NEEDS for a config (a dict or Config): with learned_weight also the log-variance head, of t and r."""
    on = cfg.get("learned_weight", False) if isinstance(cfg, dict) else cfg.learned_weight  # earlier runs: none
    return dict(NET_NEEDS, logvar=bool(on))


# --teacher: a net whose diagonal u(z, t, t) is a flow velocity, or a diffusion model, read as one by train.py
# (diffusion.py, FlowVelocity)
TEACHERS = ("meanflow", "shortcut", "flowmap", "diffusion")
INIT = ("flowmap", "meanflow", "shortcut")  # checkpoints train.py accepts as --init: the same u(z, t, r) net
NEEDS_INIT = False  # trains from scratch

# --- Time distribution ------------------------------------------------------------------------------------------------


def sample_times(n, cfg, gen, device):
    """(t, r, m, h), float64, shape (n,), as loss_args.py: the first max(1, int(n diag_fraction)) rows have r = t,
    t ~ U(0, 1); the others t = max(a, b), r = min(a, b), a, b ~ U(0, 1) (uniform on the triangle r <= t); PSD's
    m = h t + (1 - h) r with h ~ U(0, 1) ("uniform") or h = 1/2 ("midpoint")."""
    n_diag = max(1, int(n * cfg.diag_fraction))
    t_diag = torch.rand(n_diag, generator=gen, device=device, dtype=torch.float64)
    a = torch.rand(n - n_diag, generator=gen, device=device, dtype=torch.float64)
    b = torch.rand(n - n_diag, generator=gen, device=device, dtype=torch.float64)
    t = torch.cat([t_diag, torch.maximum(a, b)])
    r = torch.cat([t_diag, torch.minimum(a, b)])
    if cfg.psd_type == "uniform":
        h = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    else:
        h = torch.full((n,), 0.5, device=device, dtype=torch.float64)
    m = h * t + (1 - h) * r
    return t, r, m, h

# --- Parameterization -------------------------------------------------------------------------------------------------
# X(z; t, r) = z - (t - r) u(z, t, r): the paper's X_{s,t}(x) = x + (t - s) v_{s,t}(x), so X(z; t, t) = z exactly.


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


def net_u(net, z, t, r, y=None):
    """u(z, t, r) from the net, times in z's dtype, its shape checked (a wrong one would broadcast in the loss)."""
    return net_uw(net, z, t, r, y, False)[0]


def check_takes_logvar(net):
    """learned_weight calls net(..., return_logvar=True) -> (out, w): a one-line error for a net without it."""
    params = inspect.signature(getattr(net, "module", net).forward).parameters
    if "return_logvar" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise TypeError("learned_weight=True needs a net that takes return_logvar=True and returns (out, w), w (B,) a "
                        "function of t and r (nets.py's nets built with logvar=True); or set learned_weight=False")


def net_uw(net, z, t, r, y, weight):
    """(u, w): u(z, t, r) and, with weight, the net's log-variance head w(t, r) (B,) (else None), shapes checked."""
    args = (z, t.to(z.dtype), r.to(z.dtype), y)
    u, w = net(*args, return_logvar=True) if weight else (net(*args), None)
    check_shape(u, z.shape, "flowmap: the net's u must have the shape of z (B, *D)", "one per entry")
    if weight:
        check_shape(w, t.shape, "flowmap: the net's logvar must have shape (B,)", "one per row")
    return u, w

# --- Loss -------------------------------------------------------------------------------------------------------------


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


def u_and_du(net, z, t, r, y, dz, dt, dr, cfg, weight=False):
    """(u, du, w): u = u(z, t, r), du its derivative along (dz, dt, dr) (each (B, *D) / (B,) or None: zero) and, with
    weight, the net's log-variance head w(t, r) from the same call (else None). "jvp" and "fd": du carries the
    gradient, as losses.py differentiates through X.partial_t / partial_s; "fused": du carries none (nets.py computes
    it without a graph)."""
    t_in, r_in = t.to(z.dtype), r.to(z.dtype)
    zero_z, zero_t = torch.zeros_like(z), torch.zeros_like(t_in)
    tangents = (zero_z if dz is None else dz, zero_t if dt is None else dt, zero_t if dr is None else dr)
    if cfg.tangent == "fused":
        # Deviation: du is a stop-gradient here (MeanFlow's choice); the fixed point is the same, the gradient is
        # that of regressing u onto a target holding sg(du).
        out = fused_call(net, z, t_in, r_in, y, tangents=tangents, **({"return_logvar": True} if weight else {}))
        (u, du), w = out if weight else (out, None)
        check_shape(du, z.shape, "flowmap: the net's du must have the shape of z (B, *D)", "one per entry")
    elif cfg.tangent == "jvp":
        if hasattr(net, "module"):
            raise ValueError("tangent='jvp' differentiates through torch.func.jvp on the bare module, which a DDP "
                             "wrapper cannot synchronise; use tangent='fused' or 'fd' with several processes")

        def u_fn(z_, t_, r_):
            return net(z_, t_, r_, y, return_logvar=True) if weight else net(z_, t_, r_, y)
        out, d_out = jvp_explained(u_fn, (z, t_in, r_in), tangents)
        (u, w), du = (out, d_out[0]) if weight else ((out, None), d_out)
    else:  # "fd"
        h = cfg.fd_step
        u, w = net_uw(net, z, t, r, y, weight)
        ups = [net(z + s * h * tangents[0], t_in + s * h * tangents[1], r_in + s * h * tangents[2], y)
               for s in (1, -1)]
        du = (ups[0] - ups[1]) / (2 * h)
    check_shape(u, z.shape, "flowmap: the net's u must have the shape of z (B, *D)", "one per entry")
    if weight:
        check_shape(w, t.shape, "flowmap: the net's logvar must have shape (B,)", "one per row")
    return u, du, w


def offdiag_residual(net, z, t, r, m, h, y, cfg, teacher=None):
    """(residual, w): the paper's self-distillation residual on rows with r < t (B_off, *D), float64, and with
    cfg.learned_weight the student's log-variance head w(t, r) (B_off,) (else None). The teacher side of each runs
    on the bare module in eval mode under no grad (losses.py: teacher_params = params, train=False), or, for LSD's
    and ESD's velocity, on `teacher` (flow-map distillation)."""
    bare = getattr(net, "module", net)
    weight = cfg.learned_weight
    vel = bare if teacher is None else teacher  # whose diagonal u(z, t, t) is the velocity
    was_training = bare.training
    bare.eval()
    try:
        if cfg.loss_kind == "lsd":
            # Lagrangian: d_r X = u - (t - r) d_r u; teacher v(sg X, r) (lsd_term, "convex")
            u, du_r, w = u_and_du(net, z, t, r, y, None, None, torch.ones_like(r.to(z.dtype)), cfg, weight)
            with torch.no_grad():
                X = z - bcast(t - r, z) * u
                v_X = vel(X, r.to(z.dtype), r.to(z.dtype), y)
            return (u - bcast(t - r, z) * du_r - v_X).double(), w
        if cfg.loss_kind == "esd":
            # Eulerian: -d_t X = u + (t - r) d_t u carries the gradient; the advective term
            # grad_z X v = v - (t - r) grad_z u v is a stop-gradient (esd_term, "full" in cifar10_paper.py)
            with torch.no_grad():
                v = vel(z, t.to(z.dtype), t.to(z.dtype), y)
            if cfg.tangent == "fused":
                one = torch.ones_like(t.to(z.dtype))
                u, du, w = u_and_du(net, z, t, r, y, v, one, None, cfg, weight)  # du = d_t u + grad_z u v
                return (u + bcast(t - r, z) * du - v).double(), w
            u, du_t, w = u_and_du(net, z, t, r, y, None, torch.ones_like(t.to(z.dtype)), None, cfg, weight)
            with torch.no_grad():
                _, du_z, _ = u_and_du(bare, z, t, r, y, v, None, None, cfg)
            return (u + bcast(t - r, z) * (du_t + du_z) - v).double(), w
        # Progressive: student u(z, t, r); teacher sg of the two jumps (psd_term, "convex")
        t_in, r_in, m_in = t.to(z.dtype), r.to(z.dtype), m.to(z.dtype)
        with torch.no_grad():
            u_tm = bare(z, t_in, m_in, y)
            z_m = z - bcast(t - m, z) * u_tm
            u_mr = bare(z_m, m_in, r_in, y)
            u_tgt = bcast(1 - h, z) * u_tm + bcast(h, z) * u_mr
        u, w = net_uw(net, z, t, r, y, weight)
        return (u - u_tgt).double(), w
    finally:
        bare.train(was_training)


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example loss (B,) and per-example logs. x: (B, *D) data, y: one-hot labels or None, gen: torch.Generator
    for t, r, h and eps. teacher: None (self-distillation), or a frozen net in eval mode whose velocity u(z, t, t, y)
    is distilled. step and images are unused: the signature is the same in every method.
    Rows 0 .. n_diag - 1: |u(z, t, t) - v|^2 (diagonal_term; v = eps - x, or the teacher's v_T(z, t)); the others:
    |residual|^2 (lsd/esd/psd_term); squares summed over dimensions, every row weighted alike (setup_loss: the batch
    mean of both parts), or with cfg.learned_weight each row's L as exp(-w) L + w, w = w(t, r) (r = t on the diagonal)
    the net's log-variance head, as each of those terms."""
    B = x.shape[0]
    if cfg.learned_weight:
        check_takes_logvar(net)
    t, r, m, h = sample_times(B, cfg, gen, x.device)  # float64
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    z = bcast(1 - t, x) * x + bcast(t, x) * eps
    v = eps - x
    n = max(1, int(B * cfg.diag_fraction))
    y_d, y_o = (None, None) if y is None else (y[:n], y[n:])

    # Deviation: with a teacher the diagonal rows stay and regress onto its velocity (the distillation losses of
    # arXiv:2406.07507 have no diagonal term); the same fixed point, and u(z, t, t) is learned directly.
    with torch.no_grad():
        v_diag = v[:n] if teacher is None else net_u(teacher, z[:n], t[:n], t[:n], y_d)
    u_diag, w_diag = net_uw(net, z[:n], t[:n], t[:n], y_d, cfg.learned_weight)  # train mode: diagonal_term
    err_diag = (u_diag.double() - v_diag.double()).flatten(1)
    # The off-diagonal rows are a second differentiable pass (in eval mode, as losses.py's); DDP syncs the gradients
    # of both once (tests/test_train.py, flowmap cases).
    res, w_off = (offdiag_residual(net, z[n:], t[n:], r[n:], m[n:], h[n:], y_o, cfg, teacher) if n < B
                  else (x.new_zeros((0, *x.shape[1:]), dtype=torch.float64), x.new_zeros(0)))
    L = torch.cat([err_diag.square().sum(dim=1), res.flatten(1).square().sum(dim=1)])  # (B,), summed over dims
    logs = dict(t=t)
    if cfg.learned_weight:
        w = torch.cat([w_diag, w_off]).double()
        logs.update(L_raw=L.detach(), logvar=w.detach())
        L = torch.exp(-w) * L + w
    Ld = L.detach()
    is_diag = torch.arange(B, device=x.device) < n
    logs.update(L_diag=torch.where(is_diag, Ld, 0.0), L_off=torch.where(is_diag, 0.0, Ld))  # they sum to the loss
    return L, logs

# --- Sampler ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(net, eps, cfg, y=None, steps=None):
    """N = steps (default cfg.sample_steps) jumps of the flow map on the uniform grid t_i = 1 - i / N from z = eps:
    z <- X(z; t_i, t_{i+1}) = z - (t_i - t_{i+1}) u(z, t_i, t_{i+1}) (flow_map.py, sample). Call with the EMA net in
    eval mode."""
    N = cfg.sample_steps if steps is None else steps
    z = eps
    for i in range(N):
        t, r = (torch.full(eps.shape[:1], 1 - j / N, device=eps.device, dtype=torch.float64) for j in (i, i + 1))
        z = z - bcast(t - r, z) * net_u(net, z, t, r, y)
    return z

# --- Presets ----------------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads (net, batch, steps, optimizer, lr, ema, ...).


PRESETS = {
    # cifar10_paper.py (the paper's CIFAR-10 runs; flow-maps.github.io: LSD FID 3.33 at 8 steps): batch 512, 204.8M
    # samples (400k steps), Adam lr 1e-2 with inverse-sqrt decay after 35k steps (EDM2's schedule), gradient clip 1,
    # EMA 0.999 / 0.9999 (FID on the second), the learned time weight. Deviation: nets.py's ddpmpp with dropout 0.13,
    # not the EDM2 U-Net (channels 128, mult 2-2-2, 4 blocks, its magnitude-preserving layers need lr 1e-2); lr 2e-4
    # as EDM/DDPM++; no learned time weight (Config.learned_weight: with --net edm2-* it is the official pairing).
    "cifar10": dict(
        net="ddpmpp", dropout=0.13, cond=False, xflip=True, batch=512, steps=400_000,
        optimizer="adam", lr=2e-4, betas=(0.9, 0.999), ema=(0.9999, 0.999), tangent="fused",
    ),
    # 2-D points on CPU. Deviation: meanflow.py's toy recipe (mlp-small, batch 1024, Adam lr 2e-3, warm-up 100, EMA
    # 0.999 warmed up) for 5000 steps, not the paper's 2-D setting (checker, batch 100, lr 3e-4). 5000 steps, not
    # 2800: held-out clouds of benchmarks/toy_suite.py at or below 0.35 on 11 of 12 (9), worst 0.48 (0.62), at about
    # 330 CPU-seconds a run instead of 190 (docs/presets.md). No learned time weight, as the official 2-D configs
    # (their MLP's weight is the constant 1: exp(-1) L + 1, a fixed rescale of L).
    "toy": dict(
        net="mlp-small", cond=False, batch=1024, steps=5000, optimizer="adam", lr=2e-3, betas=(0.9, 0.999),
        lr_warmup=100, ema=(0.999,), ema_warmup=True,
    ),
}
