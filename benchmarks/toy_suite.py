"""Every method on a suite of 2-D point clouds, trained through the real CLI, scored by one-step sample quality.

    python benchmarks/toy_suite.py                                          # all distributions x all methods
    python benchmarks/toy_suite.py --dists arms_ring,checkerboard --methods diffusion,sct --jobs 2 --threads 1
    python benchmarks/toy_suite.py --methods meanflow --extra "--steps 4000 --lr 2e-3"   # try a recipe change
    python benchmarks/toy_suite.py --dists arms_ring --methods diffusion,ct --curve-every 200   # ratio vs steps

Each distribution is drawn once (20,000 training points standardised to zero mean and unit variance per axis
on average, saved as `<out>/data/<name>.npy`, plus 4,096 held-out points) and each method is run as a user
would: `python train.py --method M --data <name>.npy` with its toy preset. MeanFlow and the diffusion model start
from scratch; the others reuse the runs before them, as the reference does: sCT and CT tune the diffusion run
(--init), sCD and CD (presets toy-scd, toy-cd) take it as --init and --teacher, TCM takes the CT run as --stage1.

Score: sliced W2 (256 projections) between 4,096 one-step samples (the diffusion teacher: its many-step sampler)
and the held-out points, divided by the sliced W2 of a moment-matched Gaussian (same mean and covariance, 4,096
points): 1 is "a blob", 0 is perfect. Each cell is the mean over --draws sets of samples (default 8: the run's own
`samples.npy`, then sets drawn the same way from its ckpt.pt with other seeds), and the Gaussian's score the mean
over as many Gaussian draws: for a fixed model one draw's ratio varies by 0.02-0.09 (standard deviation), too much
to place a cell against a threshold. The data-vs-data floor (as many further draws of the distribution) is printed
for scale: a ratio near floor/gaussian is as good as this metric can tell. Cost is the wall-clock time of each
train.py process (CPU time, user + sys, is in results.json; the extra draws are not counted). The budget the presets
are sized for is one minute on two CPU cores, hence the defaults: one run at a time with `train.py --threads 2`
(--jobs 2 --threads 1 runs the same recipes in about the same total time, with ratios equal up to run-to-run noise
and each run taking ~1.5x longer). A finished run is reused while its command line and resolved recipe are
unchanged (code edits need --force); the suite folder and the checkout may move.

Writes `<out>/results.json`, a Markdown table on stdout and `<out>/grid.png` (distribution x method scatters).
"""
import argparse
import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the repository's modules (train.py's config resolution and sampler, checkpoints)
    sys.path.insert(0, ROOT)

# --- Distributions -----------------------------------------------------------------------------------------------
# Each returns n points (n, 2) from a numpy Generator; `standardize` then gives every one zero mean and unit scale.


def gaussians8(n, g):
    k = g.integers(8, size=n)
    angle = k * (2 * math.pi / 8)
    return np.stack([np.cos(angle), np.sin(angle)], 1) + 0.1 * g.standard_normal((n, 2))


def moons(n, g):
    k = g.integers(2, size=n)
    angle = math.pi * g.random(n)
    upper = np.stack([np.cos(angle), np.sin(angle)], 1)
    lower = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1)
    return np.where(k[:, None] == 0, upper, lower) + 0.05 * g.standard_normal((n, 2))


def circles(n, g):
    radius = np.where(g.random(n) < 0.5, 1.0, 0.5)
    angle = 2 * math.pi * g.random(n)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.03 * g.standard_normal((n, 2))


def swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * g.random(n))
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5 + 0.1 * g.standard_normal((n, 2))


def checkerboard(n, g):
    x1 = 4 * g.random(n) - 2
    x2 = g.random(n) - 2 * g.integers(2, size=n) + np.floor(x1) % 2  # the column's squares alternate with x1
    return np.stack([x1, x2], 1)


def pinwheel(n, g, arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    k = g.integers(arms, size=n)
    p = np.stack([1 + radial_std * g.standard_normal(n), tangential_std * g.standard_normal(n)], 1)
    angle = k * (2 * math.pi / arms) + rate * np.exp(p[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], 1)


def spirals(n, g):
    r = np.sqrt(g.random(n)) * 3 * math.pi
    sign = np.where(g.random(n) < 0.5, 1.0, -1.0)[:, None]
    return sign * np.stack([-np.cos(r) * r, np.sin(r) * r], 1) / 3 + 0.1 * g.standard_normal((n, 2))


def arms_ring(n, g):
    """Thin structures: three curved arms (width 0.02) inside a thin ring (width 0.015) of radius 1."""
    ring = g.random(n) < 0.4
    k = g.integers(3, size=n)
    s = g.random(n)
    r = np.where(ring, 1.0, 0.1 + 0.7 * s)
    angle = np.where(ring, 2 * math.pi * s, k * (2 * math.pi / 3) + 2.0 * s)
    width = np.where(ring, 0.015, 0.02)[:, None]
    return r[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + width * g.standard_normal((n, 2))


DISTS = dict(gaussians8=gaussians8, moons=moons, circles=circles, swissroll=swissroll, checkerboard=checkerboard,
             pinwheel=pinwheel, spirals=spirals, arms_ring=arms_ring)


def standardize(x, ref):
    """x shifted by ref's mean and divided by ref's RMS deviation (one scale for both axes: shapes stay round)."""
    mean = ref.mean(0)
    return (x - mean) / np.sqrt(((ref - mean) ** 2).sum(1).mean() / 2)


def draw(name, n, seed):
    g = np.random.default_rng(seed)
    return DISTS[name](n, g)

# --- Score ---------------------------------------------------------------------------------------------------------


def sliced_w2(a, b, n_proj=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point sets (N, D), float64."""
    d = np.random.default_rng(seed).standard_normal((a.shape[1], n_proj))
    d /= np.linalg.norm(d, axis=0)
    pa = np.sort(a @ d, axis=0)
    pb = np.sort(b @ d, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


def baselines(train, held_out, floor_sets, seed=0):
    """(moment-matched Gaussian's sliced W2, data-vs-data sliced W2) against the held-out points, each a mean over
    len(floor_sets) draws of len(held_out) points: Gaussians with train's mean and covariance, and floor_sets (further
    draws of the distribution)."""
    g = np.random.default_rng(seed)
    mean, cov = train.mean(0), np.cov(train.T)
    gauss = [sliced_w2(g.multivariate_normal(mean, cov, size=len(held_out)), held_out) for _ in floor_sets]
    return float(np.mean(gauss)), float(np.mean([sliced_w2(f, held_out) for f in floor_sets]))

# --- Runs ----------------------------------------------------------------------------------------------------------
# name: (train.py arguments, the run it needs first). {data}, {dif}, {ct} are filled in per distribution.

METHODS = dict(
    meanflow=("--method meanflow --data {data}", None),
    diffusion=("--method diffusion --data {data}", None),
    sct=("--method scm --data {data} --init {dif}", "diffusion"),
    ct=("--method cm --data {data} --init {dif}", "diffusion"),
    scd=("--method scm --preset toy-scd --data {data} --init {dif} --teacher {dif}", "diffusion"),
    cd=("--method cm --preset toy-cd --data {data} --init {dif} --teacher {dif}", "diffusion"),
    tcm=("--method tcm --data {data} --stage1 {ct}", "ct"),
)
LABELS = dict(meanflow="MeanFlow", diffusion="diffusion (teacher, Heun)", sct="sCT (tuning)", ct="CT (tuning)",
              scd="sCD", cd="CD", tcm="TCM (on CT)")


def resolved(flags):
    """What train.py flags resolve to (flags over preset over defaults, as train.py reads them) plus the net's registry
    entry, as text: a finished run is reused only while this is unchanged, so editing a preset retrains it."""
    import nets
    import recipe
    _, cfg, _, _ = recipe.resolve_config(flags)
    return json.dumps([cfg, nets.NETS[cfg["net"]][1]], sort_keys=True)


def portable(arg, out):
    """A command-line word with the suite's --out folder and the repository written as <out> and <repo>: the reuse key
    of a run does not depend on where the suite folder or the checkout lie."""
    for path, name in ((out, "<out>"), (ROOT, "<repo>")):
        if arg == path or arg.startswith(path + os.sep):
            return name + arg[len(path):]
    return arg


def run_one(args, dist, method, data_file, upstream_trained=False):
    """Train one (distribution, method) through train.py; returns (return code, cost, run folder, trained), the cost a
    dict of wall-clock and CPU (user + sys) seconds, `trained` False for a reused run. A run whose teacher or stage-1
    run was retrained in this call is retrained too."""
    out = os.path.join(args.out, "runs", f"{dist}-{method}")
    template, _ = METHODS[method]
    cli = template.format(data=data_file, dif=os.path.join(args.out, "runs", f"{dist}-diffusion"),
                          ct=os.path.join(args.out, "runs", f"{dist}-ct"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *shlex.split(cli), "--out", out, "--num-samples", "4096",
           "--seed", str(args.seed), "--device", "cpu", "--threads", str(args.threads), "--log-every", "500",
           *shlex.split(args.extra)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.curve_every:
        cmd += ["--snapshot-every", str(args.curve_every)]
    flags = [portable(a, args.out) for a in cmd[2:]]  # cmd = [python, train.py, flags...]
    key = dict(command=flags, recipe=resolved(flags))
    if os.path.exists(os.path.join(out, "cost.json")) and not (args.force or upstream_trained):
        with open(os.path.join(out, "cost.json")) as f:
            cost = json.load(f)
        if {k: cost.pop(k, None) for k in key} == key:  # the same run finished before: reuse it
            return 0, cost, out, False
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with open(os.path.join(os.path.dirname(out), f"{dist}-{method}.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        p = subprocess.Popen(["nice", "-n", str(args.nice), *cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    cost = dict(wall_s=time.perf_counter() - start, cpu_s=usage.ru_utime + usage.ru_stime)
    if p.returncode == 0:
        with open(os.path.join(out, "cost.json"), "w") as f:
            json.dump(dict(cost, **key), f)
    return p.returncode, cost, out, True


def run_all(args, dists, methods, files):
    """Runs in dependency order (teachers and stage-1 runs first), --jobs at a time."""
    jobs = [(d, m) for d in dists for m in methods]
    need = {(d, m): (d, METHODS[m][1]) for d, m in jobs if METHODS[m][1]}
    for d, m in need.values():
        if m not in methods:
            raise SystemExit(f"toy_suite.py: error: {METHODS[m][0].split()[1]} runs need --methods to include {m}")
    done, trained, results = set(), set(), {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {}
        while jobs or pending:
            ready = [j for j in jobs if j not in need or need[j] in done]
            for j in ready[:max(0, args.jobs - len(pending))]:
                jobs.remove(j)
                pending[pool.submit(run_one, args, *j, files[j[0]], need.get(j) in trained)] = j
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                j = pending.pop(f)
                rc, cost, out, fresh = f.result()
                results[j] = dict(rc=rc, out=out, **cost)
                if fresh:
                    trained.add(j)
                status = ('ok' if fresh else 'reused') if rc == 0 else f'FAILED (rc {rc})'
                print(f"{j[0]:>12s} {j[1]:>9s}: {status} {cost['wall_s']:6.1f} s ({cost['cpu_s']:.1f} s CPU)",
                      flush=True)
                if rc == 0:
                    done.add(j)
                else:  # whatever depends on it cannot run
                    for k in [k for k in jobs if need.get(k) == j]:
                        jobs.remove(k)
                        results[k] = dict(rc=-1, out=None, wall_s=0.0, cpu_s=0.0)
    return results


def load_run(path):
    """A checkpoint's (state, method module, method config, data shape, label count, EMA net) for sampling it as
    train.py samples its final samples.npy."""
    import importlib
    import types

    import checkpoints
    import recipe
    state = checkpoints.load_checkpoint(path, "cpu")
    cfg = state["config"]
    method = importlib.import_module(cfg["method"])
    method_cfg, ds = recipe.method_config(method, cfg), types.SimpleNamespace(shape=tuple(cfg["shape"]))
    label_dim = cfg["label_dim"] if cfg["cond"] else 0
    return state, method, method_cfg, ds, label_dim, checkpoints.frozen_ema(state, ds.shape, label_dim, "cpu", path)


def draw_ratios(run, held_out, gaussian, draws):
    """Ratios of `draws` sets of len(held_out) samples from a finished run's EMA: its samples.npy (train.py's), then
    draws - 1 more drawn the same way from ckpt.pt with the seeds mix_seed(run seed, k), k = 1, 2, ..."""
    import data
    import train
    first = np.load(os.path.join(run, "samples.npy")).astype(np.float64)
    ratios = [sliced_w2(first, held_out) / gaussian]
    if draws > 1:
        state, method, method_cfg, ds, label_dim, net = load_run(os.path.join(run, "ckpt.pt"))
        for k in range(1, draws):
            seed = data.mix_seed(state["config"]["seed"], k)
            with torch.no_grad():
                x = train.draw_samples(method, method_cfg, net, ds, label_dim, len(held_out), seed, "cpu", chunk=4096)
            ratios.append(sliced_w2(x.double().numpy(), held_out) / gaussian)
    return first, ratios


def curve(run, held_out, gaussian):
    """[(step, EMA ratio, online ratio)] of a run's snapshots (train.py --snapshot-every), each one draw sampled as
    train.py draws its final samples.npy (first EMA, the method's sampler defaults, the run's seed)."""
    import checkpoints
    import train
    rows = []
    folder = os.path.join(run, "snapshots")
    for name in sorted(os.listdir(folder)):
        state, method, method_cfg, ds, label_dim, net = load_run(os.path.join(folder, name))
        ratios = []
        for weights in (state["ema"][0], state["net"]):
            checkpoints.load_weights(net, weights, name)
            with torch.no_grad():
                x = train.draw_samples(method, method_cfg, net, ds, label_dim, len(held_out), state["config"]["seed"], "cpu")
            ratios.append(sliced_w2(x.double().numpy(), held_out) / gaussian)
        rows.append((state["step"], *ratios))
    return rows

# --- Picture -------------------------------------------------------------------------------------------------------


def scatter_tile(points, size, lim=3.0, color=(20, 80, 200)):
    tile = np.full((size, size, 3), 255, dtype=np.uint8)
    if points is None:
        return tile
    col = np.clip(((points[:, 0] / lim + 1) / 2 * (size - 1)).astype(int), 0, size - 1)
    row = np.clip(((1 - points[:, 1] / lim) / 2 * (size - 1)).astype(int), 0, size - 1)
    tile[row, col] = color
    return tile


def save_grid(path, dists, methods, held_out, samples, ratios, size=160, pad=4, head=18, side=90):
    """Rows: distributions; columns: held-out data, then each method's samples with its ratio above."""
    cols = ["data"] + methods
    W, H = side + len(cols) * (size + pad), head + len(dists) * (size + pad + 14)
    canvas = Image.new("RGB", (W, H), "white")
    pen = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        pen.text((side + j * (size + pad) + 4, 2), c if c == "data" else LABELS[c].split(" (")[0], fill="black")
    for i, d in enumerate(dists):
        y = head + i * (size + pad + 14)
        pen.text((4, y + size // 2), d, fill="black")
        for j, c in enumerate(cols):
            x = side + j * (size + pad)
            pts = held_out[d] if c == "data" else samples.get((d, c))
            canvas.paste(Image.fromarray(scatter_tile(pts, size, color=(90, 90, 90) if c == "data" else (20, 80, 200))),
                         (x, y + 14))
            if c != "data":
                r = ratios.get((d, c))
                pen.text((x + 4, y), "failed" if r is None else f"{r:.2f}", fill="black" if r is None or r <= 0.35 else "red")
    canvas.save(path)

# --- Main ----------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dists", default=",".join(DISTS), help=f"comma-separated subset of: {', '.join(DISTS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, help="override every run's --steps (default: each preset's)")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. \"--lr 2e-3\"")
    p.add_argument("--out", default="runs/toy-suite")
    p.add_argument("--n", type=int, default=20_000, help="training points per distribution")
    p.add_argument("--seed", type=int, default=0, help="train.py --seed")
    p.add_argument("--jobs", type=int, default=1, help="train.py processes at a time (more than one: the times are "
                   "no longer those of an idle machine)")
    p.add_argument("--threads", type=int, default=2, help="train.py --threads: CPU threads per run")
    p.add_argument("--nice", type=int, default=0, help="niceness of the train.py processes")
    p.add_argument("--draws", type=int, default=8, help="sets of 4,096 one-step samples scored per run (the table "
                   "shows their mean ratio; the baselines are averaged alike): one set's ratio varies by ~0.04 (std)")
    p.add_argument("--curve-every", type=int, default=0, help="snapshot every run every this many steps "
                   "(train.py --snapshot-every) and print its one-step ratio along the run, EMA and online weights")
    p.add_argument("--force", action="store_true", help="retrain every run (default: reuse a finished run while its "
                   "command and resolved config are unchanged and the run it starts from was not retrained; code "
                   "edits need this)")
    args = p.parse_args()
    dists, methods = args.dists.split(","), args.methods.split(",")
    for name, known in (("dists", DISTS), ("methods", METHODS)):
        bad = [v for v in getattr(args, name).split(",") if v not in known]
        if bad:
            raise SystemExit(f"toy_suite.py: error: unknown --{name} {bad}; choose from {', '.join(known)}")
    if args.curve_every < 0:
        raise SystemExit(f"toy_suite.py: error: --curve-every must be >= 0, got {args.curve_every}")
    if args.draws < 1:
        raise SystemExit(f"toy_suite.py: error: --draws must be >= 1, got {args.draws}")
    methods = [m for m in METHODS if m in methods]  # dependency order
    args.out = os.path.normpath(args.out)

    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    files, held_out, base = {}, {}, {}
    for d in dists:
        i = list(DISTS).index(d)  # the same points whatever subset runs
        train, test, floor = (draw(d, n, seed) for n, seed in ((args.n, 1000 + i), (4096, 2000 + i),
                                                              (4096 * args.draws, 3000 + i)))
        train, test, floor = (standardize(x, train) for x in (train, test, floor))
        files[d] = os.path.join(args.out, "data", f"{d}.npy")
        np.save(files[d], train.astype(np.float32))
        held_out[d] = test
        base[d] = baselines(train, test, np.split(floor, args.draws))

    results = run_all(args, dists, methods, files)
    samples, ratios = {}, {}
    torch.set_num_threads(args.threads)
    for (d, m), r in results.items():
        if r["rc"] == 0:
            samples[d, m], r["ratios"] = draw_ratios(r["out"], held_out[d], base[d][0], args.draws)
            ratios[d, m] = float(np.mean(r["ratios"]))

    print(f"\nratio = sliced W2 to held-out points / a moment-matched Gaussian's (1 = a blob); wall-clock s per run "
          f"({args.threads} threads, {args.jobs} at a time) in brackets")
    print("| distribution | data floor | " + " | ".join(LABELS[m] for m in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for d in dists:
        cells = [f"{ratios[d, m]:.2f} ({results[d, m]['wall_s']:.0f} s)" if (d, m) in ratios else "failed" for m in methods]
        print(f"| {d} | {base[d][1] / base[d][0]:.2f} | " + " | ".join(cells) + " |")
    worst = {m: max((ratios.get((d, m), math.inf) for d in dists)) for m in methods}
    print("| worst | | " + " | ".join(f"{worst[m]:.2f}" for m in methods) + " |")
    above = [f"{LABELS[m].split(' (')[0]} on {d} {r:.3f}" for (d, m), r in ratios.items() if r > 0.35]
    print("above 0.35 (unrounded; red in the grid): " + (", ".join(above) if above else "none"))
    if args.draws > 1 and ratios:
        spread = sorted((float(np.std(results[j]["ratios"])), j) for j in ratios)
        print(f"each cell: the mean over {args.draws} draws of 4,096 samples; the standard deviation of one draw's "
              f"ratio: median {spread[len(spread) // 2][0]:.3f}, largest {spread[-1][0]:.3f} "
              f"({' '.join(spread[-1][1])})")
    if args.curve_every:
        print(f"\none-step ratio along each run, every {args.curve_every} steps: step EMA (online weights)")
        for (d, m), r in results.items():
            if r["rc"] == 0:
                r["curve"] = curve(r["out"], held_out[d], base[d][0])
                print(f"{d} {m}: " + "  ".join(f"{k} {e:.2f} ({o:.2f})" for k, e, o in r["curve"]), flush=True)
    save_grid(os.path.join(args.out, "grid.png"), dists, methods, held_out, samples, ratios)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), baselines={d: dict(gaussian=g, floor=fl) for d, (g, fl) in base.items()},
                       runs={f"{d}/{m}": dict(r, ratio=ratios.get((d, m))) for (d, m), r in results.items()}), f, indent=1)
    print(f"wrote {args.out}/grid.png, {args.out}/results.json")


if __name__ == "__main__":
    main()
