"""Time of one network call: forward, forward + backward, and the JVP (fused tangents and torch.func.jvp) per net.

    python benchmarks/nets_time.py                                    # every net at its reference shape, CUDA
    python benchmarks/nets_time.py --nets dit-b2,edm2-s --batch 32 --precision bf16
    python benchmarks/nets_time.py --device cpu --tiny --batch 8      # the -tiny variants, for a CPU check
    python benchmarks/nets_time.py --device cpu --nets edm2-s --batch 2 --iters 3 --warmup 1

Each net is class-conditional (label_dim 1000; 10 with --tiny), in train mode with dropout 0, on random inputs. The
tangents are (dx, dt) as in sCM: random dx, dt = 1. Columns (median ms over --iters, after --warmup):
  fwd           forward under no_grad
  fwd+bwd       forward with grad + backward of a mean-square loss (the plain training step without optimizer)
  jvp:fused     net(x, t, tangents=...) under no_grad: primal and tangent in one pass
  jvp:func      torch.func.jvp of the net under no_grad
  fused+bwd     the fused pass with grad, then backward through its primal (MeanFlow/sCM "tangent=fused" step)
Ratios are to fwd, or to fwd+bwd for fused+bwd, all measured in the same run. On CUDA, peak memory of fused+bwd.
Not a test: the numbers depend on the machine.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.func import jvp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nets  # noqa: E402

# name -> (data shape, reference per-GPU batch): DDPM++ CIFAR-10 (MeanFlow/sCM), ImageNet-64 ADM/EDM2 (CM/sCM
# configs run 32 per GPU), DiT on 4x32x32 latents (MeanFlow: B/2 32 per GPU, XL/2 8).
FULL_SIZE_NETS = {
    "ddpmpp": ((3, 32, 32), 128), "adm": ((3, 64, 64), 32), "edm2-s": ((3, 64, 64), 32), "edm2-xl": ((3, 64, 64), 32),
    "dit-b2": ((4, 32, 32), 32), "dit-xl2": ((4, 32, 32), 8),
}
TINY = {"ddpmpp": ("ddpmpp-tiny", (3, 16, 16)), "adm": ("adm-tiny", (3, 16, 16)), "edm2": ("edm2-tiny", (3, 16, 16)),
        "dit": ("dit-tiny", (4, 8, 8))}


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(name, shape, batch, label_dim, args, device, autocast):
    torch.manual_seed(0)
    net = nets.build_net(name, shape, label_dim=label_dim, dropout=0.0).to(device).train()
    n_params = sum(p.numel() for p in net.parameters())
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, *shape, device=device, generator=g)
    dx = torch.randn(batch, *shape, device=device, generator=g)
    t = torch.rand(batch, device=device, generator=g)
    dt = torch.ones_like(t)
    y = torch.nn.functional.one_hot(torch.randint(label_dim, (batch,), device=device, generator=g), label_dim).float()

    def fwd():
        with torch.no_grad(), autocast:
            net(x, t, y=y)

    def fwd_bwd():
        with autocast:
            out = net(x, t, y=y)
        out.float().square().mean().backward()

    def fused():
        with torch.no_grad(), autocast:
            net(x, t, y=y, tangents=(dx, dt, None))

    def func():
        with torch.no_grad(), autocast:
            jvp(lambda x_, t_: net(x_, t_, y=y), (x, t), (dx, dt))

    def fused_bwd():
        with autocast:
            out, d_out = net(x, t, y=y, tangents=(dx, dt, None))
        (out.float().square().mean() + (out.float() * d_out).mean()).backward()

    ms = {}
    for key, fn in [("fwd", fwd), ("fwd+bwd", fwd_bwd), ("jvp:fused", fused), ("jvp:func", func), ("fused+bwd", fused_bwd)]:
        if device.type == "cuda" and key == "fused+bwd":
            torch.cuda.reset_peak_memory_stats(device)
        ms[key] = timed(fn, device, args.warmup, args.iters)
        net.zero_grad(set_to_none=True)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return n_params, ms, mem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=None, help=f"comma-separated; default: {','.join(FULL_SIZE_NETS)} "
                                                f"(with --tiny: {','.join(TINY)})")
    p.add_argument("--batch", type=int, default=None, help="default: each net's reference batch (8 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tiny", action="store_true", help="the -tiny variants at 16x16 (DiT: 4x8x8)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    table = TINY if args.tiny else FULL_SIZE_NETS
    names = args.nets.split(",") if args.nets else list(table)
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads) | {args.precision} | median of {args.iters}")
    print(f"{'net':<12} {'params':>8} {'shape':>10} {'batch':>5} {'fwd':>9} {'fwd+bwd':>15} {'jvp:fused':>15} "
          f"{'jvp:func':>15} {'fused+bwd':>15}" + ("  peak GiB" if device.type == "cuda" else ""))
    for key in names:
        if key not in table:
            raise SystemExit(f"unknown net {key!r}; choose from {', '.join(table)}")
        name, shape = table[key] if args.tiny else (key, table[key][0])
        batch = args.batch or (8 if args.tiny else table[key][1])
        n_params, ms, mem = bench(name, shape, batch, 10 if args.tiny else 1000, args, device, autocast)
        f = ms["fwd"]
        cols = [f"{ms['fwd+bwd']:8.1f} ({ms['fwd+bwd'] / f:4.2f}x)", f"{ms['jvp:fused']:8.1f} ({ms['jvp:fused'] / f:4.2f}x)",
                f"{ms['jvp:func']:8.1f} ({ms['jvp:func'] / f:4.2f}x)",
                f"{ms['fused+bwd']:8.1f} ({ms['fused+bwd'] / ms['fwd+bwd']:4.2f}x)"]
        print(f"{name:<12} {n_params / 1e6:7.1f}M {'x'.join(map(str, shape)):>10} {batch:>5} {f:9.1f} "
              + " ".join(f"{c:>15}" for c in cols) + (f"  {mem:8.1f}" if mem is not None else ""))


if __name__ == "__main__":
    main()
