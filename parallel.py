"""Data parallelism for train.py: DDP (every rank holds the whole net) or FSDP (`--fsdp`, FSDP2's `fully_shard`).

Under FSDP each rank holds 1/world of every parameter of the online net, of its gradients, of Adam's two moments and
of every EMA; a block's weights are all-gathered for its forward and backward and freed after, and gradients are
reduce-scattered, so every rank ends a step with the shard of the same update DDP would make. What stays whole on each
rank: buffers, the frozen teacher (and TCM's stage-1 net), and the micro-batch's activations.

Everything the run writes is in the one-process format: a checkpoint holds full state_dicts gathered tensor by tensor
(a collective; rank 0 keeps them, on the CPU), so a run moves between one process, DDP and FSDP with --resume, and
fid.py / convert.py read it unchanged. Samples and FID run on a full copy of the EMA gathered the same way.
"""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import nets

BLOCKS = (nets.UNetBlock, nets.MLPBlock, nets.EDM2Block, nets.DiTBlock)  # each its own FSDP unit


def shard(module, device, world, bf16):
    """FSDP2 on every residual block and on the root (which holds the rest: embeddings, stems, heads). With bf16 the
    weights are gathered in bf16 and gradients reduced in fp32; the inputs are not cast (times and step sizes stay fp32,
    autocast still picks each op's precision). fully_shard cannot cut a 0-d parameter (EDM2's gains), so each becomes a
    1-element vector first (the same values under broadcasting); the gathered state_dicts give them back their shape."""
    # The method files never write into a net's output in place, the case FSDP2 warns about when a net returns a view.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    module.scalar_params = []
    for prefix, m in module.named_modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.ndim == 0:
                m.register_parameter(name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                module.scalar_params.append(f"{prefix}.{name}" if prefix else name)
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    for m in module.modules():
        if isinstance(m, BLOCKS) and m is not module:
            fully_shard(m, mesh=mesh, mp_policy=policy)
    return fully_shard(module, mesh=mesh, mp_policy=policy)


def local(t):
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """The whole tensor; for a DTensor an all-gather, so every rank must call it, in the same order."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(module, keep):
    """module.state_dict() with every tensor whole, on the CPU, where `keep` (rank 0); None elsewhere. Collective."""
    state = {k: full(v) for k, v in module.state_dict().items()}
    scalars = getattr(module, "scalar_params", ())
    return {k: (v.reshape(()) if k in scalars else v).cpu() for k, v in state.items()} if keep else None


def full_optimizer_state(opt, net, keep):
    """opt.state_dict() (of an optimizer over net.parameters()) in the one-process layout: states by parameter index,
    moments whole and shaped as the parameters were before `shard`. Collective."""
    state = opt.state_dict()
    per_param = {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}
    if not keep:
        return None
    scalars = [i for i, (name, _) in enumerate(net.named_parameters()) if name in net.scalar_params]
    return dict(state={i: {k: (v.reshape(()) if i in scalars and k != "step" else v).cpu() for k, v in s.items()}
                       for i, s in per_param.items()}, param_groups=state["param_groups"])


def shard_optimizer_state(opt, state):
    """A one-process optimizer state_dict with each moment cut to this rank's shard of its parameter: what
    opt.load_state_dict needs when the parameters are DTensors."""
    params = [p for group in opt.param_groups for p in group["params"]]
    per_param = {}
    for i, s in state["state"].items():
        p = params[i]
        per_param[i] = {k: distribute_tensor(v.to(p.device).reshape(p.shape), p.device_mesh, p.placements)
                        if isinstance(p, DTensor) and k != "step" else v for k, v in s.items()}
    return dict(state=per_param, param_groups=state["param_groups"])


def states(net, emas, opt, sharded, keep):
    """The state_dicts a checkpoint holds (net, ema: a list, opt unless None) in the one-process layout: as they are, or
    under FSDP gathered whole (collective; rank 0 keeps them, the others get None)."""
    if not sharded:
        return dict(net=net.state_dict(), ema=[e.state_dict() for e in emas],
                    opt=None if opt is None else opt.state_dict())
    out = dict(net=full_state(net, keep), ema=[full_state(e, keep) for e in emas],
               opt=None if opt is None else full_optimizer_state(opt, net, keep))
    return out if keep else None


def count_nonfinite(grads):
    """Non-finite entries of the gradients, summed over ranks where they are shards."""
    bad = sum((~torch.isfinite(local(g))).sum() for g in grads)
    if isinstance(grads[0], DTensor):
        dist.all_reduce(bad)
    return int(bad)


def all_finite(modules, sharded):
    """Every floating tensor of every module finite, on every rank's part (the same answer on all ranks)."""
    ok = all(bool(torch.isfinite(local(t)).all()) for m in modules for t in m.state_dict().values()
             if t.is_floating_point())
    if not sharded:
        return ok
    flag = torch.tensor(float(ok), device=next(modules[0].parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def rank_bytes(net, opt, emas, teacher=None):
    """Bytes this rank holds of the online net's weights, its gradients, the optimizer state, the EMAs and the
    teacher."""
    size = lambda tensors: sum(local(t).numel() * local(t).element_size() for t in tensors)
    moments = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return dict(weights=size(net.parameters()), grads=size(p.grad for p in net.parameters() if p.grad is not None),
                optimizer=size(moments), emas=sum(size(e.parameters()) for e in emas),
                teacher=size(teacher.parameters()) if teacher is not None else 0)


def check_ranks_identical(net, world, opt=None):
    """Per-tensor sums and sums of squares, all-gathered and compared bitwise. Under DDP the whole net: ranks whose
    gradients were not synchronised would have drifted apart. Under FSDP each rank owns a different shard, so what is
    compared is what every rank holds whole: the buffers and any parameter left unsharded, and the optimizer's step
    counts (a rank that skipped or repeated a step)."""
    tensors = [t for t in net.state_dict().values() if not isinstance(t, DTensor)]
    if opt is not None:
        tensors += [s["step"] for s in opt.state.values() if "step" in s]
    device = next(net.parameters()).device
    sums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]).to(device)
                        for t in tensors]) if tensors else torch.zeros(0, 2, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("ranks ended with different weights: gradients were not synchronised")
    if dist.get_rank() == 0:
        print(f"weights identical on all {world} ranks" if opt is None else
              f"replicated state identical on all {world} ranks ({len(tensors)} tensors; the weights are sharded)")
