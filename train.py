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
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import nets

METHODS = ("meanflow", "scm", "cm", "tcm", "diffusion")

# Training recipe: every key a preset may set besides the method's Config fields: (default, type, help).
TRAIN = dict(
    net=("mlp", str, f"network: {', '.join(nets.NETS)}"),
    dropout=(None, float, "dropout probability (default: the net's)"),
    cond=(False, bool, "condition on class labels (needs a labelled dataset)"),
    distill=(False, bool, "the recipe distils: --teacher is required"),
    stage1_weights=("online", str, "tcm --stage1: start from that run's online weights (reference) or its first ema"),
    xflip=(False, bool, "random horizontal flips (images)"),
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
               stage1_weights=("online", "ema"), ema_kind=("const", "power"), tf32=("off", "on"))


class UsageError(Exception):
    pass

# --- Configuration -----------------------------------------------------------------------------------------


def parse_as(kind):
    """argparse type for a flag whose value has type `kind` (bool and comma-separated tuples included)."""
    def parse(text):
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if kind is tuple:
            return tuple(float(v) for v in text.split(",") if v)
        return kind(text)
    return parse


def add_flag(group, name, kind, help):
    extra = dict(nargs="?", const=True) if kind is bool else {}  # `--xflip` alone means true
    group.add_argument("--" + name.replace("_", "-"), dest=name, type=parse_as(kind), help=help, **extra)


def build_parser(method=None):
    p = argparse.ArgumentParser(description="Train a consistency model / flow map.", allow_abbrev=False)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--data", default="toy", help="toy, cifar10, points.npy, images.zip or an image folder")
    p.add_argument("--preset", help="method preset (default: toy for points, cifar10 for images)")
    p.add_argument("--out", help="output folder (default: runs/<method>-<data>-NNN, new)")
    p.add_argument("--resume", help="checkpoint file or run folder to continue exactly")
    p.add_argument("--teacher", help="checkpoint whose EMA net is the frozen teacher (distillation)")
    p.add_argument("--init", help="checkpoint whose EMA weights initialise the net (e.g. a diffusion model)")
    p.add_argument("--stage1", help="tcm: the stage-1 cm run (online weights start the student, EMAs and a frozen copy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="steps between sample pictures (0: end only)")
    p.add_argument("--num-samples", type=int, default=None, help="final samples.npy size (points 2048, images 64)")
    p.add_argument("--cache", default=data.cache_dir_default(), help="download cache (CIFAR-10, FID detector)")
    p.add_argument("--fid-every", type=int, default=0, help="steps between FIDs of the first EMA (fid.py protocol; 0: off)")
    p.add_argument("--fid-ref", help="reference statistics for --fid-every (python fid.py ref --data ... --out REF.npz)")
    p.add_argument("--fid-num", type=int, default=10_000, help="samples per --fid-every evaluation (FIDs compare only at equal N)")
    p.add_argument("--fid-detector", help="Inception weights for --fid-every (default: fid.py's; path, URL or name)")
    g = p.add_argument_group("training recipe (defaults from the preset)")
    for k, (default, kind, help) in TRAIN.items():
        add_flag(g, k, kind, help)
    if method is not None:
        g = p.add_argument_group(f"{method.__name__}.Config (defaults from the preset, then the dataclass)")
        for f in dataclasses.fields(method.Config):
            add_flag(g, f.name, type(f.default), f"default {f.default}")
    return p


def resolve_config(argv):
    """(args, cfg dict, method module): CLI flags over preset over defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    method = None
    if known.method is not None:
        if known.method not in METHODS:
            raise UsageError(f"unknown method {known.method!r}; choose from {', '.join(METHODS)}")
        method = importlib.import_module(known.method)
    args = build_parser(method).parse_args(argv)
    preset_name = args.preset or default_preset(args.data)
    if preset_name not in method.PRESETS:
        why = "" if args.preset else f" (the default for --data {args.data}; pass --preset)"
        raise UsageError(f"unknown preset {preset_name!r} for {args.method}{why}; choose from {', '.join(method.PRESETS)}")
    cfg_fields = {f.name: f.default for f in dataclasses.fields(method.Config)}
    preset = method.PRESETS[preset_name]
    unknown = set(preset) - set(cfg_fields) - set(TRAIN_DEFAULTS)
    assert not unknown, f"preset {preset_name} has unknown keys {unknown}"
    cfg = {**TRAIN_DEFAULTS, **cfg_fields, **preset, "preset": preset_name}
    for k in list(TRAIN_DEFAULTS) + list(cfg_fields):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    for k in ("method", "data", "seed"):
        cfg[k] = getattr(args, k)
    for k, allowed in CHOICES.items():
        if cfg[k] not in allowed:
            raise UsageError(f"--{k.replace('_', '-')} must be one of {', '.join(allowed)}, got {cfg[k]!r}")
    lo, hi = (0, 1) if cfg["ema_kind"] == "const" else (0, 0.28)
    if not cfg["ema"] or not all(lo < e < hi for e in cfg["ema"]):
        raise UsageError(f"--ema with --ema-kind {cfg['ema_kind']} needs values in ({lo}, {hi}), got {cfg['ema']}")
    if args.fid_every and not args.fid_ref:
        raise UsageError("--fid-every needs --fid-ref REF.npz (make it with: python fid.py ref --data DATA --out REF.npz)")
    if cfg["distill"] and not args.teacher:
        raise UsageError(f"preset {preset_name} distils from a teacher: pass --teacher PATH")
    if args.teacher and not method.TEACHERS:
        raise UsageError(f"{args.method} does not distil from a teacher")
    if bool(args.stage1) != hasattr(method, "STAGE1"):
        raise UsageError(f"{args.method} needs --stage1 RUN, the stage-1 cm run it continues" if args.stage1 is None
                         else f"--stage1 is for tcm, not {args.method}")
    return args, json.loads(json.dumps(cfg)), method


def default_preset(spec):
    """toy for points, imagenet256 for latents, imagenet64 for 64x64 images, cifar10 for other images."""
    if spec == "toy" or spec.endswith(".npy"):
        return "toy"
    if os.path.isfile(os.path.join(spec, data.LATENTS_JSON)):
        return "imagenet256"
    if spec != "cifar10" and data.peek_resolution(spec) == 64:
        return "imagenet64"
    return "cifar10"


def method_config(method, cfg):
    """The method's Config from a resolved config; fields it lacks (converted checkpoints) keep their defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(method.Config)}
    try:
        return method.Config(**{k: tuple(cfg[k]) if isinstance(fields[k], tuple) else cfg[k] for k in fields if k in cfg})
    except ValueError as e:
        raise UsageError(f"{method.__name__} config: {e}") from None

# --- Distributed, seeds, EMA ---------------------------------------------------------------------------------


def setup_distributed(device_flag):
    ddp = "RANK" in os.environ
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return ddp, rank, world, device


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


def save_checkpoint(path, net, emas, opt, step, cfg):
    """state_dicts + the resolved config, written to a temp file and renamed (a crash never leaves half a file)."""
    state = dict(net=net.state_dict(), ema=[e.state_dict() for e in emas], opt=opt.state_dict(), step=step, config=cfg)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path} ({type(e).__name__})") from None


def new_run_dir(method, data_name):
    i = 0
    while os.path.exists(os.path.join("runs", f"{method}-{data_name}-{i:03d}")):
        i += 1
    return os.path.join("runs", f"{method}-{data_name}-{i:03d}")


def format_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# --- Nets, teachers, samples --------------------------------------------------------------------------------------


def fid_evaluator(args, ds, label_dim, method, mcfg, rank, ddp, device):
    """A function ema -> FID (fid.py's protocol, per-image seeds), to call on every rank; fid.py is imported only here."""
    if not ds.is_image or ds.shape[0] != 3:
        raise UsageError(f"--fid-every needs RGB images; {args.data} has samples of shape {ds.shape}")
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
                                       seed=args.seed)


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


def build_net(cfg, method, shape, label_dim):
    """The net a resolved config describes, with what the method needs (r input, log-variance head)."""
    overrides = {} if cfg["dropout"] is None else dict(dropout=cfg["dropout"])
    overrides.update(cfg.get("net_kwargs", {}))  # converted checkpoints: settings that differ from the registry's
    try:
        return nets.build_net(cfg["net"], shape, label_dim=label_dim, **method.NET_NEEDS, **overrides)
    except ValueError as e:  # unknown net, or a net that does not fit the data
        raise UsageError(str(e)) from None


def load_compatible(path, method, device, role):
    """A checkpoint whose method is in method.TEACHERS (role "teacher") or method.INIT (role "init")."""
    state = load_checkpoint(path, device)
    other = state["config"]["method"]
    allowed = method.TEACHERS if role == "teacher" else method.INIT
    if other not in allowed:
        raise UsageError(f"{method.__name__} cannot use a {other} checkpoint as --{role} ({path}); "
                         f"it takes {', '.join(allowed)} checkpoints")
    return state


def load_weights(module, weights, what, strict=True):
    """load_state_dict, with a one-line error naming the checkpoint when the shapes or keys do not fit."""
    try:
        return module.load_state_dict(weights, strict=strict)
    except RuntimeError as e:
        raise UsageError(f"{what} does not fit this data/net: {str(e).splitlines()[0]}") from None


def frozen_ema(state, shape, label_dim, device, what, i=0):
    """EMA i of a checkpoint as the net its own method builds, frozen, in eval mode. A log-variance head that method
    does not use (an EDM2 checkpoint's, in a diffusion teacher) is dropped."""
    cfg = state["config"]
    net = build_net(cfg, importlib.import_module(cfg["method"]), shape, label_dim).to(device)
    keys = net.state_dict().keys()
    load_weights(net, {k: v for k, v in state["ema"][i].items() if not k.startswith("logvar") or k in keys}, what)
    return net.eval().requires_grad_(False)


def load_teacher(path, method, ds, label_dim, device):
    """The first EMA net of a checkpoint, frozen, in eval mode."""
    state = load_compatible(path, method, device, "teacher")
    return frozen_ema(state, ds.shape, label_dim if state["config"]["cond"] else 0, device, f"teacher {path}")


def load_stage1(path, method, net, device, which, init):
    """TCM: the stage-1 run's online weights (the reference's configs) or first EMA (its method template) start the
    student and, as copies of it, every EMA. Returns a frozen copy in train mode (dropout on, as the reference) and the
    stage-1 step count, from which a power-function EMA's step counter continues (REFERENCE §1.5)."""
    state = load_checkpoint(path, device)
    if state["config"]["method"] not in method.STAGE1:
        raise UsageError(f"--stage1 must be a {' or '.join(method.STAGE1)} run; {path} is {state['config']['method']}")
    weights = state["net"] if which == "online" else state["ema"][0]
    stage1 = copy.deepcopy(net)
    load_weights(stage1, weights, f"--stage1 {path}")
    if init:
        net.load_state_dict(weights)
    return stage1.train().requires_grad_(False), state["step"]


def init_from(net, path, method, device, rank):
    """Copy a checkpoint's first EMA into net. Only the log-variance head may differ: a diffusion model's net lacks
    one (it stays freshly initialised), an EDM2 checkpoint's is dropped by methods without one."""
    state = load_compatible(path, method, device, "init")
    missing, unexpected = load_weights(net, state["ema"][0], f"--init {path}", strict=False)
    if any(not k.startswith("logvar") for k in missing + unexpected):
        raise UsageError(f"--init {path} does not fit this net: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if rank == 0:
        print(f"initialised from {path}" + (f" (new: {', '.join(missing)})" if missing else ""))


# --- Main ------------------------------------------------------------------------------------------------------


def main(argv=None):
    args, cfg, method = resolve_config(sys.argv[1:] if argv is None else argv)
    ddp, rank, world, device = setup_distributed(args.device)
    mcfg = method_config(method, cfg)
    # PyTorch leaves cuDNN convolutions in TF32 by default, so "fp32" would not be fp32 on Ampere or newer.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"] == "on"

    # Batch split (assert exact: the reference silently rounds, REFERENCE §9.7).
    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    if batch_gpu <= 0 or cfg["batch"] % (batch_gpu * world):
        raise UsageError(f"--batch {cfg['batch']} is not a multiple of --batch-gpu {batch_gpu} x {world} ranks")
    accum = cfg["batch"] // (batch_gpu * world)

    # Data: rank 0 first (it may download), then the others.
    if rank == 0:
        ds = data.load(args.data, args.cache)
    if ddp:
        dist.barrier()
    if rank != 0:
        ds = data.load(args.data, args.cache)
    if cfg["cond"] and ds.labels is None:
        raise UsageError(f"--cond needs class labels, but {args.data} has none")
    label_dim = ds.label_dim if cfg["cond"] else 0
    cfg.update(shape=list(ds.shape), label_dim=label_dim)  # saved with checkpoints: fid.py rebuilds the net from them

    # Network, optimizer, EMAs (all ranks build the same initial weights from the seed; EMAs copy the initialised net).
    torch.manual_seed(args.seed)
    net = build_net(cfg, method, ds.shape, label_dim).to(device)
    teacher = load_teacher(args.teacher, method, ds, label_dim, device) if args.teacher else None
    ema_offset = 0
    if args.stage1:
        teacher, stage1_step = load_stage1(args.stage1, method, net, device, cfg["stage1_weights"], init=not args.resume)
        ema_offset = stage1_step if cfg["ema_kind"] == "power" else 0
    if args.init and not args.resume:
        init_from(net, args.init, method, device, rank)
    elif method.NEEDS_INIT and not args.resume and rank == 0:
        print(f"warning: {args.method} usually starts from a pretrained diffusion model (--init PATH); training from scratch")
    normalize_weights = getattr(net, "normalize_weights_", None)  # EDM2: unit-norm weights after every step
    if normalize_weights is not None and not args.resume:
        normalize_weights()
    emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in cfg["ema"]]
    opt_cls = dict(adam=torch.optim.Adam, radam=torch.optim.RAdam)[cfg["optimizer"]]
    opt = opt_cls(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["adam_eps"],
                  weight_decay=cfg["weight_decay"])

    if args.resume and not args.out:
        args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
    out = args.out or (new_run_dir(args.method, ds.name) if rank == 0 else None)
    if ddp:
        out = [out]
        dist.broadcast_object_list(out, src=0)
        out = out[0]
    ckpt_path = os.path.join(out, "ckpt.pt")
    start = 0
    if args.resume:
        state = load_checkpoint(args.resume, device)
        diffs = {k: (state["config"].get(k), v) for k, v in cfg.items() if k != "steps" and state["config"].get(k) != v}
        if rank == 0 and diffs:
            print(f"resume: config differs from the checkpoint's (checkpoint -> now): {diffs}")
        net.load_state_dict(state["net"])
        for e, sd in zip(emas, state["ema"]):
            e.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        start = state["step"]
    elif os.path.exists(ckpt_path):
        raise UsageError(f"{out} already holds a run; pass --resume {out} or choose another --out")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**cfg, "world_size": world, "batch_gpu": batch_gpu, "accum": accum}, f, indent=2)
    if ddp:
        dist.barrier()

    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) if ddp else net
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")
    gen = torch.Generator(device)
    sampler = data.EpochSampler(len(ds), args.seed)
    if rank == 0:
        print(f"{args.method} on {args.data} ({len(ds)} samples, shape {ds.shape}) | net {cfg['net']} "
              f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params | batch {cfg['batch']} = {world} ranks x "
              f"{accum} rounds x {batch_gpu} | {device} {cfg['precision']} | out {out}")

    fid_of = fid_evaluator(args, ds, label_dim, method, mcfg, rank, ddp, device) if args.fid_every else None
    stats, t0, step_t0, nonfinite = IntervalStats(method.TIME_BINS, device), time.time(), start, 0
    for step in range(start + 1, cfg["steps"] + 1):
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for a in range(accum):
            m = rank * accum + a  # global micro-batch index: what it draws depends only on (seed, step, m)
            torch.manual_seed(data.mix_seed(args.seed, step, m, 0))  # dropout masks
            gen.manual_seed(data.mix_seed(args.seed, step, m, 1))  # noise, times, label dropout
            idx = sampler((step - 1) * cfg["batch"] + m * batch_gpu, batch_gpu)
            flip = torch.rand(batch_gpu, generator=torch.Generator().manual_seed(data.mix_seed(args.seed, step, m, 2))) < 0.5
            noise = torch.Generator().manual_seed(data.mix_seed(args.seed, step, m, 3))  # latents: posterior samples
            x = ds.get(idx, flip if cfg["xflip"] else None, device, generator=noise)
            y = ds.one_hot(idx, device) if label_dim else None
            with model.no_sync() if ddp and a < accum - 1 else contextlib.nullcontext():  # sync on the last round
                with autocast:
                    per_example, logs = method.loss(model, x, y, mcfg, step, gen, teacher=teacher,
                                                    images=(step - 1) * cfg["batch"])
                (per_example.mean() / accum).backward()
            stats.add(per_example, logs)
        grad_norm, bad = repair_and_clip(net, cfg["grad_clip"])
        nonfinite += bad
        opt.step()
        if normalize_weights is not None:
            normalize_weights()  # EDM2's forced weight normalisation, moved out of forward (REFERENCE §9.8)
        update_ema(emas, ema_decays(cfg, step + ema_offset), net)

        if step % args.log_every == 0 or step == cfg["steps"]:
            rec = stats.reduce(ddp)
            rate = (step - step_t0) * cfg["batch"] / (time.time() - t0)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            rec = dict(step=step, kimg=step * cfg["batch"] / 1000, **rec, lr=lr, grad_norm=grad_norm, img_per_s=rate,
                       gpu_mem_gib=mem, nonfinite_grads=nonfinite)
            if rank == 0:
                eta = (cfg["steps"] - step) * cfg["batch"] / rate
                print(f"step {step:>7d}/{cfg['steps']} | kimg {rec['kimg']:9.1f} | loss {rec['loss']:.4g} | "
                      f"{rate:8.1f} img/s | mem {mem:5.1f} GiB | ETA {format_time(eta)}", flush=True)
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            t0, step_t0 = time.time(), step
        if rank == 0 and args.sample_every and step % args.sample_every == 0:
            samples = draw_samples(method, mcfg, emas[0], ds, label_dim, 64, args.seed, device)
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
            if rank == 0:
                save_checkpoint(ckpt_path, net, emas, opt, step, cfg)
            if ddp:
                dist.barrier()

    if ddp:
        check_ranks_identical(net, world)
    if rank == 0:
        grid = ds.is_image or isinstance(ds, data.LatentDataset)  # pictures as grids, not scatters
        n = args.num_samples or (64 if grid else 2048)
        samples = draw_samples(method, mcfg, emas[0], ds, label_dim, n, args.seed, device)
        samples = samples.clamp(-1, 1) if ds.is_image else samples
        np.save(os.path.join(out, "samples.npy"), samples.cpu().numpy())
        data.save_picture(os.path.join(out, "samples.png"), samples[:256] if grid else samples, ds)
        print(f"done: {out}/samples.png, samples.npy ({n} EMA samples, {args.method}.sample defaults), ckpt.pt")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 1."""
    try:
        main(argv)
    except (UsageError, data.DataError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    sys.modules["train"] = sys.modules[__name__]  # fid.py imports train: one module, one UsageError class
    cli()
