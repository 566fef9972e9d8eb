import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def randomize_(net, seed=0):
    """Replace every parameter by a random value of unit-ish scale, so outputs and their derivatives are O(1)
    (fresh nets have 1e-5-scaled output layers, which would make derivative tests vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = fan_in ** -0.5 if p.ndim > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return net


def sliced_wasserstein(a, b, n_proj=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point sets (N, D), float64."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0)
    pa = (a.double() @ d).sort(dim=0).values
    pb = (b.double() @ d).sort(dim=0).values
    return (pa - pb).square().mean().sqrt().item()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
