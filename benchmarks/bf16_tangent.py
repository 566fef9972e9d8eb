"""How far the `fused` tangent under bf16 autocast is from the fp32 JVP, for sCD on a full-size net (the imagenet64-scd
preset: ADM at 3x64x64, 1000 classes). Prints one line per noise level and a summary; CPU at batch 1 is enough.

    python benchmarks/bf16_tangent.py [--net adm] [--sigmas 0.05,0.5,2,10,80] [--seed 0]

Reference: `tangent="jvp"` under bf16 autocast (the JVP pass runs in fp32, scm.py's F_and_dF, as FastGen 34f30e8's
sCD ImageNet-64 recipe sets it: `precision_amp_jvp` in `fastgen/configs/experiments/EDM/config_scd_in64.py`). Compared:
- `fused` under bf16: fp32 tangent arithmetic linearised around the bf16 primal activations;
- `fused` in fp32 (should agree with the reference to fp32 rounding: a check of the measurement itself);
- the bf16 primal F against the fp32 primal (the rounding every bf16 training step has anyway).
Errors are relative L2 over the sample, of dF (the tangent) and of g (the normalised training direction of sCM).
Weights: the net's own initialisation with every all-zero tensor (output layers, zero-init convs) refilled with
N(0, 1/fan_in), so that F and dF are not trivially zero.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nets  # noqa: E402
import scm  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="adm")
    p.add_argument("--shape", default="3,64,64")
    p.add_argument("--label-dim", type=int, default=1000)
    p.add_argument("--sigmas", default="0.05,0.5,2,10,80")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(args.seed)
    net = nets.build_net(args.net, shape, label_dim=args.label_dim, logvar=True, dropout=0.0)
    with torch.no_grad():
        for q in net.parameters():
            if q.ndim > 1 and not q.any():
                q.copy_(torch.randn_like(q) * q[0].numel() ** -0.5)
    net.train()
    print(f"{args.net} {shape}: {sum(q.numel() for q in net.parameters()) / 1e6:.1f}M params, batch 1, CPU, "
          f"torch {torch.__version__}")
    gen = torch.Generator().manual_seed(args.seed)
    x = 0.5 * torch.randn((1, *shape), generator=gen)
    y = torch.nn.functional.one_hot(torch.tensor([7]), args.label_dim).float() if args.label_dim else None
    worst = dict(dF=0.0, g=0.0, F=0.0)
    for s in [float(v) for v in args.sigmas.split(",")]:
        sigma = torch.tensor([s], dtype=torch.float64)
        t = torch.atan2(sigma, torch.full_like(sigma, 0.5))
        z = 0.5 * torch.randn(x.shape, generator=gen)
        x_t = scm.bcast(t.cos(), x) * x + scm.bcast(t.sin(), x) * z
        dxdt = 0.5 * torch.randn(x.shape, generator=gen)  # a teacher velocity of data scale
        out = {}
        for name, tangent, bf16 in (("ref", "jvp", True), ("fused_bf16", "fused", True), ("fused_fp32", "fused", False)):
            cfg = scm.Config(tangent=tangent, tangent_warmup=0)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                F, dF, _ = scm.F_and_dF(net, x, z, x_t, t, y, dxdt, cfg, distill=True)
            with torch.no_grad():
                F_fp32 = scm.trig_F(net, x_t, t, y, 0.5)
            g = scm.tangent_g(F_fp32, dF, x_t, t, dxdt, cfg, 1)  # same F in g: only the tangent differs
            out[name] = (F, dF, g)
        F_bf16, F_fp32 = out["ref"][0], out["fused_fp32"][0]
        e = dict(dF=rel(out["fused_bf16"][1], out["ref"][1]), g=rel(out["fused_bf16"][2], out["ref"][2]),
                 F=rel(F_bf16, F_fp32))
        check = rel(out["fused_fp32"][1], out["ref"][1])
        worst = {k: max(worst[k], e[k]) for k in worst}
        print(f"sigma {s:7.3f}: fused-bf16 vs fp32 JVP: dF {100 * e['dF']:6.2f} %  g {100 * e['g']:6.2f} %  | "
              f"bf16 primal F vs fp32 {100 * e['F']:5.2f} %  | fused-fp32 vs JVP {check:.1e}")
    print(f"worst: dF {100 * worst['dF']:.2f} %, g {100 * worst['g']:.2f} %, bf16 primal {100 * worst['F']:.2f} %")


if __name__ == "__main__":
    main()
