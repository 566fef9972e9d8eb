"""Training-step time: plain flow matching (r = t) vs MeanFlow with each tangent option, same net, batch and precision.

    python benchmarks/step_time.py                                   # DDPM++ CIFAR-10 config, batch 128 on CUDA
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 2 --iters 3
    python benchmarks/step_time.py --device cpu --net mlp --data-shape 2 --batch 256

Each step is forward + backward + Adam on random data. Prints the median ms per step, the ratio to the plain step
measured in the same run and, on CUDA, peak memory. Not a test: numbers depend on the machine.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import meanflow  # noqa: E402
import nets  # noqa: E402


def plain_step(net, x, gen):
    """Flow matching with the same net and inputs: u(z_t, t, t) regressed on eps - x."""
    t = torch.rand(x.shape[0], generator=gen, device=x.device)
    eps = torch.randn(x.shape, generator=gen, device=x.device)
    z = meanflow.bcast(1 - t, x) * x + meanflow.bcast(t, x) * eps
    u = net(z, t, t)
    return (u.float() - (eps - x)).square().flatten(1).sum(dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="ddpmpp")
    p.add_argument("--data-shape", default="3,32,32", help="C,H,W or D")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="plain,jvp,fused,fd")
    args = p.parse_args()

    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.data_shape.split(","))
    torch.manual_seed(0)
    net = nets.build_net(args.net, shape, use_r=True, dropout=args.dropout).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, *shape, device=device).clamp(-1, 1)
    gen = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads) | net {args.net} {sum(q.numel() for q in net.parameters()) / 1e6:.1f}M "
          f"| batch {args.batch} | {args.precision} | dropout {args.dropout}")

    results = {}
    for variant in args.variants.split(","):
        cfg = meanflow.Config(tangent=variant) if variant != "plain" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                per_example = plain_step(net, x, gen) if cfg is None else meanflow.loss(net, x, None, cfg, 1, gen)[0]
            per_example.mean().backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[variant] = (statistics.median(times) * 1e3, mem)

    base = results.get("plain", (None,))[0]
    print(f"{'step':<16}{'ms/step':>10}{'img/s':>10}{'x plain':>9}{'peak GiB':>10}")
    for variant, (ms, mem) in results.items():
        name = "plain (r = t)" if variant == "plain" else f"meanflow {variant}"
        ratio = f"{ms / base:.2f}" if base else "-"
        print(f"{name:<16}{ms:>10.1f}{args.batch / ms * 1e3:>10.1f}{ratio:>9}{mem:>10.2f}")


if __name__ == "__main__":
    main()
