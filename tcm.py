"""TCM: truncated consistency models, stage 2 (stage 1 is an ordinary CM run of cm.py).
Lee et al., "Truncated Consistency Models", arXiv:2410.14895v2. Defaults follow the reference implementation: NVIDIA
FastGen, commit 34f30e8. Its files are cited by name: `TCM.py` below means fastgen/methods/consistency_model/TCM.py,
`noise_schedule.py` fastgen/networks/noise_schedule.py, `ct_schedule.py` fastgen/callbacks/ct_schedule.py, and
config files (methods/config_tcm.py, EDM/config_tcm_cifar10.py, EDM2/config_tcm_s.py ...) live under fastgen/configs/
(experiments/ for EDM/ and EDM2/); its results table is fastgen/methods/consistency_model/README.md.

Convention: EDM noise level sigma, as cm.py. The student only learns sigma >= transition_sigma; below it, targets come
from a frozen copy of the stage-1 CM. Per sample:
    route(x, sigma) = f_student(x, sigma) if sigma >= transition_sigma else f_stage1(x, sigma)
    sigma ~ truncated log-Student-t on [transition_sigma, sigma_max];  boundary samples sit at transition_sigma
    r = r(sigma) with the ECT ratio at its limit from the start;  target = sg(route(x_r, r))
    loss = mean over interior samples of w l  +  boundary_weight * mean over boundary samples of w l

| paper         | code                   | meaning                                                    | shape   |
|---------------|------------------------|------------------------------------------------------------|---------|
| t' (sigma_tr) | transition_sigma       | where the student takes over from the stage-1 model        |         |
| B (boundary)  | on_boundary            | samples put at sigma_tr (exactly floor(boundary_prob B))   | (B,)    |
|               | n_boundary, n_interior | sizes of the boundary set and of the rest of the batch     |         |
| f_theta       | f                      | student consistency function (cm.consistency_fn)           | (B, *D) |
| f_stage1      | teacher                | frozen stage-1 CM, TRAIN mode (dropout on), same masks     |         |

Network call: as cm.py, plus `rows=(index, B, masks)` in the routed target passes (`on_rows`: a net without that argument runs
them on the whole batch). `teacher` is the frozen stage-1 network; train.py builds it from `--stage1 RUN` (that run's
online weights, which also initialise the student and every EMA, as the `pretrained_ckpt_key_map` of FastGen's
EDM/config_tcm_cifar10.py and EDM2/config_tcm_s.py: its methods/config_tcm.py template maps the EMA instead).

What TCM reuses from cm.py (imported below, unchanged): the consistency function, r(sigma), CT's partner point x_r
(optionally the batch target), the pseudo-Huber loss and its weights, the sampler. What is new here: the
log-Student-t time distribution, the boundary set, routing. Presets and the sweeps behind the toy one: docs/presets.md.
"""
import functools
import math
from dataclasses import dataclass, fields

import torch

import cm
from cm import WEIGHTINGS, bcast, check_ranges, consistency_fn, ct_partner, distance_loss, partner_sigma

# --- Config ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    # sigma ~ log-Student-t: ln(sigma) = mu + s T_nu, truncated to [transition_sigma, sigma_max]; these and the
    # boundary set: FastGen methods/config_tcm.py (log_t_df, train_p_mean, train_p_std, transition_t, boundary_prob,
    # w_boundary)
    student_t_nu: float = 0.01  # > 0
    student_t_mu: float = 0.0  # finite
    student_t_scale: float = 0.2  # > 0
    transition_sigma: float = 1.0  # > 0, < sigma_max
    sigma_max: float = 80.0  # > 0
    # exactly floor(boundary_prob * B) samples per micro-batch sit at transition_sigma
    boundary_prob: float = 0.25  # in [0, 1)
    boundary_weight: float = 0.1  # >= 0
    # As in cm.py (same names, read by cm's functions). The ECT ratio stays at its limit: FastGen's stages of 1000 kimg
    # count on from stage 1's images (methods/config_tcm.py; ct_schedule.py, CTScheduleCallback._get_cur_stage)
    sigma_data: float = 0.5  # > 0
    sigma_min: float = 0.002  # > 0, < sigma_max; only used by the boundary parameterisation (boundary=True)
    ratio_limit: float = 0.999  # in (0, 1)
    r_min: float = 0.002  # >= 0, < sigma_max
    huber_c: float = 1e-8  # >= 0
    weighting: str = "inv_gap"  # one of cm.WEIGHTINGS
    boundary: bool = False  # bool
    # x_r from the batch's E[x | x_sigma] (cm.ct_partner). Deviation: the toy preset uses it
    batch_target: bool = False  # bool
    # the student's EMA alone; 2 steps: 80, 1.0, 0 (CIFAR-10)
    sample_sigmas: tuple = (79.5638, 0.0)  # finite, decreasing to 0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        check_ranges(self, RANGES)
        for name in ("transition_sigma", "sigma_min", "r_min"):
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


# every numeric / bool field's range, as its comment states
RANGES = dict(student_t_nu="> 0", student_t_mu="finite", student_t_scale="> 0", transition_sigma="> 0",
              sigma_max="> 0", boundary_prob="in [0, 1)", boundary_weight=">= 0", sigma_data="> 0", sigma_min="> 0",
              ratio_limit="in (0, 1)", r_min=">= 0", huber_c=">= 0", boundary="bool", batch_target="bool")
TIME_BINS = (0.0, 1.0, 1.1, 1.5, 3.0, 10.0, 1000.0)  # edges in sigma: the distribution is concentrated just above 1
NET_NEEDS = dict()
TEACHERS = ()  # no --teacher; the frozen network comes from --stage1
INIT = ("tcm",)  # --init (rarely useful: --stage1 already sets the weights)
STAGE1 = ("cm", "tcm")  # --stage1 checkpoints: their online weights start everything
NEEDS_INIT = False  # --stage1 is required instead (train.py fails without it)

# --- Time distribution -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _student_t_table(nu, lo, hi, device, n=200_001):
    """Grid T on [lo, hi] (denser near lo, where the mass is) and the normalised CDF of the density
    (1 + T^2 / nu)^-(nu + 1)/2 by the trapezoid rule; float64, built once per device."""
    u = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    T = lo + (hi - lo) * u**3
    density = (1 + T**2 / nu) ** (-(nu + 1) / 2)
    mass = (density[1:] + density[:-1]) / 2 * T.diff()  # trapezoid per grid interval
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(mass, 0)])
    return T, cdf / cdf[-1]


def sample_sigma_student_t(n, cfg, gen, device):
    """sigma with ln(sigma) = mu + s T_nu truncated to [transition_sigma, sigma_max], by inverse CDF on a tabulated
    grid. float64 (n,). Deviation: FastGen (noise_schedule.py, EDMNoiseSchedule._truncated_log_t_sample) inverts scipy's
    Student-t CDF on draws from numpy's global RNG; a torch generator here, so every rank draws its own times."""
    lo = (math.log(cfg.transition_sigma) - cfg.student_t_mu) / cfg.student_t_scale
    hi = (math.log(cfg.sigma_max) - cfg.student_t_mu) / cfg.student_t_scale
    T_grid, cdf = _student_t_table(cfg.student_t_nu, lo, hi, str(device))
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    i = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
    frac = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)
    T = T_grid[i - 1] + frac * (T_grid[i] - T_grid[i - 1])
    return torch.exp(cfg.student_t_mu + cfg.student_t_scale * T).clamp(cfg.transition_sigma, cfg.sigma_max)


def boundary_mask(n, cfg, gen, device):
    """(n,) bool: exactly floor(boundary_prob n) random samples, or Bernoulli(boundary_prob) each when that is 0
    (FastGen TCM.py, TCMModel.single_train_step)."""
    k = math.floor(cfg.boundary_prob * n)
    if k == 0:
        return torch.rand(n, generator=gen, device=device) < cfg.boundary_prob
    chosen = torch.randperm(n, generator=gen, device=device)[:k]
    return torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, chosen, True)

# --- Parameterization --------------------------------------------------------------------------------------------


def route(student, stage1, x, sigma, y, cfg):
    """f_student(x, sigma) where sigma >= transition_sigma, f_stage1(x, sigma) elsewhere, per sample (FastGen TCM.py,
    TCMPrecond.forward, which runs the stage-1 net on the whole batch and the student on it too when any row needs it:
    the same values). Here each net runs on its own rows (`on_rows`), so the two passes cost one pass over the batch
    and draw its dropout masks once."""
    is_student = sigma >= cfg.transition_sigma  # (B,)
    out = torch.empty_like(x)
    masks = []  # the batch's dropout masks, drawn by the first pass and read by the second
    for net, rows in ((stage1, (~is_student).nonzero()[:, 0]), (student, is_student.nonzero()[:, 0])):
        if len(rows) or net is student:  # a sharded student's forward is collective: every rank calls it
            out[rows] = on_rows(net, x, sigma, y, cfg, rows, masks)
    return out


def takes_rows(net):
    """Whether net.forward has a `rows` argument (nets.py's nets do), read from its code object: its own parameters."""
    code = getattr(net.forward, "__code__", None)
    return code is not None and "rows" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


def on_rows(net, x, sigma, y, cfg, rows, masks):
    """f(x, sigma)[rows] with the dropout masks the gradient pass will draw for these rows: the RNG is forked (each
    pass starts from the state the gradient pass starts from; the nets share an architecture) and the net is told which
    rows of the batch it sees, `net(x_in, c_noise, y=y, rows=(rows, B, masks))` (every nets.py net: dropout keeps these
    rows of the whole batch's masks, drawn into the list `masks` by the first pass that needs them). A net whose forward
    takes no `rows` runs on the whole batch."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices):
        if not takes_rows(net):
            return consistency_fn(net, x, sigma, y, cfg)[rows]
        net_on_rows = functools.partial(net, rows=(rows, x.shape[0], masks))
        return consistency_fn(net_on_rows, x[rows], sigma[rows], None if y is None else y[rows], cfg)

# --- Loss --------------------------------------------------------------------------------------------------------


def loss(net, x, y, cfg, step, gen, teacher=None, images=None):
    """Per-example TCM loss (B,) whose batch mean is mean_interior(w l) + boundary_weight mean_boundary(w l) (FastGen
    TCM.py, TCMModel.single_train_step on CMModel._compute_cm_loss). teacher: the frozen stage-1 net (train mode);
    `net` may be DDP-wrapped (no-grad passes use the bare module)."""
    if teacher is None:
        raise ValueError("tcm needs the frozen stage-1 network (train.py: --stage1 RUN)")
    B = x.shape[0]
    sigma = sample_sigma_student_t(B, cfg, gen, x.device)
    on_boundary = boundary_mask(B, cfg, gen, x.device)
    sigma = torch.where(on_boundary, torch.full_like(sigma, cfg.transition_sigma + 1e-8), sigma)
    sigma, r = partner_sigma(sigma, cfg.ratio_limit, cfg)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    x_sigma = x + bcast(sigma, x) * eps
    with torch.no_grad():
        x_r = ct_partner(x, x_sigma, eps, sigma, r, y, cfg)
        target = torch.nan_to_num(route(getattr(net, "module", net), teacher, x_r, r, y, cfg))
    torch.clear_autocast_cache()  # as cm.loss: no cast cached under no_grad may reach the differentiable pass
    f = consistency_fn(net, x_sigma, sigma, y, cfg)  # sigma >= transition: always the student
    per_example, d = distance_loss(f, target, sigma, r, cfg)
    n_boundary = on_boundary.sum().double().clamp_min(1)
    n_interior = (~on_boundary).sum().double().clamp_min(1)
    scale = torch.where(on_boundary, cfg.boundary_weight * B / n_boundary, B / n_interior)  # batch mean = the TCM loss
    return scale * per_example, dict(t=sigma, gap=sigma - r, d=d.detach(), boundary=on_boundary.double())

# --- Sampler -----------------------------------------------------------------------------------------------------


sample = cm.sample  # the student's EMA alone, no routing (FastGen TCM.py: TCMModel keeps CMModel._get_outputs)

# --- Presets -----------------------------------------------------------------------------------------------------
# Config fields plus the training recipe train.py reads. Pass --stage1 CM_RUN.


IMAGENET64_EDM2 = dict(cond=True, batch=1024, steps=400_000, optimizer="adam", betas=(0.9, 0.99), lr_ref_steps=8000,
                       ema=(0.01, 0.05, 0.10), ema_kind="power", ratio_limit=0.9961, huber_c=0.06,
                       weighting="inv_c_out_sq", precision="bf16")
PRESETS = {
    # TCM CIFAR-10 as FastGen runs it (EDM/config_tcm_cifar10.py on methods/config_tcm.py), stage 1 = the cm.py cifar10
    # run: 1-step FID 2.70 (FastGen's results table; TCM's paper reports 2.46). 2-step list that config recommends:
    # 80, 1.0, 0.
    "cifar10": dict(
        net="ddpmpp", dropout=0.2, cond=False, batch=1024, steps=300_000, optimizer="radam", lr=5e-5,
        betas=(0.9, 0.999), ema=(0.9999, 0.99995, 0.9996),
    ),
    # TCM ImageNet-64 with EDM2-S (EDM2/config_tcm_s.py) on the cm.py imagenet64 run; power EMAs whose step count
    # continues from stage 1. Deviation: bf16 autocast instead of fp16 with a loss scaler, which train.py does not
    # have (bf16 needs none).
    "imagenet64": dict(IMAGENET64_EDM2, net="edm2-s", dropout_res=(16, 8), dropout=0.4, lr=5e-4),
    # EDM2-XL (EDM2/config_tcm_xl.py; 1-step FID 2.23 in FastGen's results table) on the cm.py imagenet64-xl run.
    "imagenet64-xl": dict(IMAGENET64_EDM2, net="edm2-xl", dropout_res=(16, 8), dropout=0.5, lr=1e-4),
    # 2-D points on CPU on top of the cm.py toy run, 2500 steps. Deviations for a short run: ratio limit 0.99 (with
    # 0.999 the 1-step sample first gets worse, sliced W2 0.05 -> 0.17 after 1000 steps); the stage-1 EMA starts
    # everything (a short run's online weights score 0.23, its EMA 0.05); batch_target as cm.py's toy preset (worst
    # cell of benchmarks/toy_suite.py 0.41 -> 0.30, a cell the mean of 8 draws). sigma_data 1 and the net
    # (mlp-fourier) as the cm.py toy run's (the --stage1 check requires them). The numbers in full: docs/presets.md.
    "toy": dict(
        net="mlp-fourier", cond=False, batch=256, steps=2500, optimizer="adam", lr=5e-5, betas=(0.9, 0.999),
        ema=(0.999,), ema_warmup=True, ratio_limit=0.99, stage1_weights="ema", sigma_data=1.0, batch_target=True,
    ),
}
