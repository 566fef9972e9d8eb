"""The training loop: any method on 1 CPU, 1 GPU or N GPUs.

    python train.py --method meanflow --data toy                          # 2-D demo, about a minute on 2 CPU cores
    python train.py --method meanflow --data cifar10 --out runs/mf-c10    # one GPU
    torchrun --nproc_per_node=8 train.py --method meanflow --data cifar10 --out runs/mf-c10
    python train.py --method meanflow --data toy --steps 6000 --resume runs/meanflow-toy-000   # continue a run
    python train.py --method meanflow --help                              # every flag, with the preset's values

Defaults come from the method's preset for the data (`--preset` overrides the choice), then the flags; recipe.py
holds the flags and resolves the run's config, checkpoints.py owns run folders and checkpoints, fid.py the FID of
--fid-every.
The global batch --batch is split into micro-batches of --batch-gpu, spread over ranks and accumulation rounds.
Micro-batch m of step k draws its data, noise and dropout masks from a seed of (seed, k, m), so the result
does not depend on that split (1 process x 2 rounds == 2 processes x 1 round) and --resume is exact.

Gradient sync with a JVP loss: the differentiable forward is the only call that goes through the DDP wrapper;
every no-grad pass (the JVP, finite differences, guidance) runs on the bare module inside the method file.
tests/test_train.py checks that 2 gloo ranks end with identical weights, equal to the 1-process run.
"""
import contextlib
import copy
import functools
import gc
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
import fid
import nets
import recipe
from checkpoints import build_net
from cli import UsageError, setup_distributed

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


# --- Main ------------------------------------------------------------------------------------------------------


class Diverged(Exception):
    """The run stopped on non-finite numbers; its last good checkpoint is kept."""


def main(argv=None):
    args, cfg, method, given = recipe.resolve_config(sys.argv[1:] if argv is None else argv)
    state = None
    if args.resume:  # the run's own config, then the flags given now
        state = checkpoints.load_checkpoint(args.resume, "cpu")
        cfg, notices = checkpoints.resume_config(state["config"], cfg, given, args.resume)
    mcfg = recipe.check_config(args, cfg, method)
    ddp, rank, world, device = setup_distributed(args.device)
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
    if len(ds.shape) == 1 and "sigma_data" in cfg and rank == 0:  # EDM preconditioning expects data of scale sigma_data
        std = spread(ds.x) / math.sqrt(ds.shape[0])  # per axis, on average
        if not 0.5 <= std / cfg["sigma_data"] <= 2:
            print(f"warning: the points' standard deviation per axis is {std:.3g} and sigma_data is "
                  f"{cfg['sigma_data']:g}: standardise the points (see README, Point data) or pass "
                  f"--sigma-data {std:.3g}")

    # Network, optimizer, EMAs (all ranks build the same initial weights from the seed; EMAs copy the initialised net).
    torch.manual_seed(cfg["seed"])
    net = build_net(cfg, method, ds.shape, label_dim).to(device)
    teacher = checkpoints.load_teacher(args.teacher, method, ds, label_dim, device, cfg) if args.teacher else None
    ema_offset = 0
    if args.stage1:
        teacher, stage1_step = checkpoints.load_stage1(args.stage1, method, net, device, cfg, init=state is None)
        ema_offset = stage1_step if cfg["ema_kind"] == "power" else 0
    if args.init and state is None:
        checkpoints.init_from(net, args.init, method, device, rank, cfg)
    elif method.NEEDS_INIT and state is None and rank == 0:
        print(f"warning: {args.method} usually starts from a pretrained diffusion model (--init PATH); training from scratch")
    if "ema" in given and cfg["ema_kind"] == "const" and cfg["ema_warmup"] and rank == 0:
        for b, last in zip(cfg["ema"], ema_decays(cfg, cfg["steps"])):
            if last < b:  # the warm-up ramp still caps the decay at the run's last step
                reach = math.ceil((10 * b - 1) / (1 - b) - 1e-9)  # (1 + k) / (10 + k) >= b from this k on
                print(f"warning: with --ema-warmup the EMA decay (1 + step) / (10 + step) stays below --ema {b} until "
                      f"step {reach}, after this run's {cfg['steps']} steps: --ema {b} changes nothing here (pass "
                      f"--ema-warmup false for a constant decay)")
    normalize_weights = getattr(net, "normalize_weights_", None)  # EDM2: unit-norm weights after every step
    if normalize_weights is not None and state is None:
        normalize_weights()
    emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in cfg["ema"]]
    opt_cls = dict(adam=torch.optim.Adam, radam=torch.optim.RAdam)[cfg["optimizer"]]
    # Adam's fused kernel: one pass over all parameters instead of a loop of small ops per tensor (on the toy MLP
    # 0.42 vs 1.30 ms a step on one CPU core); the same update. RAdam has none, nor do some other devices.
    fused = dict(fused=True) if cfg["optimizer"] == "adam" and device.type in ("cpu", "cuda") else {}
    opt = opt_cls(net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["adam_eps"],
                  weight_decay=cfg["weight_decay"], **fused)
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
                  f"{accum} rounds x {batch_gpu} | {device} {cfg['precision']} | preset {cfg['preset']} | out {out}")

        fid_of = fid.fid_evaluator(args, cfg, ds, label_dim, method, mcfg, rank, ddp, device) if args.fid_every else None
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
                    with autocast, augment.augment_labels(net, aug):
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
            if rank == 0 and args.snapshot_every and step % args.snapshot_every == 0 and bad_run == 0 \
                    and checkpoints.all_finite(net, *emas):  # kept, unlike ckpt.pt: quality along the run
                checkpoints.save_snapshot(out, net, emas, step, cfg)

        if ddp:
            check_ranks_identical(net, world)
        if rank == 0:
            grid = ds.is_image or isinstance(ds, data.LatentDataset)  # pictures as grids, not scatters
            n = args.num_samples or (64 if grid else 2048)
            samples = draw_samples(method, mcfg, emas[0], ds, label_dim, n, seed, device)
            if not torch.isfinite(samples).all():
                raise Diverged(f"the EMA's samples are not finite (no samples written); {kept(ckpt_path, saved_step)}")
            samples = samples.clamp(-1, 1) if ds.is_image else samples
            if not grid:  # a collapse trains with a normal-looking loss: compare the samples' spread with the data's
                have, want = spread(samples), spread(ds.x)
                if have < 0.1 * want:
                    print(f"warning: the samples' spread (RMS distance to their mean) is {have / want:.1%} of the "
                          f"data's: the one-step map has collapsed")
            np.save(os.path.join(out, "samples.npy"), samples.cpu().numpy())
            data.save_picture(os.path.join(out, "samples.png"), samples[:256] if grid else samples, ds)
            print(f"done: {out}/samples.png, samples.npy ({n} EMA samples, {args.method}.sample defaults), ckpt.pt")
    if ddp:
        # Free the DDP wrapper, whose reducer holds the process group, before the group goes: left to the garbage
        # collector it may be destroyed at interpreter exit, where Gloo's threads can abort the process (SIGABRT).
        del model, fid_of
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def spread(points):
    """RMS distance of points (N, D) to their mean, in float64."""
    p = points.double().cpu()
    return float((p - p.mean(0)).pow(2).sum(1).mean().sqrt())


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
