"""The training loop: any method on 1 CPU, 1 GPU or N GPUs.

    python train.py --method meanflow --data toy                          # 2-D demo, about a minute on 2 CPU cores
    python train.py --method meanflow --data cifar10 --out runs/mf-c10    # one GPU
    torchrun --nproc_per_node=8 train.py --method meanflow --data cifar10 --out runs/mf-c10
    torchrun --nproc_per_node=8 train.py --method meanflow --data cifar10 --tangent fused --fsdp   # sharded (FSDP2)
    python train.py --method meanflow --data toy --steps 6000 --resume runs/meanflow-toy-000   # continue a run
    python train.py --method meanflow --help                              # every flag, with the preset's values

main() is the loop over named stages. Defaults come from the method's preset for the data (`--preset` overrides the
choice), then the flags (recipe.py); checkpoints.py owns run folders and checkpoints, fid.py the FID of --fid-every.
The global batch --batch is split into micro-batches of --batch-gpu, spread over ranks and accumulation rounds.
Micro-batch m of step k draws its data, noise and dropout masks from a seed of (seed, k, m), so the result
does not depend on that split (1 process x 2 rounds == 2 processes x 1 round) and --resume is exact.

Gradient sync with a JVP loss: the differentiable forward is the only call that goes through the DDP wrapper;
every no-grad pass (the JVP, finite differences, guidance) runs on the bare module inside the method file.
tests/test_train.py checks that 2 gloo ranks end with identical weights, equal to the 1-process run.
--fsdp shards the net, gradients, optimizer state and EMAs instead (parallel.py; FSDP2 has no wrapper: every pass runs
on the sharded module, and tests/test_fsdp.py checks every method against the 1-process run).
"""
import array
import contextlib
import copy
import dataclasses
import functools
import gc
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import augment
import checkpoints
import curves
import data
import fid
import parallel
import recipe
import trackers
from checkpoints import build_net
from cli import UsageError, run_main, setup_distributed

# --- EMA, learning rate, gradients -----------------------------------------------------------------------------


@functools.lru_cache
def power_gamma(sigma_rel):
    """Exponent gamma of EDM2's power-function EMA (arXiv:2312.02696) for a relative width sigma_rel:
    sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), i.e. the largest real root of g^3 + 7 g^2 + (16 - s) g + 12 - s,
    s = sigma_rel^-2 (tests/test_train.py solves the relation back)."""
    s = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - s, 12 - s])
    return float(roots[np.isreal(roots)].real.max())


def ema_decays(cfg, k):
    """EMA decay per EMA after optimizer step k. Power (EDM2, arXiv:2312.02696; FastGen 34f30e8
    fastgen/callbacks/ema.py, EMACallback._power_function_beta): beta_k = (1 - 1/k)^(gamma + 1), so step 1 copies.
    Const: beta, or min(beta, (1 + k) / (10 + k)) with --ema-warmup."""
    if cfg["ema_kind"] == "power":
        return [(1 - 1 / k) ** (power_gamma(w) + 1) for w in cfg["ema"]]
    return [min(beta, (1 + k) / (10 + k)) if cfg["ema_warmup"] else beta for beta in cfg["ema"]]


def ema_warnings(cfg, given):
    """A constant --ema that the warm-up ramp still caps at the run's last step: the flag changes nothing."""
    messages = []
    if "ema" in given and cfg["ema_kind"] == "const" and cfg["ema_warmup"]:
        for b, last in zip(cfg["ema"], ema_decays(cfg, cfg["steps"])):
            if last < b:
                reach = math.ceil((10 * b - 1) / (1 - b) - 1e-9)  # (1 + k) / (10 + k) >= b from this k on
                messages.append(f"with --ema-warmup the EMA decay (1 + step) / (10 + step) stays below --ema {b} until "
                                f"step {reach}, after this run's {cfg['steps']} steps: --ema {b} changes nothing here "
                                f"(pass --ema-warmup false for a constant decay)")
    return messages


@torch.no_grad()
def update_ema(emas, decays, net):
    """Each EMA towards the net; under FSDP shard by shard (an EMA is sharded like the net)."""
    params = [parallel.local(p.detach()) for p in net.parameters()]
    for ema, beta in zip(emas, decays):
        torch._foreach_lerp_([parallel.local(p) for p in ema.parameters()], params, 1 - beta)
        for ema_buffer, buffer in zip(ema.buffers(), net.buffers()):
            ema_buffer.copy_(buffer)


def learning_rate(cfg, step):
    lr = cfg["lr"]
    if cfg["lr_ref_steps"] > 0:
        lr *= min(1.0, math.sqrt(cfg["lr_ref_steps"] / step))
    if cfg["lr_warmup"] > 0:
        lr *= min(1.0, step / cfg["lr_warmup"])
    return lr


def repair_and_clip(net, max_norm):
    """Zero NaN/Inf gradient entries (as the reference does, but counted: returned for the log), then clip.
    Returns (grad norm, number of non-finite entries). Under FSDP the gradients are shards: the norm is of the whole
    gradient (an all-reduce), the counts are summed over ranks."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    norm = parallel.full(torch.nn.utils.get_total_norm(grads))
    bad = 0
    if not torch.isfinite(norm):
        bad = parallel.count_nonfinite(grads)
        for g in grads:
            torch.nan_to_num_(parallel.local(g), nan=0.0, posinf=0.0, neginf=0.0)
        norm = parallel.full(torch.nn.utils.get_total_norm(grads))
    if max_norm > 0:
        # clip_grads_with_norm_'s scaling, applied to the local tensors (it cannot mix DTensor shards and a plain norm)
        torch._foreach_mul_([parallel.local(g) for g in grads], (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return float(norm), bad


class IntervalStats:
    """Sums over a log interval in float64, kept on device (no host sync per step) and all-reduced across ranks at log
    time: the per-example loss and its count, the same per bin of the method's time, and each of the method's logs."""

    def __init__(self, time_bins, device):
        self.edges = torch.tensor(time_bins, dtype=torch.float64, device=device)
        self.sums = {}

    def add(self, per_example, logs):
        n_bins = len(self.edges) - 1
        bins = (torch.bucketize(logs["t"].double(), self.edges) - 1).clamp(0, n_bins - 1)
        loss = per_example.detach().double()
        batch = dict(loss=loss.sum(), count=torch.tensor(float(len(loss)), device=loss.device, dtype=torch.float64),
                     loss_by_bin=torch.zeros(n_bins, dtype=torch.float64, device=loss.device).index_add_(0, bins, loss),
                     count_by_bin=torch.bincount(bins, minlength=n_bins).double(),
                     **{k: v.detach().double().sum() for k, v in logs.items() if k != "t"})
        for k, v in batch.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduce(self, ddp):
        """The interval's means (loss, loss_by_t, each log), and a fresh interval."""
        if ddp:
            for tensor in self.sums.values():
                dist.all_reduce(tensor)
        sums, edges, self.sums = {k: v.tolist() for k, v in self.sums.items()}, self.edges.tolist(), {}
        loss, count = sums.pop("loss"), sums.pop("count")
        loss_by_bin, count_by_bin = sums.pop("loss_by_bin"), sums.pop("count_by_bin")  # the method's logs remain
        loss_by_t = {f"{edges[i]:g}-{edges[i + 1]:g}": loss_by_bin[i] / count_by_bin[i] for i in range(len(loss_by_bin))
                     if count_by_bin[i] > 0}
        return dict(loss=loss / count, loss_by_t=loss_by_t, **{k: v / count for k, v in sums.items()})

# --- Output ----------------------------------------------------------------------------------------------------


def draw_samples(method, method_cfg, net, ds, label_dim, n, seed, device, chunk=256):
    """n samples of `net` (an EMA copy, eval mode) by method.sample with its Config's schedule (one step or a few for
    the consistency methods, Heun's 2 sample_steps - 1 evaluations for diffusion), fixed noise, uniform labels."""
    gen = torch.Generator(device).manual_seed(data.mix_seed(seed, 2**31))
    torch.manual_seed(data.mix_seed(seed, 2**31 + 1))  # re-noising in multi-step samplers
    eps = torch.randn((n, *ds.shape), generator=gen, device=device)
    y = None
    if label_dim:
        y = torch.nn.functional.one_hot(torch.randint(label_dim, (n,), generator=gen, device=device), label_dim).float()
    out = []
    for i in range(0, n, chunk):
        out.append(method.sample(net, eps[i:i + chunk], method_cfg, y=None if y is None else y[i:i + chunk]))
    return torch.cat(out)


# --- Set-up: config, devices, data, nets, optimizer ------------------------------------------------------------


class Diverged(Exception):
    """The run stopped on non-finite numbers; its last good checkpoint is kept."""


@dataclasses.dataclass
class Run:
    """What set_up() builds; every stage of the loop reads it."""
    args: object  # the parsed flags
    cfg: dict  # the resolved config, saved with every checkpoint
    method: object  # the method file (a module)
    method_cfg: object  # its Config
    ddp: bool  # several processes (torchrun)
    fsdp: bool  # ... with the online net and its EMAs sharded (--fsdp); else DDP
    rank: int
    world: int
    device: torch.device
    batch_gpu: int  # micro-batch per rank and accumulation round
    accum: int  # accumulation rounds per step
    ds: object  # a dataset of data.py
    label_dim: int  # 0: unconditional
    net: torch.nn.Module
    teacher: torch.nn.Module | None  # --teacher's EMA net, or tcm's frozen stage-1 copy
    emas: list
    opt: torch.optim.Optimizer
    ema_offset: int  # a power EMA's step counter continues from the --stage1 run's steps
    start: int  # steps already done (the resumed checkpoint's)
    fid_of: object  # FID of an EMA net (--fid-every), else None


def first_on_machine():
    """True for the process that reads the data first on its machine: LOCAL_RANK 0 under torchrun (one per node, so
    a node without a shared cache fills its own), or the only process. Downloads and decodes write a temporary file
    and rename it, so nodes sharing a cache may do it at once."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def set_up(argv):
    """Config (flags over preset, or the resumed run's), devices, batch split, data, nets, EMAs, optimizer and the FID
    evaluator, in this order; bad input fails here, before the run folder is touched."""
    args, cfg, method, given = recipe.resolve_config(argv)
    state = None
    if args.resume:  # the run's own config, then the flags given now
        state = checkpoints.load_resumable(args.resume, "cpu")
        cfg, notices = checkpoints.resume_config(state["config"], cfg, given, args.resume)
    method_cfg = recipe.check_config(args, cfg, method, None if state is None else state["step"])
    ddp, rank, world, device = setup_distributed(args.device)
    if args.fsdp and cfg.get("tangent") == "jvp":
        raise UsageError("--fsdp: torch.func.jvp cannot trace a sharded net; pass --tangent fused (the same JVP, "
                         "computed in the net's forward) or --tangent fd")
    if args.fsdp and not ddp:
        raise UsageError("--fsdp shards the net over processes: launch with torchrun --nproc_per_node N (N >= 2)")
    if rank == 0 and state is not None:
        for notice in notices:
            print(f"resume: {notice}")
    # PyTorch leaves cuDNN convolutions in TF32 by default, so "fp32" would not be fp32 on Ampere or newer.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"] == "on"
    batch_gpu, accum = recipe.split_batch(cfg, world)
    # Data: the first process of each machine first (it may download or decode into its cache), then the others.
    if first_on_machine():
        ds = data.load(cfg["data"], args.cache)
    if ddp:
        dist.barrier()
    if not first_on_machine():
        ds = data.load(cfg["data"], args.cache)
    label_dim = recipe.check_data(args, cfg, ds, None if state is None else state["config"])
    if device.type == "cpu" and (args.threads or len(ds.shape) == 1):
        # Point-data nets do too little per op to gain from threads, and on a busy machine the contention made a
        # step 5-10x slower (BENCHMARKS.md, CPU threads).
        torch.set_num_threads(args.threads or 1)
    cfg.update(shape=list(ds.shape), label_dim=label_dim)  # saved with checkpoints: fid.py rebuilds the net from them
    if rank == 0:
        for warning in recipe.config_warnings(args, cfg, method, ds, resumed=state is not None) + ema_warnings(cfg, given):
            print(f"warning: {warning}")
    # Network, EMAs, optimizer (all ranks build the same initial weights from the seed; EMAs copy the initialised net).
    torch.manual_seed(cfg["seed"])
    net = build_net(cfg, method, ds.shape, label_dim).to(device)
    teacher = checkpoints.load_teacher(args.teacher, method, ds, label_dim, device, cfg) if args.teacher else None
    ema_offset = 0
    if args.stage1:
        teacher, stage1_step = checkpoints.load_stage1(args.stage1, method, net, device, cfg, init=state is None)
        ema_offset = stage1_step if cfg["ema_kind"] == "power" else 0
    if args.init and state is None:
        checkpoints.init_from(net, args.init, method, device, rank, cfg)
    elif args.teacher and state is None:  # distillation starts from the teacher unless --init says otherwise
        checkpoints.init_from_teacher(net, args.teacher, method, device, rank, cfg)
    if hasattr(net, "normalize_weights_") and state is None:  # EDM2 nets: unit-norm weights, and after every step
        net.normalize_weights_()
    emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in cfg["ema"]]
    if state is not None:
        checkpoints.restore_weights(state, net, emas, args.resume)
    if args.fsdp:  # after every weight is loaded whole; the optimizer is built on the shards
        for module in (net, *emas):
            parallel.shard(module, device, world, bf16=cfg["precision"] == "bf16")
    opt_cls = dict(adam=torch.optim.Adam, adamw=torch.optim.AdamW, radam=torch.optim.RAdam)[cfg["optimizer"]]
    # Adam's (and AdamW's) fused kernel: one pass over all parameters instead of a loop of small ops per tensor (on the
    # toy MLP 0.42 vs 1.30 ms a step on one CPU core); the same update. RAdam has none, nor do some other devices.
    fused = dict(fused=True) if cfg["optimizer"] in ("adam", "adamw") and device.type in ("cpu", "cuda") else {}
    opt = opt_cls(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["adam_eps"],
                  weight_decay=cfg["weight_decay"], **fused)
    if state is not None:
        opt_state = parallel.shard_optimizer_state(opt, state["opt"]) if args.fsdp else state["opt"]
        checkpoints.restore_optimizer(opt, opt_state, args.resume)
    start = 0 if state is None else state["step"]
    fid_of = None
    if args.fid_every:  # its reference statistics and detector are inputs too: checked before the run folder
        fid_of = fid.fid_evaluator(args, cfg, ds, label_dim, method, method_cfg, rank, ddp, device)
    return Run(args, cfg, method, method_cfg, ddp, args.fsdp, rank, world, device, batch_gpu, accum, ds, label_dim, net,
               teacher, emas, opt, ema_offset, start, fid_of)

# --- The loop: its state, its stages, main ---------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    """What the loop carries from step to step."""
    out: str  # the run folder
    model: torch.nn.Module  # run.net in its DDP wrapper, or run.net itself on one process
    loss_fn: object  # method.loss, compiled with --compile
    autocast: object
    gen: torch.Generator  # noise, times, label dropout
    aug_gen: torch.Generator  # augmentations
    sampler: data.EpochSampler
    fid_of: object  # FID of an EMA net (--fid-every), else None
    stats: IntervalStats
    t0: float  # when the log interval's clock started
    step_t0: int  # the step it started after
    saved_step: int  # the last good checkpoint's step (0: none)
    loggers: trackers.Trackers  # --tensorboard, --wandb (rank 0; does nothing without them)
    nonfinite_grads: int = 0  # gradient entries zeroed in the whole run
    bad_run: int = 0  # consecutive steps with a non-finite loss or gradients
    bad_steps: int = 0  # such steps in the log interval
    grad_norms: list = dataclasses.field(default_factory=list)  # the log interval's, one per step
    settled_norms: array.array = dataclasses.field(default_factory=lambda: array.array("d"))  # every step's after the
    # warm-ups (this process), 8 bytes per step
    settled_before: int = 0  # len(settled_norms) when the log interval began

    def kept_checkpoint_message(self):
        kept = f"the last good checkpoint {os.path.join(self.out, 'ckpt.pt')} (step {self.saved_step}) is kept"
        return kept if self.saved_step else "no checkpoint was written"


def train_step(run, loop, step):
    """One optimizer step: the accumulation rounds, repair-and-clip, the non-finite counters (Diverged after
    --max-nonfinite bad steps in a row), the optimizer step and the EMA update. Returns (lr, grad norm)."""
    cfg, seed, batch_gpu, net, opt = run.cfg, run.cfg["seed"], run.batch_gpu, run.net, run.opt
    lr = learning_rate(cfg, step)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    bad_loss = torch.zeros((), device=run.device)
    for accum_round in range(run.accum):
        m = run.rank * run.accum + accum_round  # global micro-batch index: its draws depend only on (seed, step, m)
        torch.manual_seed(data.mix_seed(seed, step, m, 0))  # dropout masks
        loop.gen.manual_seed(data.mix_seed(seed, step, m, 1))  # noise, times, label dropout
        idx = loop.sampler((step - 1) * cfg["batch"] + m * batch_gpu, batch_gpu)
        flip = torch.rand(batch_gpu, generator=torch.Generator().manual_seed(data.mix_seed(seed, step, m, 2))) < 0.5
        noise = torch.Generator().manual_seed(data.mix_seed(seed, step, m, 3))  # latents: posterior samples
        x = run.ds.get(idx, flip if cfg["xflip"] else None, run.device, generator=noise)
        aug = None
        if cfg["augment"] > 0:
            x, aug = augment.augment(x, cfg["augment"], cfg["augment_pipe"],
                                     loop.aug_gen.manual_seed(data.mix_seed(seed, step, m, 4)))
        y = run.ds.one_hot(idx, run.device) if run.label_dim else None
        # DDP syncs gradients in the last round only; FSDP in every round (reduce-scatter: a rank keeps only its shard)
        sync = not run.ddp or run.fsdp or accum_round == run.accum - 1
        with contextlib.nullcontext() if sync else loop.model.no_sync():
            with loop.autocast, augment.augment_labels(net, aug):
                per_example, logs = loop.loss_fn(loop.model, x, y, run.method_cfg, step, loop.gen, teacher=run.teacher,
                                                 images=(step - 1) * cfg["batch"])
            (per_example.mean() / run.accum).backward()
        bad_loss += (~torch.isfinite(per_example.detach())).sum()
        loop.stats.add(per_example, logs)
    if run.ddp:
        dist.all_reduce(bad_loss)  # every rank takes the same decision below
    grad_norm, bad = repair_and_clip(net, cfg["grad_clip"])
    loop.nonfinite_grads += bad
    loop.bad_run = loop.bad_run + 1 if bad or bad_loss.item() else 0
    loop.bad_steps += loop.bad_run > 0
    if loop.bad_run >= run.args.max_nonfinite:
        raise Diverged(f"step {step}: {loop.bad_run} consecutive steps with a non-finite loss or gradients "
                       f"(--max-nonfinite {run.args.max_nonfinite}); {loop.kept_checkpoint_message()}")
    opt.step()
    if hasattr(net, "normalize_weights_"):
        # EDM2's forced weight normalisation, outside forward (nets.py, MPConv); FastGen 34f30e8 runs it before every
        # accumulation round (fastgen/callbacks/forced_weight_norm.py, ForcedWeightNormCallback).
        net.normalize_weights_()
    update_ema(run.emas, ema_decays(cfg, step + run.ema_offset), net)
    loop.grad_norms.append(grad_norm)
    if step > warmup_steps(cfg):
        loop.settled_norms.append(grad_norm)
    return lr, grad_norm


def warmup_steps(cfg):
    """Steps of the LR warm-up and of the method's tangent warm-up (sCM, MeanFlow), whichever ends last."""
    return max(cfg["lr_warmup"], cfg.get("tangent_warmup", 0))


SPIKE_WARNING = 100  # consistency runs of the held-out 2-D suite reach 50x with samples that meet its goal
SPIKE_WINDOW = 1000  # a spike is over the median of this many steps before the log interval


def grad_norm_ratios(loop, window=SPIKE_WINDOW, min_steps=100):
    """The log interval's largest gradient norm over the median of every norm since the warm-ups ended (growth) and
    over the median of the `window` norms before the interval (spike), each None until it has min_steps norms.
    Healthy consistency runs reach both 10-50x (their weights 1/(t - r) and exp(-logvar) rise as the fit tightens,
    in jumps at ECT's stage boundaries: benchmarks/toy_suite.py --held-out prints both), so a spike warns only above
    SPIKE_WARNING, twice the largest seen in a healthy run."""
    top, settled = max(loop.grad_norms), loop.settled_norms
    before = settled[:loop.settled_before][-window:]
    growth = top / max(float(np.median(settled)), 1e-30) if len(settled) >= min_steps else None
    spike = top / max(float(np.median(before)), 1e-30) if len(before) >= min_steps else None
    return growth, spike


def log_interval(run, loop, step, lr, grad_norm):
    """The log line and metrics.jsonl record of the interval that ends at `step`, from all-reduced statistics."""
    cfg, device = run.cfg, run.device
    means = loop.stats.reduce(run.ddp)
    rate = (step - loop.step_t0) * cfg["batch"] / (time.time() - loop.t0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    growth, spike = grad_norm_ratios(loop)
    record = dict(step=step, kimg=step * cfg["batch"] / 1000, **means, lr=lr, grad_norm=grad_norm,
                  grad_norm_max=max(loop.grad_norms), grad_norm_growth=growth, grad_norm_spike=spike, img_per_s=rate,
                  gpu_mem_gib=mem, nonfinite_grads=loop.nonfinite_grads, nonfinite_steps=loop.bad_steps)
    if run.rank == 0 and spike is not None and spike > SPIKE_WARNING:
        print(f"warning: step {step}: gradient norm {record['grad_norm_max']:.3g} is {spike:.0f}x the median of the "
              f"{min(SPIKE_WINDOW, loop.settled_before)} steps before: the run may be diverging (consider a lower --lr or --grad-clip)", flush=True)
    if run.rank == 0:
        eta = (cfg["steps"] - step) * cfg["batch"] / rate
        print(f"step {step:>7d}/{cfg['steps']} | kimg {record['kimg']:9.1f} | loss {record['loss']:.4g} | "
              f"{rate:8.1f} img/s | mem {mem:5.1f} GiB | nonfinite {loop.bad_steps} | ETA {data.format_time(eta)}", flush=True)
        checkpoints.append_metrics(loop.out, record)
        loop.loggers.log(record)
    loop.t0, loop.step_t0, loop.bad_steps, loop.grad_norms = time.time(), step, 0, []
    loop.settled_before = len(loop.settled_norms)


def evaluate_fid(run, loop, step):
    """FID of the first EMA (every rank generates its share), printed and logged; its time is left out of img/s."""
    fid_t0, value = time.time(), loop.fid_of(whole_ema(run, keep=True))
    if run.rank == 0:
        print(f"step {step:>7d} | FID {value:.3f} ({run.args.fid_num} samples, ema {run.cfg['ema'][0]}, "
              f"{time.time() - fid_t0:.0f} s)", flush=True)
        record = dict(step=step, kimg=step * run.cfg["batch"] / 1000, fid=value, fid_num=run.args.fid_num)
        checkpoints.append_metrics(loop.out, record)
        loop.loggers.log(record)
    loop.t0 = loop.t0 + (time.time() - fid_t0)


def save_checkpoint(run, loop, step):
    """ckpt.pt and curves.png; no checkpoint inside a stretch of non-finite steps, and Diverged on non-finite weights
    after a good step."""
    if run.rank == 0:
        draw_curves(run, loop, step)
    healthy = loop.bad_run == 0 and parallel.all_finite([run.net, *run.emas], run.fsdp)  # the same on every rank
    if not healthy and (step == run.cfg["steps"] or loop.bad_run == 0):
        raise Diverged(f"step {step}: non-finite weights, loss or gradients; {loop.kept_checkpoint_message()}")
    states = parallel.states(run.net, run.emas, run.opt, run.fsdp, keep=run.rank == 0) if healthy else None
    if healthy and run.rank == 0:
        checkpoints.save_checkpoint(os.path.join(loop.out, "ckpt.pt"), states, step, run.cfg)
    elif run.rank == 0:
        print(f"step {step}: no checkpoint (non-finite loss or gradients at this step)")
    loop.saved_step = step if healthy else loop.saved_step
    if run.ddp:
        dist.barrier()


def draw_curves(run, loop, step):
    """curves.png from metrics.jsonl (curves.py); a failed write warns, the run goes on."""
    cfg = run.cfg
    title = f"{cfg['method']} on {run.ds.name} | net {cfg['net']} | batch {cfg['batch']} | step {step}/{cfg['steps']}"
    try:
        curves.save(os.path.join(loop.out, "metrics.jsonl"), os.path.join(loop.out, "curves.png"), title)
    except OSError as e:
        print(f"warning: cannot write {os.path.join(loop.out, 'curves.png')} ({e.strerror or e})", flush=True)


def whole_ema(run, keep):
    """The first EMA as one module where `keep`: itself, or under FSDP a plain copy gathered from the shards
    (collective: every rank calls; None where not kept)."""
    if not run.fsdp:
        return run.emas[0]
    weights = parallel.full_state(run.emas[0], keep)
    if not keep:
        return None
    net = build_net(run.cfg, run.method, run.ds.shape, run.label_dim).to(run.device)
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


def finish(run, loop):
    """The ranks' weights compared; on rank 0 the final samples (samples.npy, samples.png) with the collapse warning."""
    if run.ddp:
        parallel.check_ranks_identical(run.net, run.world, run.opt if run.fsdp else None)
    ema = whole_ema(run, keep=run.rank == 0)
    if run.rank != 0:
        return
    args, ds, out = run.args, run.ds, loop.out
    grid = ds.is_image or isinstance(ds, data.LatentDataset)  # pictures as grids, not scatters
    n = args.num_samples or (64 if grid else 2048)
    samples = draw_samples(run.method, run.method_cfg, ema, ds, run.label_dim, n, run.cfg["seed"], run.device)
    if not torch.isfinite(samples).all():
        raise Diverged(f"the EMA's samples are not finite (no samples written); {loop.kept_checkpoint_message()}")
    samples = samples.clamp(-1, 1) if ds.is_image else samples
    if not grid:  # a collapse trains with a normal-looking loss: compare the samples' spread with the data's
        have, want = data.rms_spread(samples), data.rms_spread(ds.x)
        if have < 0.1 * want:
            print(f"warning: the samples' spread (RMS distance to their mean) is {have / want:.1%} of the "
                  f"data's: the one-step map has collapsed")
    np.save(os.path.join(out, "samples.npy"), samples.cpu().numpy())
    data.save_picture(os.path.join(out, "samples.png"), samples[:256] if grid else samples, ds)
    print(f"done: {out}/samples.png, samples.npy ({n} EMA samples, {args.method}.sample defaults), ckpt.pt")


def start_loop(run, out, loggers):
    """config.json, the DDP wrapper, the (compiled) loss, the header line and the FID evaluator: the loop's state."""
    args, cfg, ds, device = run.args, run.cfg, run.ds, run.device
    if run.rank == 0:
        checkpoints.write_config(out, {**cfg, "world_size": run.world, "fsdp": run.fsdp, "batch_gpu": run.batch_gpu,
                                       "accum": run.accum})
    if run.ddp:
        dist.barrier()
    ddp_ids = [device] if device.type == "cuda" else None
    ddp_wrapped = run.ddp and not run.fsdp  # an FSDP net is its own wrapper (fully_shard changed it in place)
    model = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=ddp_ids) if ddp_wrapped else run.net
    # --compile: dynamo compiles the loss (net forward, tangent, loss arithmetic, backward) on the first step and
    # again when an input shape changes; random draws from `gen` stay eager (graph breaks).
    loss_fn = torch.compile(run.method.loss) if args.compile else run.method.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    if run.rank == 0:
        print(f"{args.method} on {cfg['data']} ({len(ds)} samples, shape {ds.shape}) | net {cfg['net']} "
              f"{sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M params | batch {cfg['batch']} = {run.world} "
              f"ranks x {run.accum} rounds x {run.batch_gpu}{' | fsdp' if run.fsdp else ''} | {device} "
              f"{cfg['precision']} | "
              f"preset {cfg['preset']} | out {out}")
    return Loop(out=out, model=model, loss_fn=loss_fn, autocast=autocast, gen=torch.Generator(device),
                aug_gen=torch.Generator(device), sampler=data.EpochSampler(len(ds), cfg["seed"]), fid_of=run.fid_of,
                stats=IntervalStats(run.method.TIME_BINS, device), t0=time.time(), step_t0=run.start,
                saved_step=run.start, loggers=loggers)


def save_sample_grid(run, loop, step):
    """samples-STEP.png: 64 samples of the first EMA (rank 0); none when they are not finite."""
    ema = whole_ema(run, keep=run.rank == 0)
    if run.rank != 0:
        return
    samples = draw_samples(run.method, run.method_cfg, ema, run.ds, run.label_dim, 64, run.cfg["seed"], run.device)
    if torch.isfinite(samples).all():  # a diverging EMA is stopped by the checks around it
        data.save_picture(os.path.join(loop.out, f"samples-{step:07d}.png"), samples, run.ds)
        loop.loggers.picture("samples", os.path.join(loop.out, f"samples-{step:07d}.png"), step)


def save_snapshot(run, loop, step):
    """snapshots/ckpt-STEP.pt (rank 0), kept, unlike ckpt.pt: quality along the run. None from a non-finite step."""
    if loop.bad_run == 0 and parallel.all_finite([run.net, *run.emas], run.fsdp):
        states = parallel.states(run.net, run.emas, None, run.fsdp, keep=run.rank == 0)
        if run.rank == 0:
            checkpoints.save_snapshot(loop.out, states, step, run.cfg)


def main(argv=None):
    run = set_up(sys.argv[1:] if argv is None else argv)
    args, last, rank = run.args, run.cfg["steps"], run.rank
    folder = checkpoints.run_folder(args.out, args.resume, run.start, (args.method, run.ds.name), run.ddp, rank)
    with folder as out, trackers.opened(args.tensorboard, args.wandb, out, run.cfg, rank) as loggers:
        loop = start_loop(run, out, loggers)
        for step in range(run.start + 1, last + 1):
            lr, grad_norm = train_step(run, loop, step)
            if step % args.log_every == 0 or step == last:
                log_interval(run, loop, step, lr, grad_norm)
            if args.sample_every and step % args.sample_every == 0:
                save_sample_grid(run, loop, step)
            if loop.fid_of is not None and (step % args.fid_every == 0 or step == last):
                evaluate_fid(run, loop, step)
            if step % args.ckpt_every == 0 or step == last:
                save_checkpoint(run, loop, step)
            if args.snapshot_every and step % args.snapshot_every == 0:
                save_snapshot(run, loop, step)
        finish(run, loop)
    if run.ddp:
        # Free the DDP wrapper (loop.model), whose reducer holds the process group, and the FID evaluator before the
        # group goes: left to the garbage collector they may be destroyed at interpreter exit, where Gloo's threads
        # can abort the process.
        del loop, run
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def cli(argv=None):
    """main() with bad input and divergence reported as one line on stderr and exit status 1 (a torchrun rank leaves
    through os._exit: cli.run_main)."""
    return run_main(main, "train.py", (UsageError, Diverged, data.DataError), argv)


if __name__ == "__main__":
    cli()
