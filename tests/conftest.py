import concurrent.futures
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(name):
    """benchmarks/<name>.py loaded as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
sys.path.insert(0, ROOT)


# --- Background work: subprocess-only fixtures start once the tests that need them are collected ----------------
# Most of the suite runs on one core; a fixture registered here (its result a function of a fresh folder) runs on a
# background thread, its subprocesses on the other core, while the first tests run, and the fixture waits for it. One
# task at a time, in registration order (test modules are imported in file order).
BACKGROUND = {}
_started = {}
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
# The tests' own process keeps to one thread, leaving the other core to that background work (2-core Intel Xeon,
# torch 2.13: 154 s for the default suite, 188 s with torch's default of two threads).
torch.set_num_threads(1)


def background(name):
    """Decorator: fn(folder) computes the value of the fixture `name`, which calls waited(name, ...)."""
    def register(fn):
        BACKGROUND[name] = fn
        return fn
    return register


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for name, fn in BACKGROUND.items():
        if name in needed:
            _started[name] = _pool.submit(fn, session.config._tmp_path_factory.mktemp(name))


def pytest_sessionfinish(session):
    _pool.shutdown(wait=False, cancel_futures=True)  # a stopped run (-x, Ctrl-C) waits for the running task only


def waited(name, tmp_path_factory):
    """The value of the background fixture `name` (started now where the collection hook did not start it)."""
    if name not in _started:
        _started[name] = _pool.submit(BACKGROUND[name], tmp_path_factory.mktemp(name))
    return _started[name].result()


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


class GaussianOracle(torch.nn.Module):
    """Exact average velocity for x ~ N(mean, std^2 I) on z_t = (1 - t) x + t eps, plus a constant offset delta:
    mu_t = (1 - t) mean, sig_t^2 = (1 - t)^2 std^2 + t^2, X(z; t, r) = mu_r + sig_r / sig_t (z - mu_t), so
    u = -mean + c(t, r) (z - mu_t), c = (sig_t - sig_r) / ((t - r) sig_t) = ((t + r - 2) std^2 + t + r) /
    ((sig_t + sig_r) sig_t), smooth at r = t. mean, std are parameters (their gradient is the test's)."""

    def __init__(self, mean=0.7, std=0.5, delta=0.0):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.tensor(mean, dtype=torch.float64))
        self.std = torch.nn.Parameter(torch.tensor(std, dtype=torch.float64))
        self.delta = delta

    def u(self, z, t, r):
        s2 = self.std ** 2
        sig_t = ((1 - t) ** 2 * s2 + t ** 2).sqrt()
        sig_r = ((1 - r) ** 2 * s2 + r ** 2).sqrt()
        c = ((t + r - 2) * s2 + t + r) / ((sig_t + sig_r) * sig_t)
        return -self.mean + c[:, None] * (z - (1 - t)[:, None] * self.mean) + self.delta

    def forward(self, z, t, r, y=None, tangents=None):
        if tangents is None:
            return self.u(z, t, r)
        with torch.no_grad():
            _, du = torch.func.jvp(self.u, (z, t, r), tangents)
        return self.u(z, t, r), du


def sliced_wasserstein(a, b, n_proj=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point sets (N, D), float64."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0)
    pa = (a.double() @ d).sort(dim=0).values
    pb = (b.double() @ d).sort(dim=0).values
    return (pa - pb).square().mean().sqrt().item()


def points_and_labels(B, D, K, scale=1.0, seed=100, labels=False):
    """B float64 points of dimension D (N(0, scale^2)) and, if asked, one-hot labels of K classes, from one seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
    y = torch.nn.functional.one_hot(torch.randint(K, (B,), generator=g), K).double() if labels else None
    return x, y


def param_grads(net, loss):
    """Gradient of loss.sum() for every parameter of net (zeros where it does not depend on one)."""
    return torch.autograd.grad(loss.sum(), list(net.parameters()), allow_unused=True, materialize_grads=True)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def train_toy(method, cfg, net, steps, lr, teacher=None, betas=(0.9, 0.99)):
    """Adam on the 8-Gaussian ring, batch 256 (so `images` = 256 (step - 1)), with an EMA (decay
    min(0.99, (1+k)/(10+k))) that is returned."""
    import copy
    import data
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, foreach=True)  # one op per update, not one per tensor
    points = data.toy_points(100_000, seed=0)
    gen = torch.Generator().manual_seed(0)
    ema = copy.deepcopy(net).eval()
    for step in range(1, steps + 1):
        idx = torch.randint(len(points), (256,), generator=gen)
        per_example, _ = method.loss(net, points[idx], None, cfg, step, gen, teacher=teacher, images=(step - 1) * 256)
        opt.zero_grad()
        per_example.mean().backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - min(0.99, (1 + step) / (10 + step)))
    return ema


def posterior_mean_by_definition(x, x_t, scale, std, y=None):
    """sum_k w_k x_k, w_k proportional to exp(-||x_t - scale x_k||^2 / (2 std^2)) over the samples with x_t's label,
    written out one sample at a time (the reference for cm.batch_denoise and its copy in scm.py)."""
    out = torch.empty_like(x_t)
    for i in range(len(x_t)):  # the first len(x_t) samples' partners
        same = [k for k in range(len(x)) if y is None or torch.equal(y[k], y[i])]
        d2 = torch.stack([(x_t[i] - scale[i] * x[k]).square().sum() for k in same])
        w = torch.exp(-(d2 - d2.min()) / (2 * std[i] ** 2))
        out[i] = sum(wk * x[k] for wk, k in zip(w / w.sum(), same))
    return out


@pytest.fixture(scope="session")
def toy_teacher():
    """A diffusion.py teacher on the 8-Gaussian ring (600 Adam steps, 128-wide MLP), shared by the distillation
    tests: (net, Heun-32 distance, 1-step Euler distance, 4096 held-out points, 4096 noise vectors)."""
    import data
    import diffusion
    import nets
    held_out = data.toy_points(4096, seed=123)
    eps = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    teacher = train_toy(diffusion, diffusion.Config(), nets.build_net("mlp", (2,), width=128, depth=3), 600, 1e-3,
                        betas=(0.9, 0.999))
    cfg = diffusion.Config(sample_steps=32)
    d_heun = sliced_wasserstein(diffusion.sample(teacher, eps, cfg), held_out)
    d_euler = sliced_wasserstein(diffusion.sample(teacher, eps, cfg, sigmas=(80.0, 0.0)), held_out)
    return teacher, d_heun, d_euler, held_out, eps



@pytest.fixture(scope="session")
def toy_ct():
    """CT from scratch on the 8-Gaussian ring (cm.py, 600 steps, lr 3e-4, 15-kimg ECT stages, 128-wide MLP): the CM
    run of test_cm and the stage 1 of test_tcm. Returns (EMA net, cm.Config)."""
    import cm
    import nets
    cfg = cm.Config(kimg_per_stage=15.0)
    torch.manual_seed(0)
    return train_toy(cm, cfg, nets.build_net("mlp", (2,), width=128, depth=3), 600, 3e-4), cfg


# --- FID: a random-weight detector file and tiny reference statistics (shared by test_fid and test_convert) ---


def save_hub_named(state, folder, stem="rand-inception"):
    """A state dict saved under a torch.hub-style name whose 8 hex digits are its SHA-256 prefix."""
    import data
    tmp = os.path.join(folder, "tmp.pth")
    torch.save(state, tmp)
    path = os.path.join(folder, f"{stem}-{data.file_digest(tmp)[:8]}.pth")
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def detector(tmp_path_factory):
    """Random Inception weights (He-scaled convs, random BN statistics) saved as NAME-<sha256[:8]>.pth:
    (path, net)."""
    import inception
    net = inception.InceptionV3().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2 / t[0].numel()))
            elif name.endswith(("bn.weight", "running_var")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn.bias", "running_mean")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return save_hub_named(net.state_dict(), str(tmp_path_factory.mktemp("detector"))), net


def tiny_ref(path):
    g = np.random.default_rng(0)
    A = g.normal(size=(2048, 64)) * 0.01
    sigma = A @ A.T + 1e-4 * np.eye(2048)  # full rank, as a reference over 50k images
    np.savez(path, mu=g.normal(size=2048) * 0.1, sigma=sigma)  # EDM's format: mu, sigma
    return str(path)
