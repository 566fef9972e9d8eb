"""Train any method here on 1 CPU, 1 GPU or N GPUs.

    python train.py --method meanflow --data toy                          # 2-D demo, about a minute on 2 CPU cores
    python train.py --method meanflow --data cifar10 --out runs/mf-c10    # one GPU
    torchrun --nproc_per_node=8 train.py --method meanflow --data cifar10 --out runs/mf-c10
    python train.py --method meanflow --data toy --steps 6000 --resume runs/meanflow-toy-000   # continue a run
    python train.py --method meanflow --help                              # every flag, with the preset's values

Defaults come from the method's preset for the data (`--preset` overrides the choice), then the flags.
The global batch --batch is split into micro-batches of --batch-gpu, spread over ranks and accumulation rounds.
Micro-batch m of step k draws its data, noise and dropout masks from a seed of (seed, k, m), so the result
does not depend on that split (1 process x 2 rounds == 2 processes x 1 round) and --resume is exact.

Gradient sync with a JVP loss: the differentiable forward is the only call that goes through the DDP wrapper;
every no-grad pass (the JVP, finite differences, guidance) runs on the bare module inside the method file.
tests/test_train.py checks that 2 gloo ranks end with identical weights, equal to the 1-process run.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import augment
import checkpoints
import data
import nets
from checkpoints import UsageError, build_net, method_config, parse_as

METHODS = ("meanflow", "scm", "cm", "tcm", "diffusion")

# Training recipe: every key a preset may set besides the method's Config fields: (default, type, help).
TRAIN = dict(
    net=("mlp", str, f"network: {', '.join(nets.NETS)}"),
    dropout=(None, float, "dropout probability (default: the net's)"),
    dropout_res=(None, tuple, "EDM2 nets: resolutions with dropout, comma-separated (default: all)"),
    cond=(False, bool, "condition on class labels (needs a labelled dataset)"),
    distill=(False, bool, "the recipe distils: --teacher is required"),
    stage1_weights=("online", str, "tcm --stage1: start from that run's online weights (reference) or its first ema"),
    xflip=(False, bool, "random horizontal flips (images)"),
    augment=(0.0, float, "EDM's augmentation pipeline (augment.py) with probability p, labels to the net (0: off)"),
    augment_pipe=("edm", str, "augmentations of --augment: edm (9-d labels) or meanflow (6-d)"),
    batch=(256, int, "global batch per optimizer step"),
    batch_gpu=(None, int, "micro-batch per rank and accumulation round (default: batch / ranks)"),
    steps=(1000, int, "total optimizer steps"),
    optimizer=("adam", str, "adam or radam"),
    lr=(1e-4, float, "learning rate"),
    betas=((0.9, 0.999), tuple, "Adam betas, comma-separated"),
    adam_eps=(1e-8, float, "Adam epsilon"),
    weight_decay=(0.0, float, "weight decay"),
    lr_warmup=(0, int, "linear LR warm-up steps (0: none)"),
    lr_ref_steps=(0, int, "inverse-sqrt decay lr * min(1, sqrt(ref / step)) (0: constant)"),
    grad_clip=(0.0, float, "max gradient norm (0: off)"),
    ema=((0.9999,), tuple, "EMA decays (const) or relative widths sigma_rel (power), comma-separated; the first is sampled"),
    ema_kind=("const", str, "const: fixed decays; power: EDM2's power-function EMA with --ema as sigma_rel"),
    ema_warmup=(False, bool, "const EMA: use decay min(beta, (1 + step) / (10 + step)) for short runs"),
    precision=("fp32", str, "fp32 or bf16 (autocast; JVPs stay fp32)"),
    tf32=("off", str, "off (the reference's recipes) or on: TF32 matmuls and cuDNN convolutions on Ampere or newer"),
)
TRAIN_DEFAULTS = {k: v[0] for k, v in TRAIN.items()}
CHOICES = dict(net=tuple(nets.NETS), optimizer=("adam", "radam"), precision=("fp32", "bf16"),
               stage1_weights=("online", "ema"), ema_kind=("const", "power"), augment_pipe=tuple(augment.PIPES),
               tf32=("off", "on"))


# --- Configuration -----------------------------------------------------------------------------------------


def add_flag(group, name, kind, help):
    extra = dict(nargs="?", const=True) if kind is bool else {}  # `--xflip` alone means true
    group.add_argument("--" + name.replace("_", "-"), dest=name, type=parse_as(kind), help=help, **extra)


def show(value):
    """A value as its flag would be written."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def build_parser(method=None, preset=None):
    """The parser; with a method its Config fields are flags, and with a preset name --help shows its values."""
    p = argparse.ArgumentParser(description="Train a consistency model / flow map.", allow_abbrev=False)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--data", help="toy, cifar10, points.npy, images.zip or an image folder (default: toy, or the resumed run's)")
    p.add_argument("--preset", help="method preset (default: toy for points, cifar10 for images)")
    p.add_argument("--out", help="output folder (default: runs/<method>-<data>-NNN, new)")
    p.add_argument("--resume", help="checkpoint file or run folder to continue exactly (its config, then the flags given)")
    p.add_argument("--teacher", help="checkpoint whose EMA net is the frozen teacher (distillation)")
    p.add_argument("--init", help="checkpoint whose EMA weights initialise the net (e.g. a diffusion model)")
    p.add_argument("--stage1", help="tcm: the stage-1 cm run (online weights start the student, EMAs and a frozen copy)")
    p.add_argument("--seed", type=int, help="default 0, or the resumed run's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the loss step (compiled once per input shape: the first steps are slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for point data, torch's default otherwise)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="steps between sample pictures (0: end only)")
    p.add_argument("--num-samples", type=int, default=None, help="final samples.npy size (points 2048, images 64)")
    p.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many consecutive steps with "
                   "non-finite loss or gradients")
    p.add_argument("--cache", default=data.cache_dir_default(), help="download cache (CIFAR-10, FID detector)")
    p.add_argument("--fid-every", type=int, default=0, help="steps between FIDs of the first EMA (fid.py protocol; 0: off)")
    p.add_argument("--fid-ref", help="reference statistics for --fid-every (python fid.py ref --data ... --out REF.npz)")
    p.add_argument("--fid-num", type=int, default=10_000, help="samples per --fid-every evaluation (FIDs compare only at equal N)")
    p.add_argument("--fid-detector", help="Inception weights for --fid-every (default: fid.py's; path, URL or name)")
    fields = {f.name: f.default for f in dataclasses.fields(method.Config)} if method else {}
    values = {**TRAIN_DEFAULTS, **fields, **(method.PRESETS[preset] if preset else {})}
    where = f"preset {preset}" if preset else "default"
    g = p.add_argument_group(f"training recipe ({where})")
    for k, (default, kind, help) in TRAIN.items():
        add_flag(g, k, kind, f"{help} [{where}: {show(values[k])}]")
    if method is not None:
        g = p.add_argument_group(f"{method.__name__}.Config ({where})")
        for k, default in fields.items():
            add_flag(g, k, type(default), f"[{where}: {show(values[k])}]")
    return p


# Lowest allowed value and the bound it must stay below, of every numeric flag; checked before anything is created.
LIMITS = dict(steps=(1, math.inf), batch=(1, math.inf), batch_gpu=(1, math.inf), dropout=(0, 1), lr=(0, math.inf),
              adam_eps=(0, math.inf), weight_decay=(0, math.inf), lr_warmup=(0, math.inf), lr_ref_steps=(0, math.inf),
              grad_clip=(0, math.inf), seed=(0, math.inf), log_every=(1, math.inf), ckpt_every=(1, math.inf),
              sample_every=(0, math.inf), num_samples=(1, math.inf), max_nonfinite=(1, math.inf),
              fid_every=(0, math.inf), fid_num=(2, math.inf), threads=(1, math.inf))


def resolve_config(argv):
    """(args, cfg dict, method module, flags given): CLI flags over preset over defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--method", "--data", "--preset"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    method, preset_name = None, None
    if known.method is not None:
        if known.method not in METHODS:
            raise UsageError(f"unknown method {known.method!r}; choose from {', '.join(METHODS)}")
        method = importlib.import_module(known.method)
        preset_name = known.preset or default_preset(known.data or "toy")
        if preset_name not in method.PRESETS:
            why = "" if known.preset else f" (the default for --data {known.data}; pass --preset)"
            raise UsageError(f"unknown preset {preset_name!r} for {known.method}{why}; choose from {', '.join(method.PRESETS)}")
    args = build_parser(method, preset_name).parse_args(argv)
    cfg_fields = {f.name: f.default for f in dataclasses.fields(method.Config)}
    preset = method.PRESETS[preset_name]
    unknown = set(preset) - set(cfg_fields) - set(TRAIN_DEFAULTS)
    assert not unknown, f"preset {preset_name} has unknown keys {unknown}"
    cfg = {**TRAIN_DEFAULTS, **cfg_fields, **preset, "preset": preset_name, "method": args.method, "data": "toy", "seed": 0}
    given = {k for k in [*TRAIN_DEFAULTS, *cfg_fields, "preset", "data", "seed"] if getattr(args, k, None) is not None}
    cfg.update({k: getattr(args, k) for k in given})
    return args, json.loads(json.dumps(cfg)), method, given


def check_config(args, cfg, method):
    """Every choice and number in range, and the checkpoints the recipe needs named (before anything is created)."""
    for k, allowed in CHOICES.items():
        if cfg[k] not in allowed:
            raise UsageError(f"--{k.replace('_', '-')} must be one of {', '.join(allowed)}, got {cfg[k]!r}")
    for k, (lo, hi) in LIMITS.items():
        v = cfg[k] if k in cfg else getattr(args, k)
        if v is not None and not lo <= v < hi:
            raise UsageError(f"--{k.replace('_', '-')} must be " + (f">= {lo}" if hi == math.inf else f"in [{lo}, {hi})")
                             + f", got {v}")
    if not 0 <= cfg["augment"] <= 1:
        raise UsageError(f"--augment is a probability in [0, 1], got {cfg['augment']}")
    if len(cfg["betas"]) != 2 or not all(0 <= b < 1 for b in cfg["betas"]):
        raise UsageError(f"--betas needs two values in [0, 1), got {show(cfg['betas'])}")
    lo, hi = (0, 1) if cfg["ema_kind"] == "const" else (0, 0.28)
    if not cfg["ema"] or not all(lo < e < hi for e in cfg["ema"]):
        raise UsageError(f"--ema with --ema-kind {cfg['ema_kind']} needs values in ({lo}, {hi}), got {cfg['ema']}")
    checkpoints.check_device(args.device)
    checkpoints.check_out(args.out)
    if args.fid_every and not args.fid_ref:
        raise UsageError("--fid-every needs --fid-ref REF.npz (make it with: python fid.py ref --data DATA --out REF.npz)")
    if cfg["distill"] and not args.teacher:
        raise UsageError(f"preset {cfg['preset']} distils from a teacher: pass --teacher PATH")
    if args.teacher and not method.TEACHERS:
        raise UsageError(f"{args.method} does not distil from a teacher")
    if bool(args.stage1) != hasattr(method, "STAGE1"):
        raise UsageError(f"{args.method} needs --stage1 RUN, the stage-1 cm run it continues" if args.stage1 is None
                         else f"--stage1 is for tcm, not {args.method}")
    return method_config(method, cfg)


def default_preset(spec):
    """toy for points, imagenet256 for latents, imagenet64 for 64x64 images, cifar10 for other images."""
    if spec == "toy" or spec.endswith(".npy"):
        return "toy"
    if os.path.isfile(os.path.join(spec, data.LATENTS_JSON)):
        return "imagenet256"
    if spec != "cifar10" and data.peek_resolution(spec) == 64:
        return "imagenet64"
    return "cifar10"


# --- Distributed, seeds, EMA ---------------------------------------------------------------------------------


@functools.lru_cache
def power_gamma(sigma_rel):
    """Exponent of EDM2's power-function EMA (Karras et al. 2024, Eq. 3) for a relative width sigma_rel:
    sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), i.e. the largest real root of g^3 + 7 g^2 + (16 - s) g + 12 - s, s = sigma_rel^-2."""
    s = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - s, 12 - s])
    return float(roots[np.isreal(roots)].real.max())


def ema_decays(cfg, k):
    """EMA decay per EMA after optimizer step k (REFERENCE §1.5). Power: beta_k = (1 - 1/k)^(gamma + 1), so step 1 copies."""
    if cfg["ema_kind"] == "power":
        return [(1 - 1 / k) ** (power_gamma(w) + 1) for w in cfg["ema"]]
    return [min(b, (1 + k) / (10 + k)) if cfg["ema_warmup"] else b for b in cfg["ema"]]


@torch.no_grad()
def update_ema(emas, decays, net):
    params = [p.detach() for p in net.parameters()]
    for ema, beta in zip(emas, decays):
        torch._foreach_lerp_(list(ema.parameters()), params, 1 - beta)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)


def learning_rate(cfg, step):
    lr = cfg["lr"]
    if cfg["lr_ref_steps"] > 0:
        lr *= min(1.0, math.sqrt(cfg["lr_ref_steps"] / step))
    if cfg["lr_warmup"] > 0:
        lr *= min(1.0, step / cfg["lr_warmup"])
    return lr


class IntervalStats:
    """Per-example loss (overall and binned by the method's time), and the means of the method's logs, summed on
    device over a log interval (no host sync per step) and all-reduced across ranks at log time."""

    def __init__(self, time_bins, device):
        self.edges = torch.tensor(time_bins, dtype=torch.float64, device=device)
        self.keys, self.sums = None, None

    def add(self, per_example, logs):
        n_bins = len(self.edges) - 1
        bins = (torch.bucketize(logs["t"].double(), self.edges) - 1).clamp(0, n_bins - 1)
        self.keys = self.keys or [k for k in logs if k != "t"]
        loss = per_example.detach().double()
        row = torch.cat([torch.stack([loss.sum(), torch.tensor(float(len(loss)), device=loss.device, dtype=torch.float64)]),
                         torch.zeros(n_bins, dtype=torch.float64, device=loss.device).index_add_(0, bins, loss),
                         torch.bincount(bins, minlength=n_bins).double(),
                         torch.stack([logs[k].detach().double().sum() for k in self.keys])])
        self.sums = row if self.sums is None else self.sums + row

    def reduce(self, ddp):
        if ddp:
            dist.all_reduce(self.sums)
        s, n_bins, e = self.sums.tolist(), len(self.edges) - 1, self.edges.tolist()
        self.sums = None
        by_t = {f"{e[i]:g}-{e[i + 1]:g}": s[2 + i] / s[2 + n_bins + i] for i in range(n_bins) if s[2 + n_bins + i] > 0}
        return dict(loss=s[0] / s[1], loss_by_t=by_t, **{k: s[2 + 2 * n_bins + j] / s[1] for j, k in enumerate(self.keys)})


def repair_and_clip(net, max_norm):
    """Zero NaN/Inf gradient entries (as the reference does, but counted: returned for the log), then clip.
    Returns (grad norm, number of non-finite entries)."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    bad = 0
    if not torch.isfinite(norm):
        bad = int(sum((~torch.isfinite(g)).sum() for g in grads))
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(net.parameters(), max_norm, norm)
    return float(norm), bad


# --- Output ---------------------------------------------------------------------------------------------------


def format_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# --- Nets, teachers, samples --------------------------------------------------------------------------------------


def fid_evaluator(args, cfg, ds, label_dim, method, mcfg, rank, ddp, device):
    """A function ema -> FID (fid.py's protocol, per-image seeds), to call on every rank; fid.py is imported only here."""
    if not ds.is_image or ds.shape[0] != 3:
        raise UsageError(f"--fid-every needs RGB images; {cfg['data']} has samples of shape {ds.shape}")
    import fid
    ref = fid.load_ref(args.fid_ref)
    spec = args.fid_detector or fid.DETECTOR_DEFAULT
    if rank == 0:  # may download the weights once into the cache
        detector, _ = fid.load_detector(spec, device, args.cache)
    if ddp:
        dist.barrier()
    if rank != 0:
        detector, _ = fid.load_detector(spec, device, args.cache)
    return lambda ema: fid.compute_fid(ema, method, mcfg, ds.shape, label_dim, args.fid_num, ref, detector, device,
                                       seed=cfg["seed"])


def check_ranks_identical(net, world):
    """Per-tensor sums and sums of squares, all-gathered and compared bitwise: ranks whose gradients were not
    synchronised would have drifted apart."""
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in net.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("ranks ended with different weights: gradients were not synchronised")
    if dist.get_rank() == 0:
        print(f"weights identical on all {world} ranks")


def draw_samples(method, mcfg, net, ds, label_dim, n, seed, device, chunk=256):
    """1-step samples from `net` (an EMA copy, eval mode) with fixed noise and uniformly random labels."""
    g = torch.Generator(device).manual_seed(data.mix_seed(seed, 2**31))
    torch.manual_seed(data.mix_seed(seed, 2**31 + 1))  # re-noising in multi-step samplers
    eps = torch.randn((n, *ds.shape), generator=g, device=device)
    y = None
    if label_dim:
        y = torch.nn.functional.one_hot(torch.randint(label_dim, (n,), generator=g, device=device), label_dim).float()
    out = []
    for i in range(0, n, chunk):
        out.append(method.sample(net, eps[i:i + chunk], mcfg, y=None if y is None else y[i:i + chunk]))
    return torch.cat(out)


@contextlib.contextmanager
def augment_labels(net, aug):
    """Inside, every call of `net` (through DDP or bare, in the method's loss) gets the augmentation labels aug
    (B, augment_dim): the method files need not know about augmentation. None: no labels (zero at sampling)."""
    if aug is None:
        yield
        return

    def feed(module, args, kwargs):
        if args[0].shape[0] != aug.shape[0]:
            raise RuntimeError(f"augmentation labels for {aug.shape[0]} samples, net called on {args[0].shape[0]}")
        return args, {**kwargs, "aug": aug}
    handle = net.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()

# --- Main ------------------------------------------------------------------------------------------------------


class Diverged(Exception):
    """The run stopped on non-finite numbers; its last good checkpoint is kept."""


def main(argv=None):
    args, cfg, method, given = resolve_config(sys.argv[1:] if argv is None else argv)
    state = None
    if args.resume:  # the run's own config, then the flags given now
        state = checkpoints.load_checkpoint(args.resume, "cpu")
        cfg, notices = checkpoints.resume_config(state["config"], cfg, given, args.resume)
    mcfg = check_config(args, cfg, method)
    ddp, rank, world, device = checkpoints.setup_distributed(args.device)
    if rank == 0 and state is not None:
        for notice in notices:
            print(f"resume: {notice}")
    # PyTorch leaves cuDNN convolutions in TF32 by default, so "fp32" would not be fp32 on Ampere or newer.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"] == "on"

    # Batch split (assert exact: the reference silently rounds, REFERENCE §9.7).
    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    if batch_gpu <= 0 or cfg["batch"] % (batch_gpu * world):
        raise UsageError(f"--batch {cfg['batch']} is not a multiple of --batch-gpu {batch_gpu} x {world} ranks")
    accum = cfg["batch"] // (batch_gpu * world)

    # Data: rank 0 first (it may download), then the others.
    if rank == 0:
        ds = data.load(cfg["data"], args.cache)
    if ddp:
        dist.barrier()
    if rank != 0:
        ds = data.load(cfg["data"], args.cache)
    if cfg["cond"] and ds.labels is None:
        raise UsageError(f"--cond needs class labels, but {cfg['data']} has none")
    label_dim = ds.label_dim if cfg["cond"] else 0
    if state is not None:
        checkpoints.check_resume_data(state["config"], ds.shape, label_dim, args.resume)
    if cfg["augment"] > 0 and not (ds.is_image and "augment_dim" in inspect.signature(nets.NETS[cfg["net"]][0]).parameters):
        raise UsageError(f"--augment is for images and a net with augmentation labels (ddpmpp, adm); "
                         f"got {cfg['data']} and --net {cfg['net']}")
    if device.type == "cpu" and (args.threads or len(ds.shape) == 1):
        # Point-data nets do too little per op to gain from threads, and on a busy machine the contention made a
        # step 5-10x slower (BENCHMARKS.md, CPU threads).
        torch.set_num_threads(args.threads or 1)
    cfg.update(shape=list(ds.shape), label_dim=label_dim)  # saved with checkpoints: fid.py rebuilds the net from them

    # Network, optimizer, EMAs (all ranks build the same initial weights from the seed; EMAs copy the initialised net).
    torch.manual_seed(cfg["seed"])
    net = build_net(cfg, method, ds.shape, label_dim).to(device)
    teacher = checkpoints.load_teacher(args.teacher, method, ds, label_dim, device) if args.teacher else None
    ema_offset = 0
    if args.stage1:
        teacher, stage1_step = checkpoints.load_stage1(args.stage1, method, net, device, cfg["stage1_weights"],
                                                       init=state is None)
        ema_offset = stage1_step if cfg["ema_kind"] == "power" else 0
    if args.init and state is None:
        checkpoints.init_from(net, args.init, method, device, rank)
    elif method.NEEDS_INIT and state is None and rank == 0:
        print(f"warning: {args.method} usually starts from a pretrained diffusion model (--init PATH); training from scratch")
    normalize_weights = getattr(net, "normalize_weights_", None)  # EDM2: unit-norm weights after every step
    if normalize_weights is not None and state is None:
        normalize_weights()
    emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in cfg["ema"]]
    opt_cls = dict(adam=torch.optim.Adam, radam=torch.optim.RAdam)[cfg["optimizer"]]
    opt = opt_cls(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["adam_eps"],
                  weight_decay=cfg["weight_decay"])
    start = 0 if state is None else checkpoints.restore(state, net, emas, opt, args.resume)
    state = None  # free the host copy

    out = args.out or (checkpoints.run_dir_of(args.resume) if args.resume else None)
    with checkpoints.run_folder(out, args.resume, start, (args.method, ds.name), ddp, rank) as out:
        if rank == 0:
            checkpoints.write_config(out, {**cfg, "world_size": world, "batch_gpu": batch_gpu, "accum": accum})
        if ddp:
            dist.barrier()
        seed, ckpt_path = cfg["seed"], os.path.join(out, "ckpt.pt")
        ddp_ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ddp_ids) if ddp else net
        # --compile: dynamo compiles the loss (net forward, tangent, loss arithmetic, backward) on the first step and
        # again when an input shape changes; random draws from `gen` stay eager (graph breaks).
        loss_fn = torch.compile(method.loss) if args.compile else method.loss
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
        gen = torch.Generator(device)
        sampler = data.EpochSampler(len(ds), seed)
        if rank == 0:
            print(f"{args.method} on {cfg['data']} ({len(ds)} samples, shape {ds.shape}) | net {cfg['net']} "
                  f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params | batch {cfg['batch']} = {world} ranks x "
                  f"{accum} rounds x {batch_gpu} | {device} {cfg['precision']} | out {out}")

        fid_of = fid_evaluator(args, cfg, ds, label_dim, method, mcfg, rank, ddp, device) if args.fid_every else None
        stats, t0, step_t0, nonfinite = IntervalStats(method.TIME_BINS, device), time.time(), start, 0
        saved_step, bad_run, bad_steps = start, 0, 0  # last checkpoint, consecutive and interval non-finite steps
        aug_gen = torch.Generator(device)
        for step in range(start + 1, cfg["steps"] + 1):
            lr = learning_rate(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            bad_loss = torch.zeros((), device=device)
            for a in range(accum):
                m = rank * accum + a  # global micro-batch index: what it draws depends only on (seed, step, m)
                torch.manual_seed(data.mix_seed(seed, step, m, 0))  # dropout masks
                gen.manual_seed(data.mix_seed(seed, step, m, 1))  # noise, times, label dropout
                idx = sampler((step - 1) * cfg["batch"] + m * batch_gpu, batch_gpu)
                flip = torch.rand(batch_gpu, generator=torch.Generator().manual_seed(data.mix_seed(seed, step, m, 2))) < 0.5
                noise = torch.Generator().manual_seed(data.mix_seed(seed, step, m, 3))  # latents: posterior samples
                x = ds.get(idx, flip if cfg["xflip"] else None, device, generator=noise)
                aug = None
                if cfg["augment"] > 0:
                    x, aug = augment.augment(x, cfg["augment"], cfg["augment_pipe"],
                                             aug_gen.manual_seed(data.mix_seed(seed, step, m, 4)))
                y = ds.one_hot(idx, device) if label_dim else None
                with model.no_sync() if ddp and a < accum - 1 else contextlib.nullcontext():  # sync on the last round
                    with autocast, augment_labels(net, aug):
                        per_example, logs = loss_fn(model, x, y, mcfg, step, gen, teacher=teacher,
                                                    images=(step - 1) * cfg["batch"])
                    (per_example.mean() / accum).backward()
                bad_loss += (~torch.isfinite(per_example.detach())).sum()
                stats.add(per_example, logs)
            if ddp:
                dist.all_reduce(bad_loss)  # every rank takes the same decision below
            grad_norm, bad = repair_and_clip(net, cfg["grad_clip"])
            nonfinite += bad
            bad_run = bad_run + 1 if bad or bad_loss.item() else 0
            bad_steps += bad_run > 0
            if bad_run >= args.max_nonfinite:
                raise Diverged(f"step {step}: {bad_run} consecutive steps with a non-finite loss or gradients "
                               f"(--max-nonfinite {args.max_nonfinite}); {kept(ckpt_path, saved_step)}")
            opt.step()
            if normalize_weights is not None:
                normalize_weights()  # EDM2's forced weight normalisation, moved out of forward (REFERENCE §9.8)
            update_ema(emas, ema_decays(cfg, step + ema_offset), net)

            if step % args.log_every == 0 or step == cfg["steps"]:
                rec = stats.reduce(ddp)
                rate = (step - step_t0) * cfg["batch"] / (time.time() - t0)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                rec = dict(step=step, kimg=step * cfg["batch"] / 1000, **rec, lr=lr, grad_norm=grad_norm, img_per_s=rate,
                           gpu_mem_gib=mem, nonfinite_grads=nonfinite, nonfinite_steps=bad_steps)
                if rank == 0:
                    eta = (cfg["steps"] - step) * cfg["batch"] / rate
                    print(f"step {step:>7d}/{cfg['steps']} | kimg {rec['kimg']:9.1f} | loss {rec['loss']:.4g} | "
                          f"{rate:8.1f} img/s | mem {mem:5.1f} GiB | nonfinite {bad_steps} | ETA {format_time(eta)}",
                          flush=True)
                    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                t0, step_t0, bad_steps = time.time(), step, 0
            if rank == 0 and args.sample_every and step % args.sample_every == 0:
                samples = draw_samples(method, mcfg, emas[0], ds, label_dim, 64, seed, device)
                if torch.isfinite(samples).all():  # a diverging EMA is stopped by the checks around it
                    data.save_picture(os.path.join(out, f"samples-{step:07d}.png"), samples, ds)
            if fid_of is not None and (step % args.fid_every == 0 or step == cfg["steps"]):
                fid_t0, value = time.time(), fid_of(emas[0])  # every rank generates its share
                if rank == 0:
                    print(f"step {step:>7d} | FID {value:.3f} ({args.fid_num} samples, ema {cfg['ema'][0]}, "
                          f"{time.time() - fid_t0:.0f} s)", flush=True)
                    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, kimg=step * cfg["batch"] / 1000, fid=value, fid_num=args.fid_num)) + "\n")
                t0 = t0 + (time.time() - fid_t0)  # keep img/s a training rate
            if step % args.ckpt_every == 0 or step == cfg["steps"]:
                healthy = bad_run == 0 and checkpoints.all_finite(net, *emas)  # the same on every rank
                if not healthy and (step == cfg["steps"] or bad_run == 0):
                    raise Diverged(f"step {step}: non-finite weights, loss or gradients; {kept(ckpt_path, saved_step)}")
                if healthy and rank == 0:
                    checkpoints.save_checkpoint(ckpt_path, net, emas, opt, step, cfg)
                elif rank == 0:  # never a checkpoint from inside a stretch of non-finite steps
                    print(f"step {step}: no checkpoint (non-finite loss or gradients at this step)")
                saved_step = step if healthy else saved_step
                if ddp:
                    dist.barrier()

        if ddp:
            check_ranks_identical(net, world)
        if rank == 0:
            grid = ds.is_image or isinstance(ds, data.LatentDataset)  # pictures as grids, not scatters
            n = args.num_samples or (64 if grid else 2048)
            samples = draw_samples(method, mcfg, emas[0], ds, label_dim, n, seed, device)
            if not torch.isfinite(samples).all():
                raise Diverged(f"the EMA's samples are not finite (no samples written); {kept(ckpt_path, saved_step)}")
            samples = samples.clamp(-1, 1) if ds.is_image else samples
            np.save(os.path.join(out, "samples.npy"), samples.cpu().numpy())
            data.save_picture(os.path.join(out, "samples.png"), samples[:256] if grid else samples, ds)
            print(f"done: {out}/samples.png, samples.npy ({n} EMA samples, {args.method}.sample defaults), ckpt.pt")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def kept(ckpt_path, step):
    return f"the last good checkpoint {ckpt_path} (step {step}) is kept" if step else "no checkpoint was written"


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 1."""
    try:
        main(argv)
    except (UsageError, Diverged, data.DataError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    cli()
