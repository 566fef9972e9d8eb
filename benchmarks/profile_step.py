"""Where one training step spends its time and memory: torch.profiler's table of operators for one step of a variant.

    python benchmarks/profile_step.py --device cpu --net ddpmpp --batch 4 --variant plain
    python benchmarks/profile_step.py --variant meanflow:fused --sort self_cuda_time_total     # on CUDA
    python benchmarks/profile_step.py --device cpu --net ddpmpp --batch 4 --variant sct:fused --sort self_cpu_memory_usage

Variants and setup as benchmarks/step_time.py (forward + backward of one step after one warm-up step; the optimizer
step is left out). The table lists the top operators by --sort; memory columns count what each operator allocates.
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402


def main():
    p = step_time.step_parser(__doc__)
    p.add_argument("--variant", default="plain", help=f"one of {','.join(step_time.VARIANTS)}")
    p.add_argument("--sort", default="self_cpu_time_total", help="a torch.profiler key_averages column")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()

    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.data_shape.split(","))
    x = torch.randn(args.batch, *shape, device=device).clamp(-1, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    net, step_loss, _ = step_time.setup(args.variant, args, shape, device)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        net.zero_grad(set_to_none=True)
        with autocast:
            per_example = step_loss(x, gen)
        per_example.mean().backward()

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    print(f"torch {torch.__version__} | {args.device} | net {args.net} | batch {args.batch} | {args.precision} | "
          f"{args.variant}")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
