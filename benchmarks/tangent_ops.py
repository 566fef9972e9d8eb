"""Cost of the fused tangent of one DDPM++ block's group norm + SiLU, against a git revision's nets.py, on the CPU.

    python benchmarks/tangent_ops.py --baseline 2284630
    python benchmarks/tangent_ops.py --baseline HEAD --shapes 8,128,16,16 --calls 200

For each shape (B, C, H, W): `nets.silu(nets.GroupNorm(C)(x))` with x requiring grad (the primal of a fused training
pass), alone and on a Dual (primal + tangent), for the working tree's nets.py and REV's (`git show REV:nets.py`, loaded
as a separate module), interleaved in one process: the lower quartile of --calls calls each, in ms, and the tangent's
overhead (Dual minus primal). One thread. Not a test: the numbers depend on the machine; compare within one run.
"""
import argparse
import os
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nets  # noqa: E402


def revision(rev):
    src = subprocess.run(["git", "show", f"{rev}:nets.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"nets@{rev}")
    exec(compile(src, f"{rev}:nets.py", "exec"), module.__dict__)
    return module


def lower_quartile_ms(f, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4] * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, metavar="REV")
    p.add_argument("--shapes", default="8,128,16,16;8,256,8,8;4,128,32,32", help="B,C,H,W;...")
    p.add_argument("--calls", type=int, default=120)
    args = p.parse_args()
    torch.set_num_threads(1)
    modules = {args.baseline: revision(args.baseline), "this": nets}
    print(f"torch {torch.__version__} | cpu (1 thread) | lower quartile of {args.calls} calls, ms")
    print("shape            | " + " | ".join(f"{k}: primal, +tangent, overhead" for k in modules))
    for shape in args.shapes.split(";"):
        B, C, H, W = map(int, shape.split(","))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, W, generator=g).requires_grad_()
        d = torch.randn(B, C, H, W, generator=g)
        cells = {}
        for _ in range(2):  # two rounds, interleaved: a change in the machine's load hits both alike
            for name, m in modules.items():
                norm = m.GroupNorm(C)
                primal = lower_quartile_ms(lambda: m.silu(norm(x)), args.calls // 2)
                both = lower_quartile_ms(lambda: m.silu(norm(m.Dual(x, d))), args.calls // 2)
                old = cells.get(name, (float("inf"), float("inf")))
                cells[name] = (min(old[0], primal), min(old[1], both))
        print(f"{shape:16s} | " + " | ".join(f"{a:.2f}, {b:.2f}, {b - a:.2f}" for a, b in cells.values()))


if __name__ == "__main__":
    main()
