"""shortcut.py next to your own network: a shortcut model on 2-D points, from scratch, sampled in 1 and in 8 steps.

Shows the shortest honest use of shortcut.py with a hand-written network u = net(z, t, r, y), r = t - d the end of a
step of size d: `shortcut.loss(...)` per example (flow-matching rows at d = 0 and self-consistency rows, two half
steps of the current net as the target of one full step, in one batch), `.mean().backward()`, an EMA, and
`shortcut.sample(..., steps=N)` (N Euler steps of size 1/N, N a power of two). Settings: `Config.from_preset("toy")`,
the official code's batch layout with meanflow.py's toy recipe and the batch target. No JVP, no teacher, no init.
Data: 8 Gaussians on a ring, standardised to unit variance per axis. Prints the ratio of the samples' sliced W2 to
fresh data over a moment-matched Gaussian's (benchmarks/toy_suite.py's score: 0 = perfect, 1 = a blob) for 1 and 8
steps.

    python -m examples.shortcut_2d             # from the repository root
    python shortcut_2d.py --smoke              # next to shortcut.py: a smoke run

Measured (seed 0, one thread of a 2-core AMD EPYC shared with other jobs): ratio 0.192 in 1 step, 0.142 in 8 steps,
each the mean of 4 draws of 4096 samples; 235 s of CPU time (900 s wall-clock on the loaded machine).

Needs shortcut.py next to it.
"""
import argparse
import copy
import math
import time

import torch
from torch import nn

import shortcut

# --- Your network: u = net(z, t, r, y), t and r (B,) in [0, 1], the call shortcut.py's banner documents -------------


# Copied from meanflow_2d.py: MLP
class MLP(nn.Module):
    """Residual MLP on 2-D points with sinusoidal embeddings of t and r, concatenated."""

    def __init__(self, dim=2, width=128, depth=4, emb_dim=64):
        super().__init__()
        self.register_buffer("freqs", 10000.0 ** -torch.linspace(0, 1, emb_dim // 2))
        self.emb = nn.Sequential(nn.Linear(2 * emb_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.fc_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(affine=nn.Linear(width, width), fc0=nn.Linear(width, width),
                                                       fc1=nn.Linear(width, width))) for _ in range(depth))
        self.fc_out = nn.Linear(width, dim)

    def forward(self, z, t, r, y=None):
        arg_t, arg_r = t[:, None] * self.freqs, r[:, None] * self.freqs  # (B, emb_dim / 2) each
        emb = self.emb(torch.cat([arg_t.cos(), arg_t.sin(), arg_r.cos(), arg_r.sin()], dim=1))
        h = self.fc_in(z)
        for b in self.blocks:
            h = h + b.fc1(nn.functional.silu(b.fc0(nn.functional.silu(h + b.affine(emb)))))
        return self.fc_out(nn.functional.silu(h))

# --- Data and score ------------------------------------------------------------------------------------------------


# Copied from diffusion_2d.py: ring_of_gaussians
def ring_of_gaussians(n, gen):
    """n points (n, 2) of 8 Gaussians (std 0.1) on the unit circle."""
    angle = torch.randint(8, (n,), generator=gen) * (2 * math.pi / 8)
    return torch.stack([angle.cos(), angle.sin()], dim=1) + 0.1 * torch.randn(n, 2, generator=gen)


# Copied from diffusion_2d.py: sliced_w2
def sliced_w2(a, b, gen, n_proj=256):
    """Sliced 2-Wasserstein distance between two equal-size point sets (N, 2), float64."""
    d = torch.randn(2, n_proj, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=0)
    a_proj = (a.double() @ d).sort(dim=0).values  # (N, n_proj)
    b_proj = (b.double() @ d).sort(dim=0).values
    return (a_proj - b_proj).square().mean().sqrt().item()


# Copied from diffusion_2d.py: score
def score(samples, fresh, data, gen):
    """sliced W2(samples, fresh data) / sliced W2(moment-matched Gaussian, fresh data), as benchmarks/toy_suite.py."""
    L = torch.linalg.cholesky(data.T.cov())  # (2, 2)
    gauss = data.mean(0) + torch.randn(len(fresh), 2, generator=gen) @ L.T  # the data's mean and covariance
    return sliced_w2(samples, fresh, gen) / sliced_w2(gauss, fresh, gen)

# --- Training ------------------------------------------------------------------------------------------------------


# Copied from diffusion_2d.py: train
def train(net, loss, cfg, recipe, steps, data, gen, teacher=None):
    """Adam with the preset's batch, lr and linear warm-up on a method's loss (every method file has the same
    signature); returns an EMA of net (decay warmed up, as the toy presets')."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"], betas=recipe.get("betas", (0.9, 0.999)))
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (recipe["batch"],), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * min(1.0, step / recipe.get("lr_warmup", 1))
        # images: training images seen before this step (the ECT curriculum of cm.py; the other losses ignore it)
        per_example, logs = loss(net, x, None, cfg, step, gen, teacher=teacher, images=(step - 1) * len(x))
        opt.zero_grad()
        per_example.mean().backward()
        opt.step()
        beta = min(recipe["ema"][0], (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p_net, 1 - beta)
    return ema


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="10 steps per stage, one draw of 256 samples (tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    raw = ring_of_gaussians(20_000, gen)
    mean, std = raw.mean(0), raw.std(0)
    data = (raw - mean) / std  # unit variance per axis, as the toy preset's points

    cfg = shortcut.Config.from_preset("toy")  # half of the batch self-consistency rows, M = 128, the batch's E[v | z]
    recipe = shortcut.PRESETS["toy"]  # batch 1024, 5000 steps, Adam 2e-3, EMA 0.999
    ema = train(MLP(), shortcut.loss, cfg, recipe, 10 if args.smoke else recipe["steps"], data, gen)

    n, draws = (256, 1) if args.smoke else (4096, 4)
    for steps in (1, 8):
        ratios = []
        for _ in range(draws):
            fresh = (ring_of_gaussians(n, gen) - mean) / std
            with torch.no_grad():
                samples = shortcut.sample(ema, torch.randn(n, 2, generator=gen), cfg, steps=steps)  # from t = 1 to 0
            ratios.append(score(samples, fresh, data, gen))
        print(f"ratio {sum(ratios) / len(ratios):.3f} (mean of {len(ratios)} draws of {n} {steps}-step samples) "
              f"after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
