"""Run by tests/test_fsdp.py as `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT.json [CASE ...]` (gloo, CPU):
each case trains STEPS Adam steps of one method's loss under FSDP (parallel.shard: every block and the root, float64)
and, on every rank, the one-process reference: the same global batch as two accumulation rounds with the same seeds.
Rank 0 writes, per case, the largest relative differences of the per-micro-batch losses (per step) and of the final
weights, and the per-rank bytes of weights, gradients and Adam state sharded and whole. Cases named *-bf16 run in
fp32 under autocast, the sharded net with the bf16 mixed-precision policy."""
import copy
import importlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nets  # noqa: E402
import parallel  # noqa: E402

STEPS, B = 2, 8  # optimizer steps; global batch (4 rows per rank)
POINTS, IMAGES = (2,), (3, 8, 8)

# name: (method, net, data shape, Config overrides, teacher: None | "diffusion" | "stage1", label_dim); the point cases
# mix the toy presets' nets (with Fourier features) and the plain MLP
CASES = {
    "diffusion": ("diffusion", "mlp-fourier", POINTS, {}, None, 0),
    "ct": ("cm", "mlp", POINTS, {}, None, 0),
    "cd": ("cm", "mlp", POINTS, dict(batch_target=False), "diffusion", 0),
    "sct-fused": ("scm", "mlp-fourier", POINTS, dict(tangent="fused"), None, 0),
    "sct-fd": ("scm", "mlp", POINTS, dict(tangent="fd"), None, 0),
    "scd-fused": ("scm", "mlp", POINTS, dict(tangent="fused", batch_target=False), "diffusion", 0),
    "tcm": ("tcm", "ddpmpp-tiny", IMAGES, {}, "stage1", 0),
    "meanflow-fused": ("meanflow", "mlp-small-fourier", POINTS, dict(tangent="fused"), None, 0),
    "meanflow-fd": ("meanflow", "mlp", POINTS, dict(tangent="fd"), None, 0),
    "shortcut": ("shortcut", "mlp", POINTS, dict(cfg_scale=2.0, label_dropout=0.2), None, 4),
    "flowmap-lsd-fused": ("flowmap", "mlp-small-fourier", POINTS, dict(loss_kind="lsd", tangent="fused"), None, 0),
    "flowmap-esd-fd": ("flowmap", "mlp", POINTS, dict(loss_kind="esd", tangent="fd"), None, 0),
    "flowmap-psd": ("flowmap", "mlp", POINTS, dict(loss_kind="psd"), None, 0),
    "meanflow-edm2": ("meanflow", "edm2-tiny", (4, 8, 8), dict(tangent="fused"), None, 0),
    "sct-dit": ("scm", "dit-tiny", (4, 8, 8), dict(tangent="fused"), None, 0),
    # --precision bf16: weights gathered in bf16 (the mixed-precision policy), fp32 reference under autocast only
    "sct-fused-bf16": ("scm", "ddpmpp-tiny", IMAGES, dict(tangent="fused"), None, 0),
    "meanflow-edm2-bf16": ("meanflow", "edm2-tiny", (4, 8, 8), dict(tangent="fused"), None, 0),
    "sct-dit-bf16": ("scm", "dit-tiny", (4, 8, 8), dict(tangent="fused"), None, 0),
}


def seeds(step, m):
    return 1000 * step + 10 * m


def batch(shape, label_dim, step, dtype):
    g = torch.Generator().manual_seed(seeds(step, 99))
    x = torch.randn((B, *shape), generator=g, dtype=dtype)
    y = None
    if label_dim:
        y = torch.nn.functional.one_hot(torch.randint(label_dim, (B,), generator=g), label_dim).to(dtype)
    return x, y


def micro_step(method, cfg, net, teacher, x, y, step, m, scale):
    """One micro-batch's loss and backward, its draws seeded by (step, m) only; returns its mean loss."""
    torch.manual_seed(seeds(step, m))  # dropout masks
    gen = torch.Generator().manual_seed(seeds(step, m) + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.float32):
        per_example, _ = method.loss(net, x, y, cfg, step, gen, teacher=teacher, images=(step - 1) * B)
    (per_example.mean() * scale).backward()
    return float(per_example.mean())


def run_case(name, rank, world):
    method_name, net_name, shape, overrides, teacher_kind, label_dim = CASES[name]
    bf16 = name.endswith("-bf16")
    dtype = torch.float32 if bf16 else torch.float64
    method = importlib.import_module(method_name)
    cfg = method.Config.from_preset("toy", **overrides)
    torch.manual_seed(0)
    net = nets.build_net(net_name, shape, label_dim=label_dim, dropout=0.1, **method.NET_NEEDS).to(dtype)
    teacher = None
    if teacher_kind == "diffusion":
        teacher = nets.build_net(net_name, shape, label_dim=label_dim).to(dtype).eval().requires_grad_(False)
    elif teacher_kind == "stage1":
        teacher = copy.deepcopy(net).requires_grad_(False)  # train mode: tcm's stage-1 net keeps dropout on
    ref = copy.deepcopy(net)
    start = [p.detach().clone() for p in ref.parameters()]
    parallel.shard(net, torch.device("cpu"), world, bf16=bf16)
    opt, ref_opt = (torch.optim.Adam(n.parameters(), lr=1e-3, fused=True) for n in (net, ref))
    loss_errs = []
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        x, y = batch(shape, label_dim, step, dtype)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        mine = micro_step(method, cfg, net, teacher, x[rows], None if y is None else y[rows], step, rank, 1.0)
        ref_losses = [micro_step(method, cfg, ref, teacher, x[m * B // world:(m + 1) * B // world],
                                 None if y is None else y[m * B // world:(m + 1) * B // world], step, m, 1 / world)
                      for m in range(world)]
        loss_errs.append(abs(mine - ref_losses[rank]) / abs(ref_losses[rank]))
        for o, n in ((opt, net), (ref_opt, ref)):
            o.step()
            if hasattr(n, "normalize_weights_"):
                n.normalize_weights_()
    held, whole = parallel.rank_bytes(net, opt, []), parallel.rank_bytes(ref, ref_opt, [])
    gathered = parallel.states(net, [], opt, sharded=True, keep=True)  # what a checkpoint holds
    state_err = max(float((gathered["net"][k] - v).abs().max()) if gathered["net"][k].shape == v.shape else math.inf
                    for k, v in ref.state_dict().items())
    # the reference's optimizer state loaded into the shards and gathered back: the one-process layout both ways
    opt.load_state_dict(parallel.shard_optimizer_state(opt, ref_opt.state_dict()))
    back, want = parallel.full_optimizer_state(opt, net, keep=True)["state"], ref_opt.state_dict()["state"]
    opt_round_trip = all(torch.equal(back[i][k], v) for i in want for k, v in want[i].items())
    weight_err = max(float((parallel.full(p) - q).abs().max() / q.abs().max().clamp_min(1e-30))
                     for p, q in zip(net.parameters(), ref.parameters()))
    moved = max(float((q - q0).abs().max()) for q, q0 in zip(ref.parameters(), start))
    errs = torch.tensor([*loss_errs, weight_err], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)  # the largest over ranks
    return dict(loss_rel_err=errs[:-1].tolist(), weight_rel_err=float(errs[-1]), losses=ref_losses, moved=moved,
                state_err=state_err, opt_round_trip=opt_round_trip,
                rank_bytes={k: held[k] for k in ("weights", "grads", "optimizer")},
                whole_bytes={k: whole[k] for k in ("weights", "grads", "optimizer")})


def final_check(rank, world):
    """parallel.check_ranks_identical on a sharded EDM2 net after one Adam step: as is, with a buffer changed on rank 1,
    and with rank 1's step count off by one."""
    torch.manual_seed(0)
    net = nets.build_net("edm2-tiny", (4, 8, 8), use_r=True).double()
    parallel.shard(net, torch.device("cpu"), world, bf16=False)
    opt = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    buffer = next(b for b in net.buffers() if b.is_floating_point())
    outcome = {}
    for case in ("same", "buffer", "step"):
        if rank == 1 and case == "buffer":
            buffer.add_(1)
        if rank == 1 and case == "step":
            buffer.sub_(1)
            next(iter(opt.state.values()))["step"] += 1
        try:
            parallel.check_ranks_identical(net, world, opt)
            outcome[case] = "passed"
        except RuntimeError:
            outcome[case] = "raised"
    return outcome


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sys.argv[2:] or list(CASES)
    results = {}
    for name in names:
        results[name] = run_case(name, rank, world)
    results["check"] = final_check(rank, world)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As cli.run_main: leave through os._exit, since interpreter teardown can destroy the Gloo group's threads
    # unjoined and abort a rank ("terminate called without an active exception") after the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
