"""Correctness checks that need a GPU (CPU tests cover the rest). Prints one line per check and a JSON summary.

    python benchmarks/gpu_check.py [--out results.json]

For each net at its reference data shape (batch 4, fp32 with TF32 off):
- fused tangents vs torch.func.jvp (relative error of the JVP) and the fused primal vs a plain forward;
- with dropout on: the fused pass, a plain forward and torch.func.jvp under the same seed see the same mask on CUDA
  (the CPU case: tests/test_meanflow.py, test_masks_shared_across_precisions_under_bf16; a mismatch shows as a
  large primal difference);
- under bf16 autocast: the fused primal and JVP relative to fp32 (the JVP runs in fp32 by design, so its error comes
  from the bf16 primal activations only);
- a bf16 training step of every method on a tiny UNet: finite loss and gradients.
Not a test: the tolerances printed are what a user should expect, and the script never fails on them.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nets  # noqa: E402

SHAPES = {"ddpmpp": (3, 32, 32), "adm": (3, 64, 64), "edm2-s": (3, 64, 64), "dit-b2": (4, 32, 32)}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_net(name, shape, device):
    res = {}
    label_dim = 10 if name == "ddpmpp" else 1000
    torch.manual_seed(0)
    net = nets.build_net(name, shape, label_dim=label_dim, use_r=True, dropout=0.1)
    with torch.no_grad():  # O(1) random weights: fresh nets have zero or 1e-5-scaled output layers (vacuous checks)
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    net = net.to(device)
    B = 4
    x = torch.randn(B, *shape, device=device)
    t = torch.rand(B, device=device) * 0.9 + 0.05
    r = t * torch.rand(B, device=device)
    y = torch.nn.functional.one_hot(torch.randint(label_dim, (B,), device=device), label_dim).float()
    dx, dt, dr = torch.randn_like(x), torch.ones_like(t), torch.zeros_like(r)

    ref = {}
    for mode in ("train", "eval"):
        net.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)
            out, d_out = net(x, t, r, y, tangents=(dx, dt, dr))
            torch.manual_seed(1)
            plain = net(x, t, r, y)
            torch.manual_seed(1)
            p_ref, d_ref = torch.func.jvp(lambda x_, t_, r_: net(x_, t_, r_, y), (x, t, r), (dx, dt, dr))
        res[f"{mode}_fused_vs_plain_primal"] = rel(out, plain)
        res[f"{mode}_jvp_vs_plain_primal"] = rel(p_ref, plain)
        res[f"{mode}_fused_vs_func_jvp_tangent"] = rel(d_out, d_ref)
        ref = dict(out=out, d_out=d_out)  # eval mode last: the fp32 reference for bf16
        res[f"{mode}_output_rms"], res[f"{mode}_tangent_rms"] = float(out.square().mean().sqrt()), float(d_out.square().mean().sqrt())

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out16, d16 = net(x, t, r, y, tangents=(dx, dt, dr))
    res["bf16_primal_rel_err"] = rel(out16.float(), ref["out"])
    res["bf16_tangent_rel_err"] = rel(d16, ref["d_out"])
    res["bf16_primal_dtype"], res["bf16_tangent_dtype"] = str(out16.dtype), str(d16.dtype)
    return res


def method_steps(device):
    """One bf16 training step per method on a tiny conditional UNet: loss and gradients finite."""
    import cm
    import diffusion
    import meanflow
    import scm
    import tcm
    res = {}
    shape = (3, 32, 32)
    for mname, module in dict(diffusion=diffusion, cm=cm, tcm=tcm, scm=scm, meanflow=meanflow).items():
        torch.manual_seed(0)
        net = nets.build_net("ddpmpp-tiny", shape, label_dim=10, dropout=0.1, **module.NET_NEEDS).to(device)
        teacher = None
        if module is tcm:
            teacher = nets.build_net("ddpmpp-tiny", shape, label_dim=10, dropout=0.1, **module.NET_NEEDS).to(device)
            teacher.requires_grad_(False)
        x = torch.randn(8, *shape, device=device).clamp(-1, 1)
        y = torch.nn.functional.one_hot(torch.randint(10, (8,), device=device), 10).float()
        gen = torch.Generator(device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            per_example, _ = module.loss(net, x, y, module.Config(), 1, gen, teacher=teacher, images=0)
        per_example.mean().backward()
        finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        res[mname] = dict(loss=float(per_example.mean().detach()), grads_finite=bool(finite))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--nets", default=",".join(SHAPES))
    p.add_argument("--device", default="cuda", help="cpu only to dry-run the script")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    summary = dict(torch=torch.__version__, nets={},
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    for name in args.nets.split(","):
        if name not in nets.NETS:
            print(f"{name}: not in nets.NETS, skipped")
            continue
        try:
            summary["nets"][name] = check_net(name, SHAPES.get(name, (3, 32, 32)), device)
        except Exception as e:  # report and go on: one failing net must not hide the others
            summary["nets"][name] = dict(error=f"{type(e).__name__}: {e}")
        print(name, json.dumps(summary["nets"][name]), flush=True)
    summary["bf16_method_steps"] = method_steps(device)
    print("bf16 steps", json.dumps(summary["bf16_method_steps"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
