"""Per-rank memory of the training state under DDP and FSDP (train.py --fsdp), for the net of every preset.

    python benchmarks/fsdp_memory.py                     # the table, computed from parameter counts, at 8 ranks
    python benchmarks/fsdp_memory.py --ranks 64
    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py --measure scm:cifar10-scd   # measured on 2 gloo ranks

State per rank, fp32, P the online net's parameters and W the ranks: weights 4P, gradients 4P, Adam's (or RAdam's,
AdamW's) two moments 8P, each EMA 4P, the frozen teacher (CD / sCD; TCM's stage-1 net) 4P_teacher. DDP keeps all of it
on every rank; FSDP divides the first four by W and keeps the teacher whole (parallel.py: replicated, no all-gather per
teacher call). Not counted: activations (the same under both: the micro-batch's), and under FSDP the block being
all-gathered for its forward or backward (one residual block at a time, two with prefetching), bf16 copies under
--precision bf16 included. The nets are built on the meta device: no memory is allocated.

--measure METHOD:PRESET builds that preset's net, EMAs and teacher, shards them as train.py does, takes one Adam step
on zero gradients and prints rank 0's bytes (parallel.rank_bytes) beside the formula's for this world size.
"""
import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nets  # noqa: E402

METHODS = ("diffusion", "cm", "scm", "tcm", "meanflow", "shortcut", "flowmap")
GB = 1e9


def preset_nets():
    """(method, preset, net name, net kwargs, EMAs, teacher kwargs or None) for every preset that names an image net."""
    rows = []
    for name in METHODS:
        method = importlib.import_module(name)
        for preset, values in method.PRESETS.items():
            net = values.get("net", "ddpmpp")
            if net.startswith("mlp"):
                continue
            teacher = None
            if values.get("distill"):
                teacher = importlib.import_module(method.TEACHERS[0]).NET_NEEDS
            elif hasattr(method, "STAGE1"):
                teacher = method.NET_NEEDS
            rows.append((name, preset, net, method.NET_NEEDS, len(values.get("ema", (0.999,))), teacher))
    return rows


SHAPES = {"ddpmpp": (3, 32, 32), "adm": (3, 64, 64), "dit": (4, 32, 32), "edm2": (3, 64, 64)}  # DiT: SD-VAE latents


def label_dim(net_name):
    return 0 if net_name == "ddpmpp" else 1000  # CIFAR-10 unconditional, ImageNet class-conditional


def count(net_name, needs):
    shape = next(s for prefix, s in SHAPES.items() if net_name.startswith(prefix))
    with torch.device("meta"):
        net = nets.build_net(net_name, shape, label_dim=label_dim(net_name), **needs)
    return sum(p.numel() for p in net.parameters())


def per_rank(P, n_ema, P_teacher, world, sharded):
    div = world if sharded else 1
    return dict(weights=4 * P / div, grads=4 * P / div, optimizer=8 * P / div, emas=4 * P * n_ema / div,
                teacher=4 * P_teacher)


def table(world):
    print(f"Per-rank training state (fp32 weights, gradients, Adam moments, EMAs, teacher), GB; FSDP at {world} "
          "ranks\n")
    print("| method | preset | net | params | EMAs | teacher | DDP | FSDP | FSDP / DDP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, preset, net, needs, n_ema, teacher in preset_nets():
        P = count(net, needs)
        P_t = count(net, teacher) if teacher is not None else 0
        ddp, fsdp = (sum(per_rank(P, n_ema, P_t, world, s).values()) / GB for s in (False, True))
        print(f"| {method} | {preset} | {net} | {P / 1e6:.1f}M | {n_ema} | {'yes' if teacher is not None else '-'} | "
              f"{ddp:.2f} | {fsdp:.2f} | {fsdp / ddp:.2f} |")


def measure(spec):
    import copy

    import torch.distributed as dist

    import parallel
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    name, preset = spec.split(":")
    row = next(r for r in preset_nets() if r[:2] == (name, preset))
    _, _, net_name, needs, n_ema, teacher_needs = row
    shape = next(s for prefix, s in SHAPES.items() if net_name.startswith(prefix))
    net = nets.build_net(net_name, shape, label_dim=label_dim(net_name), **needs)
    emas = [copy.deepcopy(net).requires_grad_(False) for _ in range(n_ema)]
    teacher = None
    if teacher_needs is not None:
        teacher = nets.build_net(net_name, shape, label_dim=label_dim(net_name), **teacher_needs)
    for module in (net, *emas):
        parallel.shard(module, torch.device("cpu"), world, bf16=False)
    opt = torch.optim.Adam(net.parameters(), fused=True)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    held = parallel.rank_bytes(net, opt, emas, teacher)
    P = sum(parallel.full(p).numel() for p in net.parameters())
    P_t = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    want = per_rank(P, n_ema, P_t, world, sharded=True)
    if rank == 0:
        print(f"{spec}: {net_name} {P / 1e6:.1f}M params, {n_ema} EMAs, teacher {P_t / 1e6:.1f}M; rank 0 of {world}, "
              "MB")
        print("| part | measured | formula | ratio |")
        print("|---|---|---|---|")
        for k in want:
            print(f"| {k} | {held[k] / 1e6:.1f} | {want[k] / 1e6:.1f} | {held[k] / max(want[k], 1):.4f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--measure", metavar="METHOD:PRESET")
    args = parser.parse_args()
    measure(args.measure) if args.measure else table(args.ranks)
