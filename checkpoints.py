"""Run folders and checkpoints: creating and locking a run folder, the config record, atomic saves, loading with
validation, and the nets other runs lend (teacher, --init, --stage1). train.py, fid.py and convert.py import this
module; it imports none of them.

A run folder OUT holds run.lock (while a process trains in it), config.json, ckpt.pt, metrics.jsonl, curves.png and
samples.
What is guaranteed (each point is a test in tests/test_runs.py):
  * ckpt.pt is written to ckpt.pt.tmp and renamed, so a kill at any moment leaves the old checkpoint or the new one;
    a leftover ckpt.pt.tmp is removed when the folder is next claimed.
  * A run owns OUT from its first moment: run.lock is created with O_EXCL and holds the pid and host. A lock whose
    process no longer runs on this host is stale: it is removed with a notice; any other lock stops the new run.
  * A run folder holds only the run: a new run needs an OUT that does not exist or is empty (but for a stale lock and
    temp files of ours), never equal to or inside its data, and run folders are not data (check_out, before anything
    is created; claim_run_dir again under the lock). A failed write removes its temp file: one-line error, the old
    file kept.
  * --resume continues in place only a run folder (or its ckpt.pt), else into a new OUT; it checks the method, net,
    seed, data shape, label_dim and cond against the checkpoint, restores the saved config, applies flags given on the
    command line with a notice, and cuts metrics.jsonl back to the checkpoint's step.
"""
import contextlib
import copy
import importlib
import json
import os
import socket

import torch
import torch.distributed as dist

import augment
import nets
from cli import UsageError

LOCK = "run.lock"
RUN_FILES = ("ckpt.pt", "config.json", "metrics.jsonl")
TEMPS = tuple(f + ".tmp" for f in (*RUN_FILES, "curves.png"))  # a killed write's leftovers, removed when claimed
METHOD_NAMES = ("meanflow", "scm", "cm", "tcm", "diffusion", "shortcut", "flowmap")


def method_module(name):
    """The method file a flag or a checkpoint's config names; only the listed names are ever imported."""
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return importlib.import_module(name)


# --- Checkpoint files --------------------------------------------------------------------------------------------


def atomic_save(state, path):
    """torch.save to path.tmp, flushed to disk, then renamed over path: a crash leaves the old file or the new one, and a
    failed write (a full disk) the old file, no temp, and a one-line error."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(_write_failed(path, tmp, e)) from None


def _write_failed(path, tmp, e):
    """The message for a failed atomic write, after removing its temp file."""
    with contextlib.suppress(OSError):
        os.remove(tmp)
    kept = f"; the previous {os.path.basename(path)} is kept" if os.path.exists(path) else ""
    return f"cannot write {path} ({e.strerror or e}){kept}"


def save_checkpoint(path, states, step, cfg):
    """The state_dicts (net, ema: a list, opt) + the resolved config, saved atomically."""
    atomic_save(dict(states, step=step, config=cfg), path)


def save_snapshot(out, states, step, cfg):
    """The weights alone (online net and EMAs, no optimizer state) as <out>/snapshots/ckpt-STEP.pt, kept: loadable
    wherever a checkpoint is read (--init, --teacher, --stage1, benchmarks/toy_suite.py --curve-every), not by
    --resume."""
    os.makedirs(os.path.join(out, "snapshots"), exist_ok=True)
    path = os.path.join(out, "snapshots", f"ckpt-{step:07d}.pt")
    atomic_save(dict(net=states["net"], ema=states["ema"], step=step, config=cfg), path)
    return path


def load_checkpoint(path, device):
    """A checkpoint file (or a run folder's ckpt.pt), read with weights_only=True, or an export of convert.py
    (.safetensors), checked for its keys."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        if path.endswith(".safetensors"):
            state = load_safetensors(path, device)
        else:
            state = torch.load(path, map_location=device, weights_only=True)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path} ({type(e).__name__})") from None
    missing = [k for k in ("net", "ema", "step", "config") if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["config"], dict) or "method" not in state["config"] or not state["ema"]:
        raise UsageError(f"{path} is not a checkpoint of this repository (missing {', '.join(missing) or 'config/ema'})")
    return state


def safetensors_torch(why):
    """The optional safetensors package (its torch functions), or a one-line UsageError with the install line."""
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError:
        raise UsageError(f"{why} needs the safetensors package: pip install safetensors") from None


def load_safetensors(path, device):
    """An export of `python convert.py export` in a checkpoint's layout: its weights as net and as the one EMA, the
    config and step from its metadata (JSON text). safetensors holds raw tensors and a JSON header: no pickle runs."""
    safetensors_torch(f"reading {path}")
    with importlib.import_module("safetensors").safe_open(path, framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    try:
        return dict(net=weights, ema=[weights], step=int(meta["step"]), config=json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError):
        raise UsageError(f"{path} is not an export of this repository (python convert.py export): its metadata lacks "
                         f"the config and step") from None


def load_weights(module, weights, what, strict=True):
    """load_state_dict, with a one-line error naming the checkpoint and the first keys that do not fit (missing,
    unexpected with strict, of another shape always)."""
    own = module.state_dict()
    problems = []
    if strict:
        missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
        problems += [f"missing {_first(missing)}"] if missing else []
        problems += [f"unexpected {_first(unexpected)}"] if unexpected else []
    shapes = [f"{k} {tuple(weights[k].shape)} vs the net's {tuple(own[k].shape)}" for k in own
              if k in weights and torch.is_tensor(weights[k]) and weights[k].shape != own[k].shape]
    problems += [f"shape of {_first(shapes)}"] if shapes else []
    if problems:
        raise UsageError(f"{what} does not fit this data/net ({type(module).__name__}): {'; '.join(problems)}")
    try:
        return module.load_state_dict(weights, strict=strict)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{what} does not fit this data/net: {str(e).splitlines()[0]}") from None


def _first(keys, n=3):
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# --- Nets from configs and from other runs --------------------------------------------------------------------------


def build_net(cfg, method, shape, label_dim):
    """The net a resolved config describes, with what the method needs (r input, log-variance head)."""
    if not isinstance(cfg["net"], str) or cfg["net"] not in nets.NETS:
        raise UsageError(f"unknown net {cfg['net']!r}; choose from {', '.join(nets.NETS)}")
    overrides = {} if cfg["dropout"] is None else dict(dropout=cfg["dropout"])
    if cfg.get("dropout_res") is not None:
        if nets.NETS[cfg["net"]][0] is not nets.EDM2UNet:
            raise UsageError(f"--dropout-res applies to EDM2 nets only, not {cfg['net']}")
        overrides.update(dropout_res=tuple(int(res) for res in cfg["dropout_res"]))
    if cfg.get("augment", 0) > 0:
        overrides["augment_dim"] = augment.label_dim(cfg["augment_pipe"])
    overrides.update(cfg.get("net_kwargs", {}))  # converted checkpoints: settings that differ from the registry's
    try:
        needs = method.net_needs(cfg) if hasattr(method, "net_needs") else method.NET_NEEDS  # a config's needs
        return nets.build_net(cfg["net"], shape, label_dim=label_dim, **needs, **overrides)
    except ValueError as e:  # unknown net, or a net that does not fit the data
        raise UsageError(str(e)) from None


def load_compatible(path, method, device, role, cfg):
    """A checkpoint whose method is in method.TEACHERS (role "teacher") or method.INIT (role "init"), with the run's
    sigma_data."""
    state = load_checkpoint(path, device)
    other = state["config"]["method"]
    allowed = method.TEACHERS if role == "teacher" else method.INIT
    if other not in allowed:
        raise UsageError(f"{method.__name__} cannot use a {other} checkpoint as --{role} ({path}); "
                         f"it takes {', '.join(allowed)} checkpoints")
    check_sigma_data(state["config"], cfg, f"--{role}", path)
    return state


def check_sigma_data(saved, cfg, flag, path):
    """A net read through EDM's preconditioning (c_in, c_skip, c_out) is a different denoiser under another
    sigma_data, so a teacher, --init or --stage1 checkpoint must have the run's (methods without one: no check)."""
    theirs, ours = saved.get("sigma_data"), cfg.get("sigma_data")
    if theirs is not None and ours is not None and theirs != ours:
        raise UsageError(f"{flag} {path} was trained with sigma_data {theirs} and this run has {ours}; "
                         f"its net would be read as another denoiser (pass --sigma-data {theirs})")


def frozen_ema(state, shape, label_dim, device, what, i=0):
    """EMA i of a checkpoint as the net its own method builds, frozen, in eval mode. A log-variance head that method
    does not use (an EDM2 checkpoint's, in a diffusion teacher) is dropped."""
    cfg = state["config"]
    net = build_net(cfg, method_module(cfg["method"]), shape, label_dim).to(device)
    keys = net.state_dict().keys()
    load_weights(net, {k: v for k, v in state["ema"][i].items() if not k.startswith("logvar") or k in keys}, what)
    return net.eval().requires_grad_(False)


def load_teacher(path, method, ds, label_dim, device, cfg):
    """The first EMA net of a checkpoint, frozen, in eval mode; a diffusion model taught to a student whose net has
    an r input (a flow map) is read as its flow velocity u(z, t, r) = v(z, t) (diffusion.FlowVelocity)."""
    state = load_compatible(path, method, device, "teacher", cfg)
    net = frozen_ema(state, ds.shape, label_dim if state["config"]["cond"] else 0, device, f"teacher {path}")
    if state["config"]["method"] == "diffusion" and method.NET_NEEDS.get("use_r"):
        net = method_module("diffusion").FlowVelocity(net, state["config"]["sigma_data"]).eval()
    return net


def load_stage1(path, method, net, device, cfg, init):
    """TCM: the stage-1 run's online weights (the reference's configs) or first EMA (its method template) start the
    student and, as copies of it, every EMA. Returns a frozen copy in train mode (dropout on, as the reference) and the
    stage-1 step count, from which a power-function EMA's step counter continues (as in FastGen 34f30e8:
    fastgen/trainer.py, Trainer.load_pretrained_ckpt sets resume_iter, which fastgen/callbacks/ema.py,
    EMACallback._total_iteration adds to the step; tests/test_train.py checks the decay)."""
    state = load_checkpoint(path, device)
    if state["config"]["method"] not in method.STAGE1:
        raise UsageError(f"--stage1 must be a {' or '.join(method.STAGE1)} run; {path} is {state['config']['method']}")
    check_sigma_data(state["config"], cfg, "--stage1", path)
    weights = state["net"] if cfg["stage1_weights"] == "online" else state["ema"][0]
    stage1 = copy.deepcopy(net)
    load_weights(stage1, weights, f"--stage1 {path}")
    if init:
        net.load_state_dict(weights)
    return stage1.train().requires_grad_(False), state["step"]


def init_from(net, path, method, device, rank, cfg, flag="--init", state=None):
    """Copy a checkpoint's first EMA (of `state`, when already loaded) into net. Only the log-variance head may
    differ: a diffusion model's net lacks one (it stays freshly initialised), an EDM2 checkpoint's is dropped by
    methods without one."""
    if state is None:
        state = load_compatible(path, method, device, "init", cfg)
    weights = init_weights(net, state)
    missing, unexpected = load_weights(net, weights, f"{flag} {path}", strict=False)
    if any(not k.startswith("logvar") for k in missing + unexpected):
        raise UsageError(f"{flag} {path} does not fit this net: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if rank == 0:
        print(f"initialised from {path}" + (f" (new: {', '.join(missing)})" if missing else ""))


def init_weights(net, state):
    """The checkpoint's first EMA as net would take it: an unaugmented student drops the augment map (it only ever
    sees zeros)."""
    weights = state["ema"][0]
    if "map_augment.weight" not in net.state_dict():
        weights = {k: v for k, v in weights.items() if not k.startswith("map_augment.")}
    return weights


def init_from_teacher(net, path, method, device, rank, cfg):
    """Distillation without --init: the student starts from the teacher's first EMA, as distillation recipes do,
    where the student can take it (the teacher's method is one --init accepts and every weight but the log-variance
    head has the student's shape); otherwise it starts from scratch, with a notice. Returns whether it did."""
    state = load_compatible(path, method, "cpu", "teacher", cfg)
    why = f"its method {state['config']['method']} is not one {method.__name__} starts from"
    if state["config"]["method"] in method.INIT:
        ours = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("logvar")}
        theirs = {k: v.shape for k, v in init_weights(net, state).items() if not k.startswith("logvar")}
        why = None if ours == theirs else f"its net {state['config']['net']} differs from the student's {cfg['net']}"
    if why is None:
        init_from(net, path, method, device, rank, cfg, flag="--teacher", state=state)
    elif rank == 0:
        print(f"the student starts from scratch, not from the teacher {path}: {why} (--init PATH sets its weights)")
    return why is None

# --- Resume ---------------------------------------------------------------------------------------------------------


def resume_config(saved, cfg, given, path):
    """The run's saved config with the flags given on the command line (`given`) applied; returns (config, notices).
    Refused: another method, net, cond or number of EMAs, another --preset (it would change every default) and another
    --seed (the sample order, noise and dropout masks follow it, so the run would not continue)."""
    if saved["method"] != cfg["method"]:
        raise UsageError(f"{path} is a {saved['method']} run, not {cfg['method']}: resume it with --method {saved['method']}")
    out, notices = {**cfg, **saved}, []
    for k in sorted(given):
        if k in ("net", "cond", "preset", "seed") and cfg[k] != saved.get(k):
            raise UsageError(f"--{k} {cfg[k]} differs from the run's {saved.get(k)} ({path}): a resumed run keeps its "
                             f"{k}; drop the flag or start a new run")
        if k == "ema" and len(cfg[k]) != len(saved[k]):
            raise UsageError(f"--ema lists {len(cfg[k])} EMAs, the run {path} has {len(saved[k])}")
        if out[k] != cfg[k]:
            if k != "steps":
                notices.append(f"--{k.replace('_', '-')} {cfg[k]} replaces the run's {out[k]}")
            out[k] = cfg[k]
    return out, notices


def check_resume_data(saved, shape, label_dim, path):
    for k, now in (("shape", list(shape)), ("label_dim", label_dim)):
        if k in saved and saved[k] != now:
            raise UsageError(f"{path} was trained on data with {k} {saved[k]}; this data has {now}")


def load_resumable(path, device):
    """The checkpoint --resume continues: one with optimizer state (not a snapshot or a converted checkpoint)."""
    state = load_checkpoint(path, device)
    if "opt" not in state:
        raise UsageError(f"{path} holds no optimizer state (a converted checkpoint or a snapshot?): start a run with "
                         f"--init {path}")
    return state


def restore_weights(state, net, emas, path):
    """--resume: the online net and the EMAs (whole; train.py shards them after, under --fsdp)."""
    load_weights(net, state["net"], f"--resume {path}")
    if len(state["ema"]) != len(emas):
        raise UsageError(f"{path} holds {len(state['ema'])} EMAs, this run has {len(emas)}")
    for ema, weights in zip(emas, state["ema"]):
        load_weights(ema, weights, f"--resume {path}")


def restore_optimizer(opt, opt_state, path):
    try:
        opt.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise UsageError(f"--resume {path}: the optimizer state does not fit ({e})") from None

# --- Run folders ----------------------------------------------------------------------------------------------------


def new_run_dir(method, data_name):
    i = 0
    while os.path.exists(os.path.join("runs", f"{method}-{data_name}-{i:03d}")):
        i += 1
    return os.path.join("runs", f"{method}-{data_name}-{i:03d}")


def run_dir_of(path):
    """The folder of a run given as a folder or as its checkpoint file."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def check_out(out, resume, data_spec):
    """Before anything is created: the folder a run will write (--out, or --resume's folder, or a new one under runs/)
    can hold it, and it neither lies inside nor holds the data. A new run needs a folder that does not exist or is
    empty (but for a lock and temp files of ours); continuing in place needs --resume to name a run folder or its
    ckpt.pt; --data must not be a run folder. claim_run_dir checks the folder again under the lock."""
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    in_place = resume is not None and (out is None or _same_path(out, run_dir_of(resume)))
    target = run_dir_of(resume) if in_place else out
    if data_spec not in ("toy", "cifar10") and os.path.exists(data_spec):  # built in, or a path (data.load checks it)
        data_path, out_path = os.path.realpath(data_spec), os.path.realpath(target or "runs")
        if out_path == data_path or out_path.startswith(data_path + os.sep):
            raise UsageError(f"the run folder {target or 'runs/'} would lie inside --data {data_spec}: "
                             f"choose an --out outside the data")
        if target is not None and data_path.startswith(out_path + os.sep):
            raise UsageError(f"--data {data_spec} lies inside the run folder {target}, which the run writes into: "
                             f"copy the data elsewhere")
        if os.path.isdir(data_spec) and _is_run_folder(data_spec, lock=True):
            raise UsageError(f"--data {data_spec} is a run folder (config.json with ckpt.pt or {LOCK}), not a dataset")
    if in_place:
        if os.path.isfile(resume) and os.path.basename(resume) != "ckpt.pt" or not _is_run_folder(target):
            raise UsageError(f"--resume {resume} is not a run folder or its ckpt.pt, so it cannot continue in place: "
                             f"pass --out NEW to continue it in a new folder")
    elif target is not None and os.path.isdir(target) and not os.path.exists(os.path.join(target, LOCK)):
        refusal = foreign_files(target)  # with a lock, claim_run_dir first names the run that holds it
        if refusal:
            raise UsageError(refusal)


def _same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def _is_run_folder(folder, lock=False):
    """config.json with ckpt.pt (or, with lock, run.lock: a run before its first checkpoint)."""
    names = os.listdir(folder)
    return "config.json" in names and ("ckpt.pt" in names or lock and LOCK in names)


def foreign_files(out):
    """Why a new run may not start in the existing folder OUT (None: it may): a folder holds one run and nothing else,
    so anything but a lock and temp files of ours stops it."""
    names = sorted(set(os.listdir(out)) - {LOCK, *TEMPS})
    found = [f for f in RUN_FILES if f in names]
    if "ckpt.pt" in found:
        return f"{out} already holds a run; pass --resume {out} or choose another --out"
    if found:
        return f"{out} holds {', '.join(found)} of a run without a checkpoint; delete them or choose another --out"
    if names:
        return (f"{out} is not empty (it holds {_first(names)}): a new run needs a new or empty folder; "
                f"choose another --out")
    return None


def _lock_holder(lock):
    """(pid, host) written in a lock file, or None if it cannot be read."""
    try:
        with open(lock) as f:
            holder = json.load(f)
        return int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _create_lock(lock):
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise
    except OSError as e:  # a read-only folder or file system
        raise UsageError(f"cannot write in the run folder {os.path.dirname(lock)} ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        json.dump(dict(pid=os.getpid(), host=socket.gethostname()), f)


def claim_run_dir(out, resume_step=None):
    """Create (if needed) and lock OUT for this process. A new run (resume_step None) needs a folder without another
    run's files; a resumed run's metrics.jsonl is cut back to resume_step. Returns a function that releases OUT."""
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run folder {out}: {e.strerror}") from None
    lock = os.path.join(out, LOCK)
    try:
        try:
            _create_lock(lock)
        except UsageError:
            if created:
                os.rmdir(out)
            raise
    except FileExistsError:
        holder = _lock_holder(lock)
        here = socket.gethostname()
        if holder is None or holder[1] != here or _running(holder[0]):
            who = "an unreadable lock" if holder is None else f"pid {holder[0]} on {holder[1]}"
            raise UsageError(f"{out} is in use by {who} ({lock}); wait for that run or choose another --out "
                             f"(delete {lock} only if no process uses the folder)") from None
        os.remove(lock)  # a killed run's: its pid no longer runs on this host
        print(f"{out}: removed the stale {LOCK} of pid {holder[0]}, which no longer runs (a killed run)")
        try:
            _create_lock(lock)
        except FileExistsError:
            raise UsageError(f"{out} was claimed by another process just now; choose another --out") from None

    def release():
        if _lock_holder(lock) == (os.getpid(), socket.gethostname()):
            os.remove(lock)
        if created and not os.listdir(out):
            os.rmdir(out)

    try:
        if resume_step is None:
            refusal = foreign_files(out)
            if refusal:
                raise UsageError(refusal)
        else:
            trim_metrics(os.path.join(out, "metrics.jsonl"), resume_step)
        for tmp in TEMPS:
            if os.path.exists(os.path.join(out, tmp)):
                os.remove(os.path.join(out, tmp))  # half of a killed write
    except BaseException:
        release()
        raise
    return release


@contextlib.contextmanager
def run_folder(out, resume, step, name, ddp, rank):
    """The run folder, claimed by rank 0 and released on exit; every rank learns the folder or the refusal. When out is
    None: the folder of `resume`, or a new runs/<method>-<data>-NNN. A resumed run's own folder is continued at `step`."""
    out = out or (run_dir_of(resume) if resume else None)
    outcome, release = [out, None], None
    if rank == 0:
        try:
            outcome[0] = out = out or new_run_dir(*name)
            same = resume is not None and os.path.realpath(out) == os.path.realpath(run_dir_of(resume))
            release = claim_run_dir(out, step if same else None)
        except UsageError as e:
            outcome[1] = str(e)
    if ddp:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1]:
        raise UsageError(outcome[1])
    try:
        yield outcome[0]
    finally:
        if release is not None:
            release()


def trim_metrics(path, step):
    """Keep the records up to `step` (a resumed run logs the later ones again); a torn last line is dropped."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if keep != lines:
        write_atomic(path, "".join(keep))


def write_atomic(path, text):
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise UsageError(_write_failed(path, path + ".tmp", e)) from None


def append_metrics(out, record):
    """One JSON line of <out>/metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def write_config(out, cfg):
    """config.json: the resolved config a run trains with (also inside every checkpoint)."""
    write_atomic(os.path.join(out, "config.json"), json.dumps(cfg, indent=2))
