"""Training-step time of the JVP methods against the plain diffusion step, same net, batch and precision.

    python benchmarks/step_time.py                                   # DDPM++ CIFAR-10 config, batch 128 on CUDA
    python benchmarks/step_time.py --precision bf16
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 4 --iters 3 --warmup 1
    python benchmarks/step_time.py --device cpu --net mlp --data-shape 2 --batch 256 --iters 30 --threads 1
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 1 --iters 0 --warmup 0 --memory  # saved bytes, FLOPs

Each step is forward + backward + Adam (fused as in train.py, or --adam loop) on random data. "plain" is diffusion.py's
EDM step; MeanFlow adds a second time input r to the net and sCM a log-variance head (both negligible in size). CD's
and sCD's teacher is a second copy of the net in eval mode, TCM's stage-1 net one in train mode. CM is measured at its
first ECT stage. Prints the median ms per step, the ratio to the plain step measured in the same run and, on CUDA,
peak memory. Not a test: the numbers depend on the machine.

--memory adds one more, untimed step per variant that reports two device-independent costs:
- saved MiB: the bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`), each storage counted
  once and the net's own parameters and buffers left out. This is the activation memory of the step, the part of peak
  training memory that grows with the batch.
- GFLOP: floating-point operations of the step's forward + backward as `torch.utils.flop_counter` counts them
  (matmuls, convolutions and attention; elementwise ops are not counted).
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cm  # noqa: E402
import diffusion  # noqa: E402
import meanflow  # noqa: E402
import nets  # noqa: E402
import scm  # noqa: E402
import tcm  # noqa: E402

VARIANTS = ["plain", "ct", "cd", "tcm"] + [f"{m}:{t}" for m in ("meanflow", "sct", "scd") for t in ("jvp", "fused", "fd")]


def setup(variant, args, shape, device):
    """(net, loss function of (x, gen), teacher or None) for a variant."""
    torch.manual_seed(0)
    name, _, tangent = variant.partition(":")
    module = dict(plain=diffusion, ct=cm, cd=cm, tcm=tcm, meanflow=meanflow, sct=scm, scd=scm)[name]
    net = nets.build_net(args.net, shape, dropout=args.dropout, **module.NET_NEEDS).to(device).train()
    teacher = None
    if name in ("scd", "cd"):  # a frozen diffusion teacher in eval mode
        teacher = nets.build_net(args.net, shape).to(device).eval().requires_grad_(False)
    if name == "tcm":  # the frozen stage-1 copy runs in train mode (dropout on)
        teacher = nets.build_net(args.net, shape, dropout=args.dropout).to(device).train().requires_grad_(False)
    cfg = module.Config(tangent=tangent) if tangent else module.Config()

    def step_loss(x, gen):
        return module.loss(net, x, None, cfg, 1, gen, teacher=teacher, images=0)[0]
    return net, step_loss, teacher


def saved_bytes_and_flops(step_loss, x, gen, modules):
    """(bytes autograd saves for backward, FLOPs of forward + backward) of one step. A storage saved by several ops
    counts once; storages of the modules' parameters and buffers are excluded (they are not activations)."""
    own = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            per_example = step_loss(x, gen)
        per_example.mean().backward()
    return sum(saved.values()), flops.get_total_flops()


def step_parser(doc):
    """The flags that pick the net, data, batch, device and precision of a step (shared with profile_step.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="ddpmpp")
    p.add_argument("--data-shape", default="3,32,32", help="C,H,W or D")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--dropout", type=float, default=0.2)
    return p


def main():
    p = step_parser(__doc__)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    p.add_argument("--adam", default="fused", choices=["fused", "loop"],
                   help="Adam's fused kernel (train.py) or torch's per-tensor loop (its CPU default)")
    p.add_argument("--memory", action="store_true", help="also report saved-activation bytes and FLOPs per step")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.data_shape.split(","))
    x = torch.randn(args.batch, *shape, device=device).clamp(-1, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads) | net {args.net} | batch {args.batch} | {args.precision} | "
          f"dropout {args.dropout} | Adam {args.adam}")

    results = {}
    for variant in args.variants.split(","):
        net, step_loss, teacher = setup(variant, args, shape, device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-5, fused=args.adam == "fused", foreach=False)
        gen = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                per_example = step_loss(x, gen)
            per_example.mean().backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        saved, flops = float("nan"), float("nan")
        if args.memory:
            with autocast:
                saved, flops = saved_bytes_and_flops(step_loss, x, gen, [m for m in (net, teacher) if m is not None])
        ms = statistics.median(times) * 1e3 if times else float("nan")  # --iters 0: only the --memory step
        results[variant] = (ms, mem, saved / 2**20, flops / 1e9)
        del net, opt

    base = results.get("plain", (None,))[0]
    print(f"{'step':<18}{'ms/step':>10}{'img/s':>10}{'x plain':>9}{'peak GiB':>10}{'saved MiB':>11}{'GFLOP':>9}")
    for variant, (ms, mem, saved, gflop) in results.items():
        ratio = f"{ms / base:.2f}" if base else "-"
        print(f"{variant:<18}{ms:>10.1f}{args.batch / ms * 1e3:>10.1f}{ratio:>9}{mem:>10.2f}{saved:>11.1f}{gflop:>9.2f}")


if __name__ == "__main__":
    main()
