"""Convert official pretrained diffusion checkpoints into this repository's checkpoint format.

    python convert.py edm-cifar10-32x32-uncond-vp.pkl ckpt/edm-cifar10-uncond-vp.pt
    python convert.py edm2-img64-s-1073741-0.075.pkl ckpt/edm2-img64-s.pt --sha256 HEX   # verify the download
    python convert.py DiT-XL-2-256x256.pt ckpt/dit-xl2.pt
    python train.py --method cm --data cifar10 --init ckpt/edm-cifar10-uncond-vp.pt       # then use it
    python convert.py export runs/cm-c10 --to cm-c10.safetensors [--ema 1]                # a run's EMA, to share

Supported files. Layouts: EDM's network snapshots are pickled dicts with the keys ema, loss_fn, augment_pipe and
dataset_kwargs (NVlabs/edm `training/training_loop.py`; nets from its `training/networks.py`); EDM2's post-hoc EMA
files are pickled dicts too, the net in fp16 under ema (NVlabs/edm2 `reconstruct_phema.py`; nets from its
`training/networks_edm2.py`); DiT's are state dicts (nets from facebookresearch/DiT `models.py`).

| file | URL | our net | licence of the weights |
|---|---|---|---|
| EDM `edm-cifar10-32x32-{uncond,cond}-vp.pkl` | https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/ | ddpmpp | CC BY-NC-SA 4.0 |
| EDM `edm-imagenet-64x64-cond-adm.pkl` | same folder | adm | CC BY-NC-SA 4.0 |
| EDM2 `edm2-img64-{s,m,l,xl}-*.pkl` | https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/ | edm2-s ... edm2-xl | CC BY-NC-SA 4.0 |
| DiT `DiT-XL-2-256x256.pt` (or a DiT training checkpoint: its `ema`) | https://dl.fbaipublicfiles.com/DiT/models/ | dit-xl2 | CC BY-NC 4.0 |

EDM trained the CIFAR-10 files with its default preconditioning (its README: `--arch=ddpmpp`; "vp" names the DDPM++
architecture), so they record EDMPrecond, as ADM does; EDM2's record its Precond. convert.py prints the class each file
records and notes any other.

Licences as stated by the NVlabs/edm and NVlabs/edm2 READMEs ("All material, including source code and pre-trained
models") and the facebookresearch/DiT README ("code and model weights"): non-commercial use only, and the converted
file is a derivative of the weights under the same terms.

The output is `{net: state_dict, ema: [state_dict], step: 0, config: {...}}`, tensors and plain data only, so
`torch.load(weights_only=True)` reads it and train.py's --init and --teacher take it as a "diffusion" checkpoint.
The NVIDIA pickles are read by a restricted unpickler that never runs the source code they embed (the original
loader, `_reconstruct_persistent_obj` in NVlabs/edm `torch_utils/persistence.py`, would exec it); still, pickle calls
the allowed rebuild functions, so convert only files you trust. DiT training checkpoints go through torch's
weights-only loader with one addition, their `argparse.Namespace` (read as a plain dict). Every failure is one line
and exit status 1.

`export` writes one EMA of a run (or of any checkpoint above) as safetensors: the state dict, plus the run's config
(JSON text) and step as the file's metadata. Any safetensors reader loads it without pickle; train.py's --init,
--teacher, --stage1 and fid.py calc take it as they take a checkpoint (checkpoints.load_safetensors). It needs the
optional package: pip install safetensors.
"""
import argparse
import collections
import contextlib
import importlib
import inspect
import io
import json
import os
import pickle
import re
import struct
import sys
import zipfile

import torch

import checkpoints
import data
import nets
from cli import UsageError


class ConvertError(Exception):
    pass


def one_line(e):
    """The reason in an exception's message, on one line: torch's weights-only errors are paragraphs of advice, with
    terminal colour codes, around one line that says what was refused."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line] or [type(e).__name__]
    why = next((line for line in lines if "WeightsUnpickler error:" in line or "unsupported GLOBAL" in line), lines[0])
    return why.split("WeightsUnpickler error: ")[-1].split(" Please use ")[0]

# --- Restricted unpickler (for NVlabs/edm `torch_utils/persistence.py` pickles) ------------------------------


class Persistent:
    """An object pickled by NVIDIA's torch_utils.persistence. Keeps `meta` (type, version, module_src, class_name,
    state); the original loader would exec meta['module_src'], we only read meta['state']."""

    def __init__(self, meta):
        self.meta = meta

    @property
    def class_name(self):
        return self.meta.get("class_name")

    @property
    def state(self):
        return self.meta.get("state") or {}


class Container:
    """A torch.nn container (ModuleDict, ...) rebuilt without torch.nn: pickle creates it empty and hands it its
    __dict__, which we keep as `state`."""

    def __setstate__(self, state):
        self.state = state


def _reconstruct_persistent(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or "state" not in meta:
        raise pickle.UnpicklingError("persistent object without class metadata")
    return Persistent(meta)


def _storage_from_bytes(b):
    # Deviation from torch.storage._load_from_bytes, which torch.load()s the embedded bytes with weights_only=False
    # (any pickle inside would run): the embedded torch.save of one storage needs nothing beyond weights_only.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


# numpy pickles a scalar as scalar(dtype, raw bytes) and a dtype as dtype(spec, align, copy) followed by BUILD with a
# state tuple whose second item is the byte order. EDM's nets hold such scalars (np.sqrt(0.5) as skip_scale, ...) in
# module attributes and recorded kwargs. We rebuild numeric ones here, as Python numbers, with struct; numpy is never
# called, and any other dtype (object, string, void, datetime, ...) is refused.
NUMPY_NUMERIC = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q",
                 "f2": "e", "f4": "f", "f8": "d"}  # numpy dtype spec -> struct format


class NumpyDtype:
    """A numeric numpy dtype as pickled: `spec` ('f8', ...) and the byte order ('<', '>', '|', '=')."""

    def __init__(self, spec, align=False, copy=True):
        if not (isinstance(spec, str) and spec in NUMPY_NUMERIC):
            raise pickle.UnpicklingError(f"refusing numpy dtype {spec!r} (only numeric scalars are read)")
        self.spec, self.order = spec, "|"

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]): plain numbers have
        # no subarray, names or fields.
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError(f"refusing numpy dtype {self.spec!r} with state {state!r:.80}")
        self.order = state[1]


def _numpy_scalar(dtype, raw):
    if not isinstance(dtype, NumpyDtype) or not isinstance(raw, bytes):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not a numeric dtype with its raw bytes")
    order = "<" if dtype.order == "|" else dtype.order  # '|': one byte, order irrelevant
    (value,) = struct.unpack(order + NUMPY_NUMERIC[dtype.spec], raw)
    return value


# Everything an EDM/EDM2 network pickle needs. A plain pickle.dump of a module stores each tensor as
# _rebuild_tensor_v2(storage, ...) or _rebuild_parameter(tensor, ...), each storage as _load_from_bytes(torch.save
# bytes) (the typed storage classes such as torch.FloatStorage / HalfStorage appear only inside those bytes, read
# by torch's own weights_only loader), and module hook tables as OrderedDicts.
ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1.x, every released EDM/EDM2 file
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
    ("numpy", "dtype"): NumpyDtype,
    **{("torch.nn.modules.container", name): Container
       for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")},
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not needed for network weights)")
        return ALLOWED[(module, name)]


def flatten(module, prefix=""):
    """{dotted.name: tensor} from a Persistent/Container tree, as module.state_dict() would list them."""
    state = module.state if isinstance(module, (Persistent, Container)) else {}
    skip = state.get("_non_persistent_buffers_set") or set()
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and not (group == "_buffers" and name in skip):
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flatten(child, f"{prefix}{name}."))
    return out

# --- Reading the sources ----------------------------------------------------------------------------------------

# Constructor defaults of the official classes: `_init_kwargs` records only the arguments that were passed.
# channels_per_head is fixed to 64 inside EDM's DhariwalUNet and a block default (overridable) in EDM2.
EDM_DEFAULTS = {
    "SongUNet": dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                     channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                         attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0, channels_per_head=64),
    "UNet": dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, channels_per_head=64,
                 dropout=0),
}
# Design choices our nets hard-code; a checkpoint with other values (e.g. EDM's NCSN++ "-ve" nets) has no match here.
FIXED = {"SongUNet": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                          decoder_type="standard", resample_filter=[1, 1])}
OUR_CLASS = {"SongUNet": "SongUNet", "DhariwalUNet": "DhariwalUNet", "UNet": "EDM2UNet", "DiT": "DiT"}
NOT_STRUCTURAL = {"dropout", "label_dropout", "img_resolution", "img_channels", "in_channels", "out_channels",
                  "label_dim", "augment_dim", "use_r", "logvar", "learn_sigma", "dropout_res"}




def read_source(path):
    """(weights {name: fp32 tensor}, source info dict) from an EDM/EDM2 pickle or a DiT .pt file."""
    if zipfile.is_zipfile(path):
        return read_dit(path)
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # every pickle of protocol 2 or later starts with the PROTO opcode
            raise ConvertError(f"{path} is neither a pickle nor a torch .pt (zip) file")
        f.seek(0)
        try:
            top = RestrictedUnpickler(f).load()
        except Exception as e:  # a malformed or refused pickle: UnpicklingError, EOFError, struct.error, ...
            raise ConvertError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(top, dict) or not isinstance(top.get("ema"), Persistent):
        raise ConvertError(f"{path}: expected an EDM/EDM2 network pickle (a dict with an 'ema' network)")
    ema = top["ema"]
    modules = ema.state.get("_modules") or {}
    if isinstance(modules.get("model"), Persistent):  # EDM: EDMPrecond / VPPrecond(model=SongUNet | DhariwalUNet)
        inner, prefix = modules["model"], "model."
    elif isinstance(modules.get("unet"), Persistent):  # EDM2: Precond(unet=UNet, logvar_fourier, logvar_linear)
        inner, prefix = modules["unet"], "unet."
    else:
        raise ConvertError(f"{path}: unknown network class {ema.class_name!r} (expected EDM or EDM2 preconditioning)")
    if inner.class_name not in EDM_DEFAULTS:
        raise ConvertError(f"{path}: unknown network class {inner.class_name!r}; supported: {', '.join(EDM_DEFAULTS)}")
    weights = {k.removeprefix(prefix): v.float() if v.is_floating_point() else v for k, v in flatten(ema).items()}
    kwargs = {**EDM_DEFAULTS[inner.class_name], **dict(inner.state.get("_init_kwargs") or {})}
    info = dict(format="edm2-pkl" if prefix == "unet." else "edm-pkl", precond=ema.class_name,
                precond_kwargs=dict(ema.state.get("_init_kwargs") or {}), net_class=inner.class_name, net_kwargs=kwargs)
    return weights, info


class Namespace:
    """argparse.Namespace in a DiT training checkpoint, as plain data: pickle hands it its __dict__, kept as `state`."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("argparse.Namespace without a dict state")
        self.state = state


def read_dit(path):
    try:
        with torch.serialization.safe_globals([(Namespace, "argparse.Namespace")]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"cannot read {path} as a weights-only torch file: {one_line(e)}") from None
    train_args = {}
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):  # a DiT training checkpoint {model, ema, opt, args}
        train_args = getattr(obj.get("args"), "state", {})  # a Namespace (or None if args was empty)
        obj = obj["ema"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConvertError(f"{path}: expected a DiT state dict or a training checkpoint with an 'ema' state dict")
    if "x_embedder.proj.weight" not in obj:
        raise ConvertError(f"{path}: unknown network class (no x_embedder.proj.weight: not a DiT state dict)")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}
    # DiT files record no config: read it from the shapes (num_heads cannot be read; the registry entry decides).
    try:
        hidden_size, in_channels, patch, _ = weights["x_embedder.proj.weight"].shape
        tokens = weights["pos_embed"].shape[-2]
        kwargs = dict(img_resolution=int(round(tokens**0.5)) * patch, in_channels=in_channels,
                      label_dim=weights["y_embedder.embedding_table.weight"].shape[0] - 1,  # last row: the null label
                      learn_sigma=weights["final_layer.linear.weight"].shape[0] == 2 * in_channels * patch**2,
                      hidden_size=hidden_size, patch_size=patch,
                      depth=len({k.split(".")[1] for k in weights if k.startswith("blocks.")}),
                      mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ConvertError(f"{path}: not a DiT state dict ({type(e).__name__}: {one_line(e)})") from None
    return weights, dict(format="dit-pt", precond=None, precond_kwargs={}, net_class="DiT", net_kwargs=kwargs,
                         train_args=train_args)

# --- Mapping to our nets --------------------------------------------------------------------------------------


def _plain(v):
    """JSON-comparable form (tuples as lists, numbers as floats)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def mismatches(name, source_kwargs, net_class):
    """The recorded constructor arguments that differ from registry entry `name` (our defaults filled in)."""
    cls, registry_kwargs = nets.NETS[name]
    ours = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    ours.update(registry_kwargs)
    ours.update(FIXED.get(net_class, {}))
    return [f"{k}={source_kwargs[k]!r} (ours: {ours[k]!r})" for k in sorted(set(ours) & set(source_kwargs))
            if k not in NOT_STRUCTURAL and _plain(source_kwargs[k]) != _plain(ours[k])]


def match_net(info, net_name=None):
    """The registry name whose config matches the source's recorded kwargs, or a ConvertError saying what differs."""
    cls_name = OUR_CLASS[info["net_class"]]
    candidates = [n for n, (cls, _) in nets.NETS.items() if cls.__name__ == cls_name]
    if not candidates:
        raise ConvertError(f"nets.py has no {cls_name} for this {info['net_class']} checkpoint")
    if net_name is not None:
        if net_name not in candidates:
            raise ConvertError(f"--net {net_name} is not a {cls_name}; choose from {', '.join(candidates)}")
        candidates = [net_name]
    found = {n: mismatches(n, info["net_kwargs"], info["net_class"]) for n in candidates}
    good = [n for n, bad in found.items() if not bad]
    if not good:
        raise ConvertError("config mismatch: " + "; ".join(f"{n}: {', '.join(bad)}" for n, bad in found.items()))
    return good[0]


def to_our_net(weights, info, net_name=None):
    """(state_dict, config) for our net, checked by a strict load into the net built from that config."""
    kw, notes = info["net_kwargs"], []
    if info["format"] == "dit-pt":
        shape, label_dim = [kw["in_channels"], kw["img_resolution"], kw["img_resolution"]], kw["label_dim"]
        net_kwargs = {} if kw["learn_sigma"] else dict(learn_sigma=False)  # official DiT: learn_sigma, our default
        notes.append("DiT is a DDPM epsilon/variance-prediction model (1000 discrete steps), not EDM-preconditioned")
    else:
        channels = kw.get("in_channels", kw.get("img_channels", info["precond_kwargs"].get("img_channels")))
        res = kw.get("img_resolution", info["precond_kwargs"].get("img_resolution"))
        shape, label_dim, net_kwargs = [channels, res, res], kw.get("label_dim", 0), {}
    if kw.get("augment_dim"):
        # Kept: EDM's CIFAR-10 nets see augment.py's "edm" labels (9-d); zero at sampling, as aug=None is.
        net_kwargs["augment_dim"] = kw["augment_dim"]
    if info["precond"] not in (None, "EDMPrecond", "Precond"):  # EDMPrecond: EDM's default; Precond: EDM2's
        notes.append(f"the file records {info['precond']}, not EDM preconditioning; as an EDM-preconditioned net it "
                     "is an initialisation for consistency tuning, not an accurate EDM denoiser")
    if _plain(kw.get("dropout", 0)):
        notes.append(f"trained with dropout {kw['dropout']}; use it in eval mode as a teacher (train.py does)")
    name = match_net(info, net_name)
    logvar = any(k.startswith("logvar") for k in weights)
    with torch.device("meta"):  # shapes only, nothing allocated (EDM2-XL has 1.1 B parameters)
        net = nets.build_net(name, shape, label_dim=label_dim, use_r=False, logvar=logvar, **net_kwargs)
    try:
        net.load_state_dict(weights, strict=True, assign=True)  # assign: no copy into meta tensors
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ConvertError(f"config mismatch: the weights do not fit {name}: {detail[:300]}") from None
    source = dict(**{k: v for k, v in info.items() if k != "format"}, format=info["format"], notes=notes)
    config = dict(method="diffusion", net=name, dropout=None, cond=label_dim > 0, label_dim=label_dim, shape=shape,
                  seed=0, logvar=logvar, net_kwargs=net_kwargs, source=_jsonable(source))
    if info["precond"] in ("EDMPrecond", "Precond"):
        # The sigma_data of the file's EDM preconditioning (0.5, those classes' default, unless it records another),
        # so that train.py refuses it as --init / --teacher of a run with another one. Other files record none.
        config["sigma_data"] = float(info["precond_kwargs"].get("sigma_data", 0.5))
    return weights, config


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else str(v)  # strict JSON has no inf / nan
    return repr(v)

# --- Main ---------------------------------------------------------------------------------------------------------


def convert(src, out, net_name=None, expect_sha256=None):
    """Convert `src` into `out`; returns the config written."""
    if not os.path.isfile(src):
        raise ConvertError(f"{src} is a folder, not a file" if os.path.isdir(src) else f"no such file: {src}")
    try:
        digest = data.file_digest(src)
        if expect_sha256 and digest != expect_sha256.lower():
            raise ConvertError(f"{src} has sha256 {digest}, expected {expect_sha256}")
        weights, info = read_source(src)
    except OSError as e:  # unreadable (permissions, an I/O error)
        raise ConvertError(f"cannot read {src}: {e.strerror or e}") from None
    state_dict, config = to_our_net(weights, info, net_name)
    config["source"].update(file=os.path.basename(src), sha256=digest)
    save_new(dict(net=state_dict, ema=[state_dict], step=0, config=config), out)  # net and ema share their storages
    return config


def is_checkpoint(path):
    """Whether path holds a checkpoint of this repository: weights-only and memory-mapped, so nothing large is read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything else: not a torch zip file, a refused pickle, a folder, ...
        return False
    return (isinstance(state, dict) and {"net", "ema", "step", "config"} <= set(state)
            and isinstance(state["config"], dict) and "method" in state["config"])


def missing_folders(path):
    """The folders above path that do not exist yet, outermost first, and the nearest one that does."""
    missing, folder = [], os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    return missing, folder


def check_out(src, out, force, is_ours=is_checkpoint, kind="a checkpoint of this repository"):
    """Before any work: out is not src, not a folder, has no out.tmp beside it, lies below a writable folder (missing
    folders are made when it is written), and is new, unless --force is given and is_ours(out): out is `kind` (never
    src)."""
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ConvertError(f"{out} is the source file: write the conversion to another file")
    if os.path.isdir(out):
        raise ConvertError(f"{out} is a folder; name the output file")
    if os.path.lexists(out + ".tmp"):  # atomic_save's temp file: never another file (src included)
        raise ConvertError(f"{out}.tmp exists (left by an interrupted write?); remove it or choose another output file")
    _, folder = missing_folders(out)
    if not os.path.isdir(folder):
        raise ConvertError(f"{out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: the folder {folder} is not writable")
    if os.path.lexists(out):
        if not force:
            raise ConvertError(f"{out} exists; pass --force to replace it, or choose another output file")
        if not is_ours(out):
            raise ConvertError(f"{out} exists and is not {kind}: not replaced, even with --force")


def save_new(state, out, save=checkpoints.atomic_save):
    """save(state, out): checkpoints.atomic_save (out.tmp, renamed over out), making the missing folders above out. On
    failure out.tmp (check_out saw none before) and the folders made here are removed, and a failed write (a full disk,
    a read-only folder) is one line."""
    made, _ = missing_folders(out)
    try:
        for folder in made:
            os.mkdir(folder)
        save(state, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(out + ".tmp")
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty, and only those made here
        if isinstance(e, UsageError):  # atomic_save's one line for a failed write
            raise ConvertError(str(e)) from None
        if isinstance(e, OSError):
            raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None
        raise


# --- Export: one EMA as safetensors --------------------------------------------------------------------------------


def export_tensors(state, ema):
    """The EMA's state dict as safetensors stores it: contiguous, no two tensors on one storage (cloned: bits kept)."""
    tensors, storages = {}, set()
    for k, v in state["ema"][ema].items():
        if not torch.is_tensor(v):
            raise ConvertError(f"ema {ema} holds {k!r}, which is not a tensor")
        v = v.detach().contiguous()
        if v.untyped_storage().data_ptr() in storages:
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    return tensors


def is_export(path):
    """Whether path is a safetensors file with an export's metadata (only its header is read)."""
    try:
        with importlib.import_module("safetensors").safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return "method" in json.loads(meta["config"]) and int(meta["step"]) >= 0
    except Exception:  # not safetensors, no such metadata, or the package is missing
        return False


def save_safetensors(payload, out):
    """(tensors, metadata) written to out.tmp, flushed, and renamed over out, as checkpoints.atomic_save does."""
    tensors, metadata = payload
    tmp = out + ".tmp"
    try:
        checkpoints.safetensors_torch("convert.py export").save_file(tensors, tmp, metadata=metadata)
    except Exception as e:  # the package reports a failed write as its own error type
        raise OSError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


def export(src, out, ema=0):
    """EMA `ema` of the checkpoint or run `src` into the safetensors file `out`; returns the metadata written."""
    try:
        state = checkpoints.load_checkpoint(src, "cpu")
    except UsageError as e:
        raise ConvertError(str(e)) from None
    if not 0 <= ema < len(state["ema"]):
        raise ConvertError(f"{src} holds {len(state['ema'])} EMA nets; --ema {ema} does not exist")
    tensors = export_tensors(state, ema)
    metadata = dict(config=json.dumps(state["config"]), step=str(state["step"]), ema=str(ema))
    save_new((tensors, metadata), out, save=save_safetensors)
    return metadata


def export_main(argv):
    p = argparse.ArgumentParser(prog="convert.py export", description="One EMA of a run as safetensors, with the "
                                "run's config and step as metadata (no pickle to load it).")
    p.add_argument("src", help="run folder or checkpoint file")
    p.add_argument("--to", required=True, help="output .safetensors file (new)")
    p.add_argument("--ema", type=int, default=0, help="which EMA of the run (default: the first, the one sampled)")
    p.add_argument("--force", action="store_true", help="replace an existing export of this repository (never src)")
    args = p.parse_args(argv)
    try:
        if not args.to.endswith(".safetensors"):
            raise ConvertError(f"--to {args.to}: name a .safetensors file (train.py and fid.py know it by the suffix)")
        check_out(args.src, args.to, args.force, is_export, "an export of this repository")
        checkpoints.safetensors_torch("convert.py export")
        metadata = export(args.src, args.to, args.ema)
    except (ConvertError, UsageError) as e:
        sys.exit(f"convert.py: error: {e}")
    config = json.loads(metadata["config"])
    print(f"{args.to}: ema {args.ema} of {args.src} ({config['method']}, net {config['net']}, step {metadata['step']})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    p = argparse.ArgumentParser(description="Convert an official EDM / EDM2 / DiT checkpoint "
                                "(or `convert.py export RUN --to FILE.safetensors`: see export --help).")
    p.add_argument("src", help="the official .pkl (EDM, EDM2) or .pt (DiT) file")
    p.add_argument("out", help="output .pt in this repository's checkpoint format")
    p.add_argument("--net", help="registry name to check against (default: the one whose config matches)")
    p.add_argument("--sha256", help="expected SHA-256 of src")
    p.add_argument("--force", action="store_true", help="replace an existing out that is a checkpoint of this "
                   "repository (never src)")
    args = p.parse_args(argv)
    try:
        check_out(args.src, args.out, args.force)
        config = convert(args.src, args.out, args.net, args.sha256)
    except ConvertError as e:
        sys.exit(f"convert.py: error: {e}")
    src = config["source"]
    recorded = f"{src['net_class']} in {src['precond']}" if src["precond"] else src["net_class"]
    print(f"{args.out}: net {config['net']}, shape {config['shape']}, label_dim {config['label_dim']}, logvar head "
          f"{config['logvar']}, from {recorded} (as the file records); sha256 {src['sha256']}")
    for note in src["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
