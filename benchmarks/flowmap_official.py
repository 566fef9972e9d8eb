"""flowmap.py against the loss terms of the flow-map self-distillation code (nmboffi/flow-maps, py/common/losses.py:
diagonal_term, lsd_term, esd_term, psd_term), run unchanged in JAX float64 on the same draws and the same function.

    pip install jax flax ml_collections
    git clone https://github.com/nmboffi/flow-maps
    python benchmarks/flowmap_official.py --official flow-maps

The function on both sides: one fixed random MLP u(z, t, r) = W2 tanh(W1 [z, t, r] + b1) + b2 and a log-variance
w(t, r) = a + b t + c r (the learned weight; 0 with the weight off), in this repository's time. The JAX side sees it
through the API losses.py calls (X.apply(params, ...) with method None, "calc_b", "partial_t", "partial_s" or
"calc_weight", as common/flow_map.py's FlowMap), in the paper's time: phi_{s,t}(x) = -u(x, 1 - s, 1 - t), noise x0 =
eps, data x1 = x, the linear interpolant I_tau = (1 - tau) x0 + tau x1 (common/interpolant.py, "linear").
Each row: our per-example loss against the official term of that row (the diagonal term at tau = 1 - t; the others at
s = 1 - t, t' = 1 - r, PSD's u' = 1 - m and h), and, where both differentiate the same expression (tangent "jvp", and
PSD, which has no derivative), the gradient of the batch mean (setup_loss's) in every parameter. Prints each check's
max abs difference and tolerance; exits non-zero if one is exceeded.
"""
import argparse
import importlib
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowmap  # noqa: E402

D, H, B = 3, 16, 24  # data dimension, hidden width, batch (a quarter of it diagonal rows)
STOPGRAD = dict(lsd="convex", esd="full", psd="convex")  # cifar10_paper.py's
CASES = [(kind, psd_type, tangent, weight) for kind, psd_type in (("lsd", None), ("esd", None), ("psd", "uniform"),
                                                                    ("psd", "midpoint"))
         for tangent in ("jvp", "fused", "fd") for weight in (False, True)]


def load_official(folder):
    """common.losses from a checkout (its py/ folder on sys.path), with float64 JAX."""
    try:
        import jax
    except ImportError:
        raise SystemExit("jax is not installed: pip install jax flax ml_collections")
    if not os.path.isfile(os.path.join(folder, "py", "common", "losses.py")):
        raise SystemExit(f"{folder} has no py/common/losses.py: pass a checkout of nmboffi/flow-maps")
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, os.path.join(folder, "py"))
    return importlib.import_module("common.losses")


def weights(seed=0):
    """W1 (H, D + 2), b1, W2 (D, H), b2 and (a, b, c) of w(t, r), float64."""
    rng = np.random.default_rng(seed)
    return dict(W1=rng.normal(size=(H, D + 2)) * 1.5 / math.sqrt(D + 2), b1=rng.normal(size=H) * 0.5,
                W2=rng.normal(size=(D, H)) * 2 / math.sqrt(H), b2=rng.normal(size=D) * 0.5,
                abc=np.array([0.3, -0.7, 1.1]))


class TorchNet(torch.nn.Module):
    """u(z, t, r) and w(t, r) in this repository's call: net(z, t, r, y, return_logvar=..., tangents=...)."""

    def __init__(self, w):
        super().__init__()
        for k, v in w.items():
            setattr(self, k, torch.nn.Parameter(torch.tensor(v)))

    def u(self, z, t, r):
        return torch.tanh(torch.cat([z, t[:, None], r[:, None]], 1) @ self.W1.T + self.b1) @ self.W2.T + self.b2

    def forward(self, z, t, r, y=None, tangents=None, return_logvar=False):
        out = self.u(z, t, r)
        if tangents is not None:
            with torch.no_grad():
                out = (out, torch.func.jvp(self.u, (z, t, r), tangents)[1])
        return (out, self.abc[0] + self.abc[1] * t + self.abc[2] * r) if return_logvar else out


class JaxMap:
    """The same function as losses.py sees a FlowMap: X.apply(params, *args, method=..., **kwargs), one row at a time
    (x of shape (D,), times scalars), in the paper's time."""

    def __init__(self, weight):
        self.weight = weight

    def apply(self, params, *args, method=None, rngs=None, train=False, **kwargs):
        return getattr(self, method or "jump")(params, *args, **kwargs)

    def phi(self, p, s, t, x):
        import jax.numpy as jnp
        inp = jnp.concatenate([x, jnp.stack([1 - s, 1 - t])])
        return -(p["W2"] @ jnp.tanh(p["W1"] @ inp + p["b1"]) + p["b2"])

    def jump(self, p, s, t, x, label=None, return_X_and_phi=False, return_div=False, **_):
        import jax.numpy as jnp
        phi = self.phi(p, s, t, x)
        X = x + (t - s) * phi
        if not return_X_and_phi:
            return X
        return (X, phi, jnp.zeros(())) if return_div else (X, phi)

    def calc_b(self, p, t, x, label=None, **_):
        return self.phi(p, t, t, x)

    def partial_t(self, p, s, t, x, label=None, **_):
        import jax
        return jax.jvp(lambda t_: self.jump(p, s, t_, x), (t,), (1.0,))

    def partial_s(self, p, s, t, x, label=None, **_):
        import jax
        return jax.jvp(lambda s_: self.jump(p, s_, t, x), (s,), (1.0,))

    def calc_weight(self, p, s, t):
        return p["abc"][0] + p["abc"][1] * (1 - s) + p["abc"][2] * (1 - t) if self.weight else 0.0 * s


class Linear:
    """common/interpolant.py's "linear" interpolant: alpha = 1 - tau, beta = tau."""

    def calc_It(self, t, x0, x1, label=None):
        return (1 - t) * x0 + t * x1

    def calc_It_dot(self, t, x0, x1, label=None):
        return x1 - x0


def draws(cfg, seed):
    """x, eps, (t, r, m, h) as flowmap.loss draws them from torch.Generator(seed)."""
    x = torch.tensor(np.random.default_rng(seed + 100).normal(size=(B, D)) * 0.7 + 0.3)
    gen = torch.Generator().manual_seed(seed)
    times = flowmap.sample_times(B, cfg, gen, "cpu")
    return x, torch.randn(x.shape, generator=gen, dtype=x.dtype), times


def official_rows(losses, params, cfg, x, eps, times):
    """Each row's official term (B,) and the gradient of their mean (setup_loss) in params."""
    import jax
    import jax.numpy as jnp
    X, interp = JaxMap(cfg.learned_weight), Linear()
    t, r, m, h = (jnp.asarray(v.numpy()) for v in times)
    x0, x1 = jnp.asarray(eps.numpy()), jnp.asarray(x.numpy())
    n = max(1, int(B * cfg.diag_fraction))

    def rows(p):
        diag = jax.vmap(lambda a, b, tau: losses.diagonal_term(p, a, b, None, tau, None, interp=interp, X=X))(
            x0[:n], x1[:n], 1 - t[:n])
        kw = dict(interp=interp, X=X, stopgrad_type=STOPGRAD[cfg.loss_kind])
        if cfg.loss_kind == "psd":
            off = jax.vmap(lambda a, b, s_, t_, u_, h_: losses.psd_term(p, p, a, b, None, s_, t_, u_, h_, None,
                                                                        psd_type=cfg.psd_type, **kw))(
                x0[n:], x1[n:], 1 - t[n:], 1 - r[n:], 1 - m[n:], h[n:])
        else:
            term = losses.lsd_term if cfg.loss_kind == "lsd" else losses.esd_term
            off = jax.vmap(lambda a, b, s_, t_: term(p, p, a, b, None, s_, t_, None, **kw))(
                x0[n:], x1[n:], 1 - t[n:], 1 - r[n:])
        return jnp.concatenate([diag, off])

    value = rows(params)
    grad = jax.grad(lambda p: jnp.mean(rows(p)))(params)
    return np.asarray(value), {k: np.asarray(v) for k, v in grad.items()}


def check(losses, kind, psd_type, tangent, weight, seed=0):
    """[(name, max abs difference, tolerance)] for one case."""
    import jax.numpy as jnp
    cfg = flowmap.Config(loss_kind=kind, psd_type=psd_type or "uniform", tangent=tangent, learned_weight=weight,
                         diag_fraction=0.25, fd_step=1e-5)
    w = weights(seed)
    net = TorchNet(w)
    x, eps, times = draws(cfg, seed)
    L, _ = flowmap.loss(net, x, None, cfg, 1, torch.Generator().manual_seed(seed))
    L.mean().backward()
    value, grad = official_rows(losses, {k: jnp.asarray(v) for k, v in w.items()}, cfg, x, eps, times)
    name = f"{kind}{'-' + psd_type if psd_type else ''} {tangent} weight={'on' if weight else 'off'}"
    out = [(f"{name}: per-row loss", float(np.abs(L.detach().numpy() - value).max()),
            1e-8 * max(1.0, float(np.abs(value).max())) if tangent == "fd" else 1e-11)]
    if tangent == "jvp" or kind == "psd":
        ours = {k: np.zeros_like(v) if getattr(net, k).grad is None else getattr(net, k).grad.numpy()
                for k, v in w.items()}  # w's parameters get none with the weight off (the official: zeros)
        out.append((f"{name}: gradient of the mean", max(float(np.abs(ours[k] - g).max()) for k, g in grad.items()),
                    1e-11))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help="a checkout of nmboffi/flow-maps")
    args = p.parse_args()
    losses = load_official(args.official)
    failed = 0
    for case in CASES:
        for name, diff, tol in check(losses, *case):
            ok = diff <= tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {diff:.2e} (tolerance {tol:.0e})")
    print(f"{failed} of the checks failed" if failed else "all checks within tolerance")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
