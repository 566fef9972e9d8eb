"""shortcut.py against the official JAX code, kvfrans/shortcut-models at commit 6010043: targets_shortcut.py get_targets
(batch layout, bootstrap targets with clipping and guidance, flow targets), train.py loss_fn (mse_v: the squared error
averaged over dimensions) and the Euler loop of helper_inference.py do_inference (re-derived: that file imports wandb).
One fixed random MLP in float64 is the net on both sides; get_targets runs unchanged on it, with jax_enable_x64.

    pip install jax
    git clone https://github.com/kvfrans/shortcut-models && git -C shortcut-models checkout 6010043
    python benchmarks/shortcut_official.py --official shortcut-models

Prints each check's max abs difference and tolerance; exits non-zero if one is exceeded. Conventions (shortcut.py's
banner): the paper's time t' = 1 - t; its s(x, t', level) = -u(x, t, r, y) with r = t - 2^-level below level log2 M
and r = t at log2 M (the base case, query_r); its null label num_classes is our all-zero one-hot row.
"""
import argparse
import importlib.util
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shortcut  # noqa: E402

SHAPE, K, H = (2, 2, 2), 10, 32  # image (C, H, W), classes, hidden width
# cond: bootstrap_cfg 1; bias: bootstrap_dt_bias
CASES = [(cond, every, M, bias) for cond in (False, True) for every in (4, 8) for M in (128, 8) for bias in (0, 1)]
SCALE = 1.5  # cfg_scale of the conditional case (the README's ImageNet command)


def load_official(folder):
    """get_targets, loaded by file path (folder's train.py and model.py must not shadow ours on sys.path)."""
    try:
        import jax
    except ImportError:
        raise SystemExit("jax is not installed: pip install jax")
    path = os.path.join(folder, "targets_shortcut.py")
    if not os.path.isfile(path):
        raise SystemExit(f"{folder} has no targets_shortcut.py: pass a checkout of kvfrans/shortcut-models")
    jax.config.update("jax_enable_x64", True)
    spec = importlib.util.spec_from_file_location("targets_shortcut", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_targets


def weights(seed=0):
    """W1 (H, F), b1, W2 (D, H), b2 of u = W2 tanh(W1 [z, t, r, y] + b1) + b2; outputs of scale ~2.5, so that the
    clipping at 4 happens."""
    rng = np.random.default_rng(seed)
    D = math.prod(SHAPE)
    F = D + 2 + K
    return [rng.normal(size=(H, F)) * 2 / F**0.5, rng.normal(size=H) * 0.5, rng.normal(size=(D, H)) * 4 / H**0.5,
            rng.normal(size=D)]


W = weights()


class Net(torch.nn.Module):
    """Our call u = net(z, t, r, y), y one-hot (B, K) or None (the zero row)."""

    def forward(self, z, t, r, y):
        W1, b1, W2, b2 = (torch.from_numpy(a) for a in W)
        y = torch.zeros(len(z), K, dtype=z.dtype) if y is None else y.to(z.dtype)
        f = torch.cat([z.flatten(1), t[:, None], r[:, None], y], dim=1)
        return (torch.tanh(f @ W1.T + b1) @ W2.T + b2).reshape(z.shape)


class OfficialState:
    """The train_state get_targets calls: the same function in the paper's convention."""

    def __init__(self, M, cond):
        self.levels, self.cond = int(math.log2(M)), cond

    def call_model(self, x, t, dt_base, labels, train=False):
        import jax.numpy as jnp
        assert (np.asarray(dt_base) <= self.levels).all(), "a level above log2 M: never trained"
        W1, b1, W2, b2 = (jnp.asarray(a) for a in W)
        t = 1 - jnp.asarray(t, jnp.float64)  # ours t = 1 - t'
        level = jnp.asarray(dt_base, jnp.float64)
        r = jnp.where(level == self.levels, t, t - 2.0**-level)  # step 2^-level; level log2 M: r = t (base case)
        y = labels[:, None] == jnp.arange(K) if self.cond else jnp.zeros((len(x), K))  # label K: all-zero row
        f = jnp.concatenate([x.reshape(len(x), -1), t[:, None], r[:, None], y.astype(jnp.float64)], axis=1)
        return -(jnp.tanh(f @ W1.T + b1) @ W2.T + b2).reshape(x.shape)  # s = -u

    call_model_ema = call_model  # bootstrap_ema 0 and 1 are the same here


def one_hot(labels, cond):
    labels = torch.from_numpy(np.array(labels)).long()
    return (labels[:, None] == torch.arange(K)).double() if cond else None  # label K (null) -> zero row


def draw(get_targets, B, cond, every, M, bias, seed=0):
    """get_targets on random images (B, C, H, W): its outputs as numpy, the inputs, and our Config of the setting."""
    import jax
    rng = np.random.default_rng(seed + 1)
    images = rng.normal(size=(B, *SHAPE)) * 1.5
    labels = rng.integers(0, K, size=B) if cond else np.zeros(B, dtype=np.int64)
    flags = SimpleNamespace(batch_size=B, model=dict(
        denoise_timesteps=M, bootstrap_every=every, bootstrap_dt_bias=bias, bootstrap_ema=1, bootstrap_cfg=int(cond),
        cfg_scale=SCALE, num_classes=K, class_dropout_prob=0.3 if cond else 0.0))
    out = get_targets(flags, jax.random.PRNGKey(seed), OfficialState(M, cond), jax.numpy.asarray(images),
                      jax.numpy.asarray(labels))
    o = dict(zip(("x_t", "v_t", "tp", "dt_base", "labels"), (np.array(a) for a in out[:5])), images=images)
    o["labels_in"] = labels
    return o, shortcut.Config(denoise_timesteps=M, bootstrap_every=every, bootstrap_dt_bias=bool(bias),
                              cfg_scale=SCALE if cond else 1.0)


def check_layout(get_targets, cond, every, M, bias):
    """d of sample_t_d against 2^-level row by row (B = 128 and a large B), and on the large B the set of t of each
    step against 1 - t' and the whole grid {d, 2d, ..., 1} (flow rows: {1/M, ..., 1})."""
    levels = int(math.log2(M))
    rows = []
    for B in (128, every * (levels * 1024 + 3)):  # 1024 rows a step hit all of <= 64 points; 3 rows with d = 1
        o, cfg = draw(get_targets, B, cond, every, M, bias)
        n_boot = B // every
        t, d = (a.numpy() for a in shortcut.sample_t_d(B, cfg, torch.Generator().manual_seed(0), "cpu"))
        d_off = np.where(np.arange(B) < n_boot, 2.0 ** -o["dt_base"], 0.0)  # flow rows: level log2 M, ours d = 0
        bad = int((d != d_off).sum()) + int((o["dt_base"][n_boot:] != levels).sum())
        for step in np.unique(d_off) if B > 128 else ():
            grid = set(np.arange(1, M + 1) / M) if step == 0 else set(np.arange(1, 1 / step + 1) * step)
            bad += int(set(t[d == step]) != grid) + int(set(1 - o["tp"][d_off == step]) != grid)
        rows.append((f"layout B={B}: mismatched rows + grids", bad, 0))
    return rows


def check_targets_and_loss(get_targets, cond, every, M, bias, B=128):
    """On the official draws: bootstrap targets, flow targets and the per-row loss."""
    import jax.numpy as jnp
    o, cfg = draw(get_targets, B, cond, every, M, bias)
    n_boot = B // every
    z, v_t = torch.from_numpy(o["x_t"]), torch.from_numpy(o["v_t"])
    t = torch.from_numpy(1 - o["tp"].astype(np.float64))  # ours t = 1 - t'
    d = torch.from_numpy(np.where(np.arange(B) < n_boot, 2.0 ** -o["dt_base"], 0.0))  # flow rows: d = 0
    assert (o["labels"][:n_boot] == o["labels_in"][:n_boot]).all()  # self-consistency rows keep their labels
    u_boot = shortcut.bootstrap_target(Net(), z[:n_boot], t[:n_boot], d[:n_boot], one_hot(o["labels"][:n_boot], cond),
                                       cfg)
    # Flow rows come from images 0 .. B - n_boot - 1. The official noise x_0 from its x_t = (1 - (1 - 1e-5) t') x_0
    # + t' x_1, with the coefficient in float32 as there (its flow rows' t' is float32)
    tp = o["tp"][n_boot:, None, None, None]
    x = o["images"][:B - n_boot]
    eps = (o["x_t"][n_boot:] - tp * x) / (np.float32(1) - np.float32(1 - 1e-5) * tp.astype(np.float32))
    v = torch.from_numpy(eps - x)  # ours on the same (x, eps)
    u = shortcut.shortcut(Net(), z, t, d, one_hot(o["labels"], cond), cfg)  # dropped labels: zero rows
    L = (u - torch.cat([u_boot, v])).flatten(1).square().mean(dim=1)
    s = OfficialState(M, cond).call_model(*(jnp.asarray(o[k]) for k in ("x_t", "tp", "dt_base", "labels")))
    mse_v = torch.from_numpy(np.mean((np.asarray(s) - o["v_t"]) ** 2, axis=(1, 2, 3)))  # train.py loss_fn
    print(f"  {int((v_t[:n_boot].abs() == 4).sum())} bootstrap target entries clipped; "
          f"loss: official {mse_v.mean().item():.10f}, ours {L.mean().item():.10f}")
    return [(f"bootstrap target vs -v_t ({n_boot} rows)", (u_boot + v_t[:n_boot]).abs().max().item(), 1e-10),
            (f"flow target vs -v_t (max |eps| {np.abs(eps).max():.2f})", (v + v_t[n_boot:]).abs().max().item(), 1e-4),
            ("flow target vs -v_t - 1e-5 eps", (v + v_t[n_boot:] - 1e-5 * torch.from_numpy(eps)).abs().max().item(),
             1e-12),
            ("loss per row, self-consistency rows", (L - mse_v)[:n_boot].abs().max().item(), 1e-10),
            ("loss per row, flow rows (the 1e-5)", (L - mse_v)[n_boot:].abs().max().item(), 1e-3)]


def check_sampler(cond, M, B=64, seed=0):
    """shortcut.sample against do_inference's loop x <- x + s(x, t' = i/N, level log2 N) / N, guided s_null + w (s_c -
    s_null) when its cfg scale w != 1, for N = 1, 2, ..., M (N > M would ask for a level the net never trained)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(B, *SHAPE))
    labels = jnp.asarray(rng.integers(0, K, size=B))
    w = SCALE if cond else 1.0
    diff = 0.0
    for N in (2**k for k in range(int(math.log2(M)) + 1)):
        x = jnp.asarray(eps)
        for i in range(N):
            args = (jnp.full(B, i / N), jnp.full(B, int(math.log2(N))))
            s = OfficialState(M, cond).call_model(x, *args, labels)
            if w != 1:
                s_null = OfficialState(M, cond).call_model(x, *args, jnp.full(B, K))
                s = s_null + w * (s - s_null)
            x = x + s / N
        cfg = shortcut.Config(denoise_timesteps=M, sample_cfg_scale=w)
        z = shortcut.sample(Net(), torch.from_numpy(eps), cfg, y=one_hot(labels, cond), steps=N)
        diff = max(diff, (z - torch.from_numpy(np.array(x))).abs().max().item())
    return [(f"sampler, N = 1 .. {M} steps", diff, 1e-10)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="a checkout of kvfrans/shortcut-models (commit 6010043)")
    args = p.parse_args()
    get_targets = load_official(args.official)
    torch.set_num_threads(1)
    rows = []
    for cond, every, M, bias in CASES:
        case = f"{'cond cfg 1.5' if cond else 'uncond'}, every {every}, M {M}{', dt bias' if bias else ''}"
        print(case)
        checks = (check_layout(get_targets, cond, every, M, bias)
                  + check_targets_and_loss(get_targets, cond, every, M, bias))
        rows += [(case, *c) for c in checks]
    rows += [(f"{'cond cfg 1.5' if cond else 'uncond'}, M {M}", *c) for cond in (False, True) for M in (128, 8)
             for c in check_sampler(cond, M)]
    print(f"{'case':38s} {'check':44s} {'max |diff|':>10s} {'tol':>6s}")
    for case, name, diff, tol in rows:
        print(f"{case:38s} {name:44s} {diff:10.2e} {tol:6.0e}{'' if diff <= tol else '  FAIL'}")
    failed = [f"{case}: {name}" for case, name, diff, tol in rows if not diff <= tol]
    if failed:
        sys.exit(f"{len(failed)} checks failed, the first: {failed[0]}")
    print("all checks passed")


if __name__ == "__main__":
    main()
