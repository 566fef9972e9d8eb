"""Flags, presets and the resolved config of a run.

A run's config is, key by key: the flag given on the command line, else the method's preset for the data
(`--preset`, or default_preset(--data)), else the default here (TRAIN) or in the method's Config. resolve_config
builds it, check_config refuses a bad choice or number before anything is created and returns the method's Config,
split_batch divides the global batch among the ranks, check_data refuses data the recipe cannot use and
config_warnings names likely mistakes. `--resume` puts the saved config under the flags given
(checkpoints.resume_config). train.py imports this module; it imports neither train.py nor fid.py.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os

import augment
import checkpoints
import data
import nets
import trackers
from cli import UsageError, check_device, parse_as

METHODS = checkpoints.METHOD_NAMES

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
    optimizer=("adam", str, "adam, adamw (decoupled weight decay) or radam"),
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
CHOICES = dict(net=tuple(nets.NETS), optimizer=("adam", "adamw", "radam"), precision=("fp32", "bf16"),
               stage1_weights=("online", "ema"), ema_kind=("const", "power"), augment_pipe=tuple(augment.PIPES),
               tf32=("off", "on"))


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
    p.add_argument("--teacher", help="checkpoint whose EMA net is the frozen teacher (distillation); it also starts "
                   "the student unless --init is given")
    p.add_argument("--init", help="checkpoint (or convert.py export .safetensors) whose EMA weights initialise the net "
                   "(e.g. a diffusion model)")
    p.add_argument("--stage1", help="tcm: the stage-1 cm run (online weights start the student, EMAs and a frozen copy)")
    p.add_argument("--seed", type=int, help="default 0, or the resumed run's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the net, its gradients, optimizer state "
                   "and EMAs over the ranks (FSDP2) instead of replicating them (DDP); checkpoints stay whole")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the loss step (compiled once per input shape: the first steps are slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for point data, torch's default otherwise)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="steps between sample pictures (0: end only)")
    p.add_argument("--snapshot-every", type=int, default=0, help="also keep the weights (net and EMAs, no optimizer "
                   "state) every this many steps as snapshots/ckpt-STEP.pt, for quality-vs-steps curves (0: none)")
    p.add_argument("--num-samples", type=int, default=None, help="final samples.npy size (points 2048, images 64)")
    p.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many consecutive steps with "
                   "non-finite loss or gradients")
    p.add_argument("--cache", default=data.cache_dir_default(), help="download cache (CIFAR-10, FID detector)")
    p.add_argument("--fid-every", type=int, default=0, help="steps between FIDs of the first EMA (fid.py protocol; 0: off)")
    p.add_argument("--fid-ref", help="reference statistics for --fid-every (python fid.py ref --data ... --out REF.npz)")
    p.add_argument("--fid-num", type=int, default=10_000, help="samples per --fid-every evaluation (FIDs compare only at equal N)")
    p.add_argument("--fid-detector", help="Inception weights for --fid-every (default: fid.py's; path, URL or name)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (pip install tensorboard)")
    p.add_argument("--wandb", nargs="?", const=True, choices=("online", "offline"), help="also log to Weights & Biases "
                   "(pip install wandb); offline: no network, files in OUT/wandb (default: WANDB_MODE, else online)")
    fields = {f.name: f.default for f in dataclasses.fields(method.Config)} if method else {}
    values = {**TRAIN_DEFAULTS, **fields, **(method.PRESETS[preset] if preset else {})}
    where = f"preset {preset}" if preset else "default"
    g = p.add_argument_group(f"training recipe ({where})")
    for k, (default, kind, help) in TRAIN.items():
        add_flag(g, k, kind, f"{help} [{where}: {show(values[k])}]")
    if method is not None:
        g = p.add_argument_group(f"{method.__name__}.Config ({where})")
        for k, default in fields.items():
            valid = method.RANGES.get(k)  # the range Config.__post_init__ checks
            add_flag(g, k, type(default), (f"{valid} " if valid else "") + f"[{where}: {show(values[k])}]")
    return p


# Lowest allowed value and the bound it must stay below, of every numeric flag; checked before anything is created.
LIMITS = dict(steps=(1, math.inf), batch=(1, math.inf), batch_gpu=(1, math.inf), dropout=(0, 1), lr=(0, math.inf),
              adam_eps=(0, math.inf), weight_decay=(0, math.inf), lr_warmup=(0, math.inf), lr_ref_steps=(0, math.inf),
              grad_clip=(0, math.inf), seed=(0, math.inf), log_every=(1, math.inf), ckpt_every=(1, math.inf),
              sample_every=(0, math.inf), snapshot_every=(0, math.inf), num_samples=(1, math.inf),
              max_nonfinite=(1, math.inf), fid_every=(0, math.inf), fid_num=(2, math.inf), threads=(1, math.inf))


def resolve_config(argv):
    """(args, cfg dict, method module, flags given): CLI flags over preset over defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--method", "--data", "--preset", "--teacher"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    method, preset_name = None, None
    if known.method is not None:
        method = checkpoints.method_module(known.method)
        preset_name = known.preset or default_preset(known.data or "toy", method, distill=bool(known.teacher))
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
    if known.teacher and cfg.get("batch_target") and "batch_target" not in given:
        cfg["batch_target"] = False  # a preset's batch target is for data; the teacher gives the target (check_config)
    return args, json.loads(json.dumps(cfg)), method, given


def method_config(method, cfg):
    """The method's Config from a resolved config; fields it lacks (converted checkpoints) keep their defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(method.Config)}
    try:
        return method.Config(**{k: tuple(cfg[k]) if isinstance(fields[k], tuple) else cfg[k] for k in fields if k in cfg})
    except ValueError as e:
        raise UsageError(f"{method.__name__} config: {e}") from None


def check_config(args, cfg, method, resumed_step=None):
    """Every choice and number in range, the checkpoints and files the recipe needs named, the run folder usable, and
    on --resume (`resumed_step`: the checkpoint's step) steps left to take and no flag that only starts a run (before
    anything is created)."""
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
    check_device(args.device)
    if resumed_step is not None:
        if cfg["steps"] <= resumed_step:
            raise UsageError(f"--resume {args.resume} is at step {resumed_step} already: pass --steps above "
                             f"{resumed_step} to continue it (--steps is the total, not the steps to add)")
        if args.init:
            raise UsageError("--init starts a new run's net; a resumed run continues from its checkpoint: drop --init")
    checkpoints.check_out(args.out, args.resume, cfg["data"])
    trackers.check(args.tensorboard, args.wandb)
    if args.fid_every and not args.fid_ref:
        raise UsageError("--fid-every needs --fid-ref REF.npz (make it with: python fid.py ref --data DATA --out REF.npz)")
    for flag in ("fid_ref", "fid_detector"):
        if getattr(args, flag) and not args.fid_every:
            raise UsageError(f"--{flag.replace('_', '-')} is for --fid-every N, which is not given")
    for flag in ("fid_ref", "teacher", "init", "stage1"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
    if cfg["distill"] and not args.teacher:
        raise UsageError(f"preset {cfg['preset']} distils from a teacher: pass --teacher PATH")
    if args.teacher and not method.TEACHERS:
        raise UsageError(f"{args.method} does not distil from a teacher")
    if args.teacher and cfg.get("batch_target"):
        raise UsageError("--batch-target is the target of training without a teacher; with --teacher the teacher gives "
                         "the target (pass --batch-target false)")
    if bool(args.stage1) != hasattr(method, "STAGE1"):
        raise UsageError(f"{args.method} needs --stage1 RUN, the stage-1 cm run it continues" if args.stage1 is None
                         else f"--stage1 is for tcm, not {args.method}")
    return method_config(method, cfg)


def split_batch(cfg, world):
    """(micro-batch per rank and round, accumulation rounds) of the global batch, which must split exactly (FastGen
    34f30e8 rounds instead: fastgen/utils/scripts.py, setup, max(global // local, 1) rounds and a log line)."""
    batch_gpu = cfg["batch_gpu"] or cfg["batch"] // world
    if batch_gpu <= 0 or cfg["batch"] % (batch_gpu * world):
        raise UsageError(f"--batch {cfg['batch']} is not a multiple of --batch-gpu {batch_gpu} x {world} ranks")
    return batch_gpu, cfg["batch"] // (batch_gpu * world)


def check_data(args, cfg, ds, saved):
    """The data fits the recipe (labels for --cond, images for --augment) and a resumed run (`saved`: its config, or
    None); returns the label_dim the net is built with (0: unconditional)."""
    if cfg["cond"] and ds.labels is None:
        raise UsageError(f"--cond needs class labels, but {cfg['data']} has none")
    label_dim = ds.label_dim if cfg["cond"] else 0
    if saved is not None:
        checkpoints.check_resume_data(saved, ds.shape, label_dim, args.resume)
    if cfg["augment"] > 0 and not (ds.is_image and "augment_dim" in inspect.signature(nets.NETS[cfg["net"]][0]).parameters):
        raise UsageError(f"--augment is for images and a net with augmentation labels (ddpmpp, adm); "
                         f"got {cfg['data']} and --net {cfg['net']}")
    return label_dim


def config_warnings(args, cfg, method, ds, resumed):
    """Choices that run but are likely mistakes, as messages: points far from sigma_data's scale, a method that
    expects --init started from scratch (train.ema_warnings adds the EMA's)."""
    messages = []
    if len(ds.shape) == 1 and "sigma_data" in cfg:  # EDM preconditioning expects data of scale sigma_data
        std = data.rms_spread(ds.x) / math.sqrt(ds.shape[0])  # per axis, on average
        if not 0.5 <= std / cfg["sigma_data"] <= 2:
            messages.append(f"the points' standard deviation per axis is {std:.3g} and sigma_data is "
                            f"{cfg['sigma_data']:g}: standardise the points (see docs/training.md, \"Point data\") "
                            f"or pass --sigma-data {std:.3g}")
    if method.NEEDS_INIT and not resumed and not args.init and not args.teacher:
        messages.append(f"{args.method} usually starts from a pretrained diffusion model (--init PATH); training from scratch")
    return messages


def default_preset(spec, method=None, distill=False):
    """toy for points, imagenet256 for latents, imagenet64 for 64x64 images, cifar10 for other images. With a
    teacher (distill) and a method that has one distilling variant of that preset (scm: toy-scd, cifar10-scd,
    imagenet64-scd; cm: toy-cd), the variant."""
    if spec == "toy" or spec.lower().endswith(".npy"):
        name = "toy"
    elif os.path.isfile(os.path.join(spec, data.LATENTS_JSON)):
        name = "imagenet256"
    elif spec != "cifar10" and data.peek_resolution(spec) == 64:
        name = "imagenet64"
    else:
        name = "cifar10"
    if distill:
        variants = [k for k, p in method.PRESETS.items() if k.startswith(name + "-") and p.get("distill")]
        if len(variants) == 1:
            return variants[0]
    return name
