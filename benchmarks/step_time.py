"""Training-step time of every method against the plain diffusion step, same net, batch and precision.

    python benchmarks/step_time.py                                   # DDPM++ CIFAR-10 config, batch 128 on CUDA
    python benchmarks/step_time.py --precision bf16
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 4 --iters 3 --warmup 1
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 4 --iters 5 --memory --baseline HEAD  # and HEAD's
    python benchmarks/step_time.py --device cpu --net mlp --data-shape 2 --batch 256 --iters 30 --threads 1
    python benchmarks/step_time.py --device cpu --net ddpmpp --batch 1 --iters 0 --warmup 0 --memory  # saved bytes, FLOPs

Each step is forward + backward + Adam (fused as in train.py, or --adam loop) on random data. "plain" is diffusion.py's
EDM step; MeanFlow adds a second time input r to the net and sCM a log-variance head (both negligible in size). CD's
and sCD's teacher is a second copy of the net in eval mode, TCM's stage-1 net one in train mode. CM is measured at its
first ECT stage. Shortcut models and flow maps (`flowmap-lsd`, `-esd` with a tangent option, `-psd`) run with their
Config's defaults (the batch split into flow-matching and self-consistency / off-diagonal rows as in training). Variants
that need the same kind of net share one copy (and its optimizer): the timings do not depend
on the weights. The steps are interleaved, one step of each variant per round, so that a change in the machine's load
hits all of them alike. Prints the median ms per step, the ratio to the plain step of the same code measured in the
same run and, on CUDA, the peak memory of the whole run. Not a test: the numbers depend on the machine.

--baseline REV adds every variant as the code of a git revision (`git show REV:cm.py` and the other method files and
nets.py, loaded as separate modules), named variant@REV, so before and after are timed in one run, interleaved.

One more, untimed step per variant counts the forward passes of its nets, in batch-equivalents (a pass over some rows
counts its share): with grad (each followed by its backward), without grad, and tangent passes (a fused tangent, or
torch.func.jvp's, which also counts as a forward: no-grad, or with grad where the loss differentiates through it, as
flow maps' LSD / ESD do with `jvp`). "floor" is the step cost those passes imply in units of the
plain step, taking a no-grad forward or a tangent as 1/3 of a forward + backward: grad + (no-grad + tangent) / 3.
--memory adds two device-independent costs of that step:
- saved MiB: the bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`), each storage counted
  once and the net's own parameters and buffers left out. This is the activation memory of the step, the part of peak
  training memory that grows with the batch.
- GFLOP: floating-point operations of the step's forward + backward as `torch.utils.flop_counter` counts them
  (matmuls, convolutions and attention; elementwise ops are not counted).
"""
import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cm  # noqa: E402
import diffusion  # noqa: E402
import flowmap  # noqa: E402
import meanflow  # noqa: E402
import nets  # noqa: E402
import scm  # noqa: E402
import shortcut  # noqa: E402
import tcm  # noqa: E402

VARIANTS = (["plain", "ct", "cd", "tcm"] + [f"{m}:{t}" for m in ("meanflow", "sct", "scd") for t in ("jvp", "fused", "fd")]
            + ["shortcut"] + [f"flowmap-{k}:{t}" for k in ("lsd", "esd") for t in ("jvp", "fused", "fd")] + ["flowmap-psd"])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"nets": nets, "plain": diffusion, "ct": cm, "cd": cm, "tcm": tcm, "meanflow": meanflow, "sct": scm,
           "scd": scm, "shortcut": shortcut, **{f"flowmap-{k}": flowmap for k in ("lsd", "esd", "psd")}}


@functools.lru_cache(maxsize=None)
def load_revision(rev):
    """MODULES as the files were at git revision `rev`: each file executed as a module "<name>@<rev>" whose own
    project imports (tcm's `import cm`) resolve to the same revision. For before -> after timings in one process."""
    loaded = {}
    outer = {name: sys.modules.get(name) for name in ("nets", "diffusion", "cm", "tcm", "scm", "meanflow", "shortcut",
                                                      "flowmap")}
    try:
        for name in outer:  # an order in which every file's project imports come first
            shown = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=ROOT, capture_output=True, text=True)
            if shown.returncode:  # a method added after that revision: its variants cannot run @rev
                continue
            src = shown.stdout
            module = types.ModuleType(f"{name}@{rev}")
            module.__file__ = f"{rev}:{name}.py"
            sys.modules[module.__name__] = sys.modules[name] = module
            exec(compile(src, module.__file__, "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for name, module in outer.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return {key: loaded[m.__name__] for key, m in MODULES.items() if m.__name__ in loaded}


def setup(variant, args, shape, device, shared=None):
    """(net, loss function of (x, gen), teacher or None) for a variant: "name[:tangent][@rev]", where @rev runs the code
    of a git revision (load_revision). shared: a dict through which variants of one run reuse nets of the same kind
    (timings do not depend on the weights; one copy per kind keeps a full-size run in memory)."""
    torch.manual_seed(0)
    variant, _, rev = variant.partition("@")
    name, _, tangent = variant.partition(":")
    modules = load_revision(rev) if rev else MODULES
    module, build_net = modules[name], modules["nets"].build_net
    shared = {} if shared is None else shared

    def cached(key, build):
        if key not in shared:
            shared[key] = build()
        return shared[key]
    kind = tuple(sorted(module.NET_NEEDS.items()))
    net = cached((rev, "net", kind), lambda: build_net(args.net, shape, dropout=args.dropout, **module.NET_NEEDS)
                 .to(device).train())
    teacher = None
    if name in ("scd", "cd"):  # a frozen diffusion teacher in eval mode
        teacher = cached((rev, "teacher"), lambda: build_net(args.net, shape).to(device).eval().requires_grad_(False))
    if name == "tcm":  # the frozen stage-1 copy runs in train mode (dropout on)
        teacher = cached((rev, "stage1"), lambda: build_net(args.net, shape, dropout=args.dropout).to(device).train()
                         .requires_grad_(False))
    options = dict(tangent=tangent) if tangent else {}
    if name.startswith("flowmap-"):  # flowmap-lsd / -esd / -psd: the off-diagonal loss
        options["loss_kind"] = name.partition("-")[2]
    cfg = module.Config(**options)

    def step_loss(x, gen):
        return module.loss(net, x, None, cfg, 1, gen, teacher=teacher, images=0)[0]
    return net, step_loss, teacher


def count_passes(modules, batch):
    """Start counting the forward passes of `modules` in batch-equivalents (a pass over some rows counts its share):
    returns (counts, remove) with counts = dict(grad=, nograd=, tangent=). A pass inside torch.func (jvp) counts as a
    no-grad forward plus a tangent; a fused pass (tangents=) as its forward plus a tangent."""
    counts = dict(grad=0.0, nograd=0.0, tangent=0.0)

    def hook(module, args, kwargs):
        share = args[0].shape[0] / batch
        in_func = torch._C._functorch.get_dynamic_layer_stack_depth() > 0
        counts["grad" if torch.is_grad_enabled() else "nograd"] += share  # a jvp under grad (flowmap LSD) is a grad pass
        if in_func or kwargs.get("tangents") is not None:
            counts["tangent"] += share
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    return counts, lambda: [h.remove() for h in handles]


def saved_bytes_and_flops(step_loss, x, gen, modules):
    """(bytes autograd saves for backward, FLOPs of forward + backward) of one step. A storage saved by several ops
    counts once; storages of the modules' parameters and buffers are excluded (they are not activations)."""
    own = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    saved = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a torch.func wrapper (flowmap's differentiable jvp) has no storage: its own bytes
            key, size = id(t), t.numel() * t.element_size()
        if key not in own:
            saved[key] = size
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
    p.add_argument("--baseline", default="", metavar="REV",
                   help="also time every variant as the code of git revision REV (e.g. HEAD), beside the working tree")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.data_shape.split(","))
    x = torch.randn(args.batch, *shape, device=device).clamp(-1, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads) | net {args.net} | batch {args.batch} | {args.precision} | "
          f"dropout {args.dropout} | Adam {args.adam} | steps interleaved across variants")

    names = args.variants.split(",")
    variants = [v for name in names for v in ([f"{name}@{args.baseline}"] if args.baseline else []) + [name]]
    shared, runs, opts = {}, {}, {}
    for variant in variants:
        net, step_loss, teacher = setup(variant, args, shape, device, shared)
        if net not in opts:  # variants that share a net share its optimizer
            opts[net] = torch.optim.Adam(net.parameters(), lr=1e-5, fused=args.adam == "fused", foreach=False)
        modules = [m for m in (net, teacher) if m is not None]
        runs[variant] = dict(net=net, loss=step_loss, opt=opts[net], modules=modules, times=[],
                             gen=torch.Generator(device).manual_seed(0))

    def step(run):
        run["opt"].zero_grad(set_to_none=True)
        with autocast:
            per_example = run["loss"](x, run["gen"])
        per_example.mean().backward()
        run["opt"].step()

    for variant, run in runs.items():  # one untimed step each: passes, and with --memory saved bytes and FLOPs
        counts, remove = count_passes(run["modules"], args.batch)
        step(run)
        remove()
        run["passes"] = counts
        run["saved"], run["flops"] = float("nan"), float("nan")
        if args.memory:
            with autocast:
                run["saved"], run["flops"] = saved_bytes_and_flops(run["loss"], x, run["gen"], run["modules"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):  # round-robin, so that a change in machine load hits every variant
        for run in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                run["times"].append(time.perf_counter() - t0)
        so_far = " ".join(f"{v} {statistics.median(r['times']) * 1e3:.0f}" for v, r in runs.items() if r["times"])
        print(f"round {i + 1} of {args.warmup + args.iters}; median ms so far: {so_far}", file=sys.stderr, flush=True)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    if device.type == "cuda":
        print(f"peak GiB of the run: {mem:.2f}")
    print(f"{'step':<20}{'ms/step':>10}{'img/s':>9}{'x plain':>9}{'floor':>7}{'grad':>6}{'no-grad':>9}{'tangent':>9}"
          f"{'GFLOP':>9}{'saved MiB':>11}")
    for variant, run in runs.items():
        ms = statistics.median(run["times"]) * 1e3 if run["times"] else float("nan")  # --iters 0: no timing
        rev = variant.partition("@")[2]
        base = runs.get(f"plain@{rev}" if rev else "plain", runs.get("plain", {})).get("times")
        ratio = f"{ms / (statistics.median(base) * 1e3):.2f}" if base else "-"
        c = run["passes"]
        floor = c["grad"] + (c["nograd"] + c["tangent"]) / 3  # forward + backward = 1, a forward or a tangent = 1/3
        print(f"{variant:<20}{ms:>10.1f}{args.batch / ms * 1e3:>9.1f}{ratio:>9}{floor:>7.2f}{c['grad']:>6.2f}"
              f"{c['nograd']:>9.2f}{c['tangent']:>9.2f}{run['flops'] / 1e9:>9.2f}{run['saved'] / 2**20:>11.1f}")


if __name__ == "__main__":
    main()
