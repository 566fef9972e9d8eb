"""Where the batch target (cm.py / scm.py / tcm.py `batch_target`) differs from CT's single-sample target: for a batch
of the data, the weights of the batch's posterior E[x | x_sigma] (cm.batch_denoise) at each sigma. Prints the median
weight of the sample's own x (1: the target is CT's x + r eps) and the median effective number of samples 1 / sum w^2.

    python benchmarks/batch_target_weights.py [--data toy | points.npy | images.zip] [--batch 512] [--sigmas ...]

Images are read as train.py reads them (uint8 / 127.5 - 1); the EDM noise level sigma is in those units.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def posterior_weights(x, x_sigma, sigma):
    """w_ik = softmax_k(-||x_sigma_i - x_k||^2 / (2 sigma_i^2)), the weights cm.batch_denoise sums over (scale 1)."""
    xs, xt = x.flatten(1).double(), x_sigma.flatten(1).double()
    logits = (xt @ xs.T - xs.square().sum(dim=1) / 2) / sigma.double()[:, None] ** 2
    return logits.softmax(dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="toy", help="toy, cifar10, points.npy, an image zip or folder (default: toy)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--sigmas", default="0.01,0.1,0.5,1,2,5,10,20,40,80")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=data.cache_dir_default())
    args = p.parse_args()
    ds = data.load(args.data, args.cache)
    g = torch.Generator().manual_seed(args.seed)
    x = ds.get(torch.randperm(len(ds), generator=g)[:args.batch]).double()
    print(f"{ds.name}: batch {len(x)} of shape {tuple(x.shape[1:])}")
    print("   sigma | own weight (median) | effective samples (median)")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        s = torch.full((len(x),), sigma, dtype=torch.float64)
        x_sigma = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
        w = posterior_weights(x, x_sigma, s)
        ess = 1 / w.square().sum(dim=1)
        print(f"{sigma:8g} | {w.diagonal().median().item():19.3f} | {ess.median().item():26.1f}")


if __name__ == "__main__":
    main()
