"""cm.py next to your own network: consistency distillation (CD, ECT curriculum) of a diffusion net on 2-D points.

Shows the shortest honest use of cm.py for distillation with a hand-written network: the script first trains a
diffusion net with diffusion.py, then distils it with `cm.loss(..., teacher=frozen_net, images=...)` (x_r from one Euler
step of the teacher's PF-ODE; the ECT curriculum counts training images seen), the student initialised from the teacher
(train.py: `--teacher RUN` does both), and draws one-step samples with `cm.sample`. Settings:
`Config.from_preset("toy-cd")`, for points with unit variance per axis (sigma_data 1, curriculum stages of 50 kimg,
ratio limit 0.99); the CIFAR-10 defaults (sigma_data 0.5, 6400 kimg per stage) do not fit such a run. Data: 8
Gaussians on a ring, standardised. Prints the ratio of the samples' sliced W2 to fresh data over a moment-matched
Gaussian's (benchmarks/toy_suite.py's score: 0 = perfect, 1 = a blob).

    python -m examples.cm_cd_2d                # from the repository root
    python cm_cd_2d.py --smoke                 # next to cm.py and diffusion.py: a smoke run

Measured (seed 0, one thread of a 2-core AMD EPYC shared with other jobs): ratio 0.203, the mean of 4 draws of 4096
samples; 105 s of CPU time, the diffusion teacher included (211 s wall-clock on the loaded machine).

Needs cm.py and diffusion.py next to it.
"""
import argparse
import copy
import math
import time

import torch
from torch import nn

import cm
import diffusion

# --- Your network: F = net(x_in, c_noise, y=None), the raw EDM net cm.py's banner documents -----------------------


# Copied from diffusion_2d.py: MLP
class MLP(nn.Module):
    """Residual MLP on 2-D points with a sinusoidal embedding of c_noise = ln(sigma) / 4."""

    def __init__(self, dim=2, width=128, depth=4, emb_dim=64):
        super().__init__()
        self.register_buffer("freqs", 10000.0 ** -torch.linspace(0, 1, emb_dim // 2))
        self.emb = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.fc_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(affine=nn.Linear(width, width), fc0=nn.Linear(width, width),
                                                       fc1=nn.Linear(width, width))) for _ in range(depth))
        self.fc_out = nn.Linear(width, dim)

    def forward(self, x_in, c_noise, y=None):
        arg = c_noise[:, None] * self.freqs  # (B, emb_dim / 2)
        emb = self.emb(torch.cat([arg.cos(), arg.sin()], dim=1))
        h = self.fc_in(x_in)
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
    data = (raw - mean) / std  # unit variance per axis: sigma_data = 1, as the toy presets

    # 1. The teacher: a diffusion net of the same architecture (train.py: --method diffusion).
    dif_cfg = diffusion.Config.from_preset("toy")
    dif_recipe = diffusion.PRESETS["toy"]  # batch 256, 4000 steps, Adam 1e-3, EMA 0.999
    teacher = train(MLP(), diffusion.loss, dif_cfg, dif_recipe, 10 if args.smoke else dif_recipe["steps"], data, gen)
    print(f"diffusion teacher trained ({time.perf_counter() - start:.0f} s)")

    # 2. CD: the student starts as the teacher's EMA weights; the teacher stays frozen in eval mode.
    cfg = cm.Config.from_preset("toy-cd")  # sigma_data 1, 50 kimg per stage, ratio limit 0.99, Euler teacher step
    recipe = cm.PRESETS["toy-cd"]  # batch 256, 2500 steps, Adam 1e-4, EMA 0.999
    net = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = train(net, cm.loss, cfg, recipe, 10 if args.smoke else recipe["steps"], data, gen, teacher=teacher)

    ratios, n = [], 256 if args.smoke else 4096
    for _ in range(1 if args.smoke else 4):
        fresh = (ring_of_gaussians(n, gen) - mean) / std
        samples = cm.sample(ema, torch.randn(n, 2, generator=gen), cfg)  # one step from sigma 79.56
        ratios.append(score(samples, fresh, data, gen))
    print(f"ratio {sum(ratios) / len(ratios):.3f} (mean of {len(ratios)} draws of {n} one-step samples) in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
