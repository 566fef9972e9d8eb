"""convert.py: official checkpoints in NVIDIA's persistence-pickle layout (built here from our own nets, with
stand-ins for torch_utils/dnnlib that exist only while writing, and numpy scalars where EDM's code leaves them),
DiT training checkpoints, the restricted unpickler, and train.py use."""
import argparse
import builtins
import contextlib
import io
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import convert
import data
import fid
import nets
import train
from conftest import randomize_, tiny_ref
from test_data import write_image_zip

# --- Writing NVIDIA-style pickles ---------------------------------------------------------------------------------


@contextlib.contextmanager
def nvidia_modules():
    """Fake `torch_utils.persistence` and `dnnlib.util` modules, registered only while pickling."""
    mods = {name: types.ModuleType(name) for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the real reconstruct function must never be needed")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mods["dnnlib.util"].EasyDict = EasyDict
    sys.modules.update(mods)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        for name in mods:
            del sys.modules[name]


class Persistent:
    """Pickles as persistence does: _reconstruct_persistent_obj(meta) with the module source and the object state."""

    def __init__(self, reconstruct, class_name, state, module_src):
        self.reconstruct, self.meta = reconstruct, dict(type="class", version=6, module_src=module_src,
                                                         class_name=class_name, state=state)

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def mirror(module, reconstruct, module_src, skip=()):
    """Our module tree as persistent objects (containers stay real torch.nn containers, as in EDM). As in EDM's
    networks, float attributes are numpy float64 (skip_scale = np.sqrt(0.5), ...) and every module records the
    constructor arguments it was given, with numpy values among them (init_weight = np.sqrt(0.2), ...)."""
    state = {k: np.float64(v) if type(v) is float else v for k, v in module.__dict__.items()}
    children = {n: mirror(c, reconstruct, module_src) for n, c in module._modules.items() if n not in skip and c is not None}
    if isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
        out = type(module)()
        out.__dict__["_modules"] = children
        return out
    state.update(_modules=children, _init_args=(), _init_kwargs=dict(init_weight=np.sqrt(0.2), eps=np.float32(1e-5),
                                                                   init=dict(init_bias=np.sqrt(1 / 3), n=np.int64(-3))))
    return Persistent(reconstruct, type(module).__name__, state, module_src)


NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar rebuild function (numpy._core.multiarray under numpy 2)


class Numpy1Pickler(pickle._Pickler):
    """Python's pickle writer, except that numpy's scalar function goes out under numpy 1.x's module path, written as
    the protocol-4 opcodes numpy 1.x produces: every released EDM/EDM2 file was written under numpy 1.x."""

    def save_global(self, obj, name=None):
        if obj is not NUMPY_SCALAR:
            return super().save_global(obj, name)
        self.save("numpy.core.multiarray")
        self.save("scalar")
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


MARKER = "convert-executed-module-src"
EVIL_SRC = f"open({MARKER!r}, 'w').write('ran')\nraise RuntimeError('module_src was executed')\n"


def write_edm_pickle(path, net, net_kwargs, precond="EDMPrecond", extra=None, numpy1=False, precond_kwargs=None):
    """As EDM's training loop writes a snapshot (pickle protocol 4); EDMPrecond is EDM's default preconditioning and
    records only the arguments passed to it (precond_kwargs adds some, e.g. sigma_data)."""
    with nvidia_modules() as (reconstruct, EasyDict):
        inner = mirror(net, reconstruct, EVIL_SRC)
        inner.meta["state"].update(_init_args=(), _init_kwargs=EasyDict(net_kwargs))
        pre_kwargs = EasyDict(img_resolution=net_kwargs["img_resolution"], img_channels=net_kwargs["in_channels"],
                              label_dim=net_kwargs.get("label_dim", 0), use_fp16=False, model_type="SongUNet",
                              **(precond_kwargs or {}))
        ema = Persistent(reconstruct, precond, dict(training=False, _parameters={}, _buffers={}, _modules={"model": inner},
                                                    _init_args=(), _init_kwargs=pre_kwargs, **(extra or {})), EVIL_SRC)
        loss = Persistent(reconstruct, "VPLoss", dict(beta_d=19.9, beta_min=0.1), EVIL_SRC)
        top = dict(ema=ema, loss_fn=loss, augment_pipe=None, dataset_kwargs=EasyDict(path="cifar10.zip"))
        with open(path, "wb") as f:
            (Numpy1Pickler if numpy1 else pickle.Pickler)(f, protocol=4).dump(top)


TINY_KWARGS = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13, embedding_type="positional",
                   channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])


def tiny_songunet():
    """A ddpmpp-tiny-shaped SongUNet with EDM's augment mapping (augment_dim 9), random weights."""
    torch.manual_seed(0)
    net = nets.SongUNet(**{k: v for k, v in TINY_KWARGS.items() if k not in
                           ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")})
    return randomize_(net).eval()


@pytest.fixture
def tiny_edm(tmp_path):
    """tiny_songunet as an EDM pickle written under numpy 2."""
    net = tiny_songunet()
    write_edm_pickle(tmp_path / "edm.pkl", net, TINY_KWARGS)
    return net, str(tmp_path / "edm.pkl")


def count_numpy_scalars(monkeypatch):
    """Counts the numpy scalars the restricted unpickler rebuilds, under either module path."""
    seen = []
    for key in [("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")]:
        def counted(*args, rebuild=convert.ALLOWED[key]):
            seen.append(rebuild(*args))
            return seen[-1]
        monkeypatch.setitem(convert.ALLOWED, key, counted)
    return seen

# --- EDM: SongUNet -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
def test_edm_pickle_converts_without_running_module_src(tmp_path, monkeypatch, numpy1):
    monkeypatch.chdir(tmp_path)
    src_net = tiny_songunet()
    pkl = str(tmp_path / "edm.pkl")
    write_edm_pickle(pkl, src_net, TINY_KWARGS, numpy1=numpy1)
    blob = open(pkl, "rb").read()
    assert (b"numpy.core.multiarray" in blob) == numpy1 and (b"numpy._core.multiarray" in blob) == (not numpy1)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    scalars = count_numpy_scalars(monkeypatch)
    cfg = convert.convert(pkl, str(tmp_path / "out.pt"))
    assert not (tmp_path / MARKER).exists()
    # Every module records 4 numpy scalars (float64, float32, int64) and UNet blocks hold float64 attributes; all come
    # back as Python numbers with the values numpy stored.
    n_modules = sum(not isinstance(m, torch.nn.ModuleDict) for m in src_net.modules())
    assert len(scalars) >= 4 * n_modules and all(type(v) in (float, int) for v in scalars)
    assert {math.sqrt(0.2), math.sqrt(1 / 3), float(np.float32(1e-5)), -3, math.sqrt(0.5)} <= set(scalars)
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert state["step"] == 0 and len(state["ema"]) == 1 and state["config"] == cfg
    assert cfg["method"] == "diffusion" and cfg["net"] == "ddpmpp-tiny" and cfg["shape"] == [3, 16, 16]
    assert cfg["label_dim"] == 0 and cfg["cond"] is False and cfg["logvar"] is False and cfg["dropout"] is None
    assert cfg["sigma_data"] == 0.5  # not recorded by the file: EDMPrecond's default
    src = cfg["source"]
    assert src["precond"] == "EDMPrecond" and src["file"] == "edm.pkl" and len(src["sha256"]) == 64
    assert src["net_kwargs"]["augment_dim"] == 9 and cfg["net_kwargs"] == {"augment_dim": 9}
    assert src["notes"] == ["trained with dropout 0.13; use it in eval mode as a teacher (train.py does)"]
    # Identical outputs in float64, with and without augmentation labels: map_augment is kept (augment.py's 9-d labels).
    net = nets.build_net(cfg["net"], cfg["shape"], label_dim=cfg["label_dim"], use_r=False, logvar=cfg["logvar"],
                         **cfg["net_kwargs"])
    net.load_state_dict(state["ema"][0], strict=True)
    net, src_net = net.double().eval(), src_net.double()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(net(x, t), src_net(x, t))
        aug = torch.randn(2, 9, generator=g, dtype=torch.float64)
        assert torch.equal(net(x, t, aug=aug), src_net(x, t, aug=aug)) and not torch.equal(net(x, t, aug=aug), net(x, t))


def test_precond_note_follows_what_the_file_records(tmp_path, capsys):
    """EDM's released CIFAR-10 '-vp' files record EDMPrecond (EDM's default; '-vp' names the DDPM++ architecture):
    no note. A file that records VPPrecond gets one, and the printed line names the recorded classes."""
    net = tiny_songunet()
    write_edm_pickle(tmp_path / "vp.pkl", net, {**TINY_KWARGS, "dropout": 0.0}, precond="VPPrecond")
    convert.main([str(tmp_path / "vp.pkl"), str(tmp_path / "vp.pt")])
    out = capsys.readouterr().out
    assert "from SongUNet in VPPrecond (as the file records)" in out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "records VPPrecond, not EDM preconditioning" in notes[0]
    assert "sigma_data" not in torch.load(tmp_path / "vp.pt", weights_only=True)["config"]  # VP has none
    write_edm_pickle(tmp_path / "sd.pkl", net, TINY_KWARGS, precond_kwargs=dict(sigma_data=1.0))
    assert convert.convert(str(tmp_path / "sd.pkl"), str(tmp_path / "sd.pt"))["sigma_data"] == 1.0


def test_cli_one_line_errors(tiny_edm, tmp_path, capsys):
    _, pkl = tiny_edm
    (tmp_path / "text.pkl").write_bytes(b"hello, not a pickle")
    cases = [([str(tmp_path / "missing.pkl")], "no such file"),
             ([str(tmp_path / "text.pkl")], "neither a pickle nor"),
             ([pkl, "--sha256", "0" * 64], "has sha256"),
             ([pkl, "--net", "ddpmpp"], "config mismatch: ddpmpp: channel_mult=[1, 2] (ours: (2, 2, 2)), model_channels=16"),
             ([pkl, "--net", "mlp"], "is not a SongUNet")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            convert.main([args[0], str(tmp_path / "o.pt"), *args[1:]])
        assert message in str(e.value) and "\n" not in str(e.value), (args, e.value)
    assert not (tmp_path / "o.pt").exists()
    convert.main([pkl, str(tmp_path / "ok.pt"), "--sha256", data.file_digest(pkl)])
    assert "net ddpmpp-tiny" in capsys.readouterr().out


def hashes(*roots):
    """{path: SHA-256} of every file under roots (files or folders)."""
    found = {}
    for root in map(str, roots):
        walk = [(os.path.dirname(root), [], [os.path.basename(root)])] if os.path.isfile(root) else os.walk(root)
        for folder, _, files in walk:
            for name in files:
                found[os.path.join(folder, name)] = data.file_digest(os.path.join(folder, name))
    return found


def convert_refused(argv, message):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    assert str(e.value.code).startswith("convert.py: error: ") and "\n" not in str(e.value.code), e.value.code
    assert message in str(e.value.code), (message, e.value.code)


def test_out_is_checked_before_any_work(tiny_edm, tmp_path, monkeypatch):
    """src (also through a hard link), a folder, an existing temp name, a path below a file, an unwritable
    folder, an existing file without --force, and with --force any file that is not a checkpoint of ours: refused
    before the source is read, every byte kept."""
    _, pkl = tiny_edm
    os.link(pkl, tmp_path / "link.pkl")
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "c.pt.tmp").write_text("someone's file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "read-only").mkdir()
    real_access = os.access  # root writes anywhere: a read-only folder is what os.access says of it
    monkeypatch.setattr(os, "access", lambda p, mode: not p.endswith("read-only") and real_access(p, mode))
    monkeypatch.setattr(convert, "read_source", lambda *a: pytest.fail("the source was read before the checks"))
    before = hashes(tmp_path)
    for out, force, message in [(pkl, True, "is the source file"), (tmp_path / "link.pkl", True, "is the source file"),
                                (tmp_path / "dir", True, "is a folder"),
                                (tmp_path / "c.pt", True, "c.pt.tmp exists (left by an interrupted write?)"),
                                (tmp_path / "notes.txt" / "x.pt", False, "notes.txt is a file, not a folder"),
                                (tmp_path / "read-only" / "x.pt", False, "read-only is not writable"),
                                (tmp_path / "notes.txt", False, "exists; pass --force"),
                                (tmp_path / "notes.txt", True, "is not a checkpoint of this repository: not replaced")]:
        convert_refused([pkl, str(out), *(["--force"] if force else [])], message)
    convert_refused([str(tmp_path / "dir"), str(tmp_path / "o.pt")], "is a folder, not a file")
    assert hashes(tmp_path) == before and not (tmp_path / "o.pt").exists()


def test_force_replaces_a_checkpoint_and_makes_folders(tiny_edm, tmp_path):
    """--force replaces a checkpoint of this repository; missing folders above out are made; no temp file stays."""
    _, pkl = tiny_edm
    out = tmp_path / "new" / "deeper" / "c.pt"
    convert.main([pkl, str(out)])
    torch.save(dict(net={}, ema=[{}], step=7, config=dict(method="cm")), out)
    convert.main([pkl, str(out), "--force"])
    assert torch.load(out, weights_only=True)["step"] == 0
    assert os.listdir(tmp_path / "new" / "deeper") == ["c.pt"]


def test_a_failed_save_is_one_line_and_leaves_nothing(tiny_edm, tmp_path, monkeypatch):
    """a full disk while saving (half a file, then ENOSPC): one line, the checkpoint it would have
    replaced unchanged, no temp file, and no folder made for it."""
    import errno
    _, pkl = tiny_edm
    old = tmp_path / "old.pt"
    torch.save(dict(net={}, ema=[{}], step=7, config=dict(method="cm")), old)
    before = hashes(tmp_path)

    def full_disk(state, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    convert_refused([pkl, str(old), "--force"], "cannot write")
    convert_refused([pkl, str(tmp_path / "new" / "c.pt")], "No space left on device")
    assert hashes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["edm.pkl", "old.pt"]


def test_an_unreadable_source_is_one_line(tiny_edm, tmp_path, monkeypatch):
    """a source that cannot be read (no permission; root reads anything, so the read is made to fail)."""
    import errno

    def unreadable(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    monkeypatch.setattr(data, "file_digest", unreadable)
    convert_refused([tiny_edm[1], str(tmp_path / "o.pt")], "cannot read")
    assert not (tmp_path / "o.pt").exists()

def test_unsupported_edm_architecture_is_a_config_mismatch(tmp_path):
    """EDM's NCSN++ ('-ve') nets record a Fourier embedding and a residual encoder: our DDPM++ cannot hold them."""
    torch.manual_seed(0)
    net = nets.build_net("ddpmpp-tiny", (3, 16, 16))
    write_edm_pickle(tmp_path / "ve.pkl", net, {**TINY_KWARGS, "augment_dim": 0, "embedding_type": "fourier",
                                                "encoder_type": "residual"}, precond="VEPrecond")
    with pytest.raises(convert.ConvertError, match="config mismatch.*embedding_type='fourier'.*encoder_type"):
        convert.convert(str(tmp_path / "ve.pkl"), str(tmp_path / "o.pt"))


def test_unknown_network_class(tmp_path):
    torch.manual_seed(0)
    net = nets.build_net("ddpmpp-tiny", (3, 16, 16))
    with nvidia_modules() as (reconstruct, _):
        inner = mirror(net, reconstruct, "")
        inner.meta["class_name"] = "NCSNppMystery"
        ema = Persistent(reconstruct, "EDMPrecond", dict(_modules={"model": inner}, _init_kwargs={}), "")
        with open(tmp_path / "x.pkl", "wb") as f:
            pickle.dump(dict(ema=ema), f)
    with pytest.raises(convert.ConvertError, match="unknown network class 'NCSNppMystery'"):
        convert.convert(str(tmp_path / "x.pkl"), str(tmp_path / "o.pt"))

# --- The restricted unpickler ---------------------------------------------------------------------------------------


class Call:
    """Pickles as a call of `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn, arg, name", [
    (os.system, f"touch {MARKER}", f"{os.system.__module__}.system"),
    (builtins.eval, f"open({MARKER!r}, 'w')", "builtins.eval"),
    (builtins.exec, f"open({MARKER!r}, 'w')", "builtins.exec"),
])
def test_refuses_other_globals_without_calling_them(tmp_path, monkeypatch, fn, arg, name):
    monkeypatch.chdir(tmp_path)
    with nvidia_modules() as (reconstruct, _):
        ema = Persistent(reconstruct, "EDMPrecond", dict(_modules={}, _init_kwargs=dict(model_type=Call(fn, arg))), "")
        with open(tmp_path / "evil.pkl", "wb") as f:
            pickle.dump(dict(ema=ema), f)
    with pytest.raises(convert.ConvertError, match=f"refusing to load global {name}"):
        convert.convert(str(tmp_path / "evil.pkl"), str(tmp_path / "o.pt"))
    assert not (tmp_path / MARKER).exists()


def test_embedded_storage_bytes_are_loaded_weights_only(tmp_path, monkeypatch):
    """torch pickles a storage as _load_from_bytes(torch.save bytes); torch's own version loads those bytes with
    weights_only=False. Ours refuses a pickle hidden there, in one plain line (torch's message is a paragraph with
    terminal colour codes)."""
    monkeypatch.chdir(tmp_path)
    hidden = pickle.dumps(Call(os.system, f"touch {MARKER}"), protocol=2)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(dict(ema=Call(torch.storage._load_from_bytes, hidden)), f)
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "evil.pkl"), str(tmp_path / "o.pt")])
    message = str(e.value)
    assert message.startswith("convert.py: error: cannot read") and "GLOBAL" in message and "system" in message
    assert "\n" not in message and "\x1b" not in message, message
    assert not (tmp_path / MARKER).exists()


# numpy values as numpy 1.x pickles them (protocol 4), written out opcode by opcode.

def op_str(text):
    b = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def op_global(module, name):
    return op_str(module) + op_str(name) + pickle.STACK_GLOBAL


def op_call(fn_module, fn_name, *texts):
    return op_global(fn_module, fn_name) + pickle.MARK + b"".join(op_str(t) for t in texts) + pickle.TUPLE + pickle.REDUCE


def op_dtype(spec, order):
    """numpy.dtype(spec, False, True), then BUILD with (3, order, subarray, names, fields, elsize, alignment, flags)."""
    state = (pickle.MARK + pickle.BININT1 + b"\x03" + op_str(order) + pickle.NONE * 3
             + (pickle.BININT + (-1).to_bytes(4, "little", signed=True)) * 2 + pickle.BININT1 + b"\x00" + pickle.TUPLE)
    return (op_global("numpy", "dtype") + op_str(spec) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3
            + pickle.REDUCE + state + pickle.BUILD)


def op_scalar(spec, order, raw):
    return (op_global("numpy.core.multiarray", "scalar") + op_dtype(spec, order) + pickle.SHORT_BINBYTES
            + bytes([len(raw)]) + raw + pickle.TUPLE2 + pickle.REDUCE)


def op_dict(items):
    body = b"".join(op_str(k) + v for k, v in items.items())
    return pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def test_numpy1_scalars_are_rebuilt_as_python_numbers():
    """Hand-written numpy 1.x opcodes (numpy.core.multiarray.scalar), both byte orders: numpy itself reads them as
    these scalars, and the restricted unpickler as the same values in Python numbers."""
    values = dict(skip_scale=np.float64(np.sqrt(0.5)), big_endian=np.float64(np.sqrt(1 / 3)), eps=np.float32(1e-5),
                  half=np.float16(0.1), n=np.int64(-3), u=np.uint16(513), flag=np.bool_(True))
    orders = dict(big_endian=">", flag="|")
    items = {}
    for k, v in values.items():
        spec, order = v.dtype.str[1:], orders.get(k, "<")
        items[k] = op_scalar(spec, order, np.array(v, dtype=order + spec).tobytes())
    blob = op_dict(items)
    assert pickle.loads(blob) == values
    out = convert.RestrictedUnpickler(io.BytesIO(blob)).load()
    assert out == {k: v.item() for k, v in values.items()}
    assert [type(v) for v in out.values()] == [float] * 4 + [int] * 2 + [bool]


def write_ema_with(path, payload_ops):
    """An EDM-like snapshot {ema: <payload>} written as raw opcodes."""
    path.write_bytes(op_dict({"ema": payload_ops}))
    return str(path)


REFUSALS = {
    # numpy 2 writes these itself: an object array, and scalars of non-numeric types
    "object_array": (lambda: pickle.dumps(dict(ema=np.array([Call(os.system, f"touch {MARKER}")], dtype=object))),
                     "refusing to load global numpy._core.multiarray._reconstruct"),
    "str_scalar": (lambda: pickle.dumps(dict(ema=np.str_("abc"))), "refusing numpy dtype 'U3'"),
    "datetime_scalar": (lambda: pickle.dumps(dict(ema=np.datetime64("2020-01-01"))), "refusing numpy dtype 'M8'"),
    "structured_scalar": (lambda: pickle.dumps(dict(ema=np.zeros(1, dtype=[("a", "f4")])[0])),
                          "refusing numpy dtype 'V4'"),
    # hand-written numpy 1.x opcodes: an object scalar whose value is a call, and _reconstruct of an object array
    "object_scalar": (lambda: op_dict({"ema": op_global("numpy.core.multiarray", "scalar") + op_dtype("O8", "|")
                                       + op_call("os", "system", f"touch {MARKER}") + pickle.TUPLE2 + pickle.REDUCE}),
                      "refusing numpy dtype 'O8'"),
    "reconstruct_object_array": (lambda: op_dict({"ema": op_global("numpy.core.multiarray", "_reconstruct") + pickle.MARK
                                                  + op_global("numpy", "ndarray") + pickle.EMPTY_TUPLE + op_str("b")
                                                  + pickle.TUPLE + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x01"
                                                  + pickle.EMPTY_TUPLE + op_dtype("O8", "|") + pickle.NEWFALSE
                                                  + pickle.MARK + op_call("os", "system", f"touch {MARKER}")
                                                  + pickle.LIST + pickle.TUPLE + pickle.BUILD}),
                                 "refusing to load global numpy.core.multiarray._reconstruct"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_non_numeric_numpy_without_running_anything(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    blob, message = REFUSALS[case]
    (tmp_path / "evil.pkl").write_bytes(blob())
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "evil.pkl"), str(tmp_path / "o.pt")])
    assert message in str(e.value) and "\n" not in str(e.value), e.value
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "o.pt").exists()


def test_flatten_reads_fp16_params_buffers_and_containers():
    """fp16 weights (as in EDM2 pickles) come back as the same values; non-persistent buffers and None are skipped."""
    m = torch.nn.Module()
    m.blocks = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2, bias=False).half()})
    m.register_buffer("freqs", torch.randn(4).half())
    m.register_buffer("scratch", torch.zeros(1), persistent=False)
    m.register_parameter("unused", None)
    with nvidia_modules() as (reconstruct, _):
        blob = pickle.dumps(dict(ema=mirror(m, reconstruct, EVIL_SRC)))
    top = convert.RestrictedUnpickler(io.BytesIO(blob)).load()
    assert isinstance(top["ema"], convert.Persistent) and top["ema"].meta["module_src"] == EVIL_SRC
    flat = convert.flatten(top["ema"])
    assert sorted(flat) == ["blocks.a.weight", "freqs"]
    assert flat["freqs"].dtype == torch.float16 and torch.equal(flat["freqs"], m.freqs)
    assert torch.equal(flat["blocks.a.weight"], m.blocks.a.weight)


def test_edm2_layout_strips_unet_and_casts_fp16_to_fp32(tmp_path):
    """EDM2: Precond(unet=UNet, logvar_fourier, logvar_linear) in fp16 -> fp32 keys without `unet.`; the recorded
    UNet kwargs are read (with EDM2's defaults for the ones not passed)."""
    unet, head = torch.nn.Module(), torch.nn.Module()
    unet.enc = torch.nn.ModuleDict({"64x64_conv": torch.nn.Conv2d(4, 8, 3, bias=False).half()})
    unet.register_buffer("out_gain", torch.tensor(0.25).half())
    head.register_buffer("freqs", torch.randn(8).half())
    with nvidia_modules() as (reconstruct, _):
        u = mirror(unet, reconstruct, EVIL_SRC)
        u.meta["class_name"], u.meta["state"]["_init_kwargs"] = "UNet", dict(img_resolution=64, img_channels=3,
                                                                             label_dim=1000, model_channels=8)
        pre = Persistent(reconstruct, "Precond", dict(_modules=dict(unet=u, logvar_fourier=mirror(head, reconstruct, "")),
                                                      _init_kwargs=dict(use_fp16=True)), EVIL_SRC)
        with open(tmp_path / "edm2.pkl", "wb") as f:
            pickle.dump(dict(ema=pre, encoder=None, loss_fn=None), f)
    weights, info = convert.read_source(str(tmp_path / "edm2.pkl"))
    assert sorted(weights) == ["enc.64x64_conv.weight", "logvar_fourier.freqs", "out_gain"]
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert torch.equal(weights["enc.64x64_conv.weight"], unet.enc["64x64_conv"].weight.float())
    assert info["format"] == "edm2-pkl" and info["net_class"] == "UNet"
    assert info["net_kwargs"]["model_channels"] == 8 and info["net_kwargs"]["attn_resolutions"] == [16, 8]

# --- Other nets (ADM, EDM2, DiT), when nets.py has them ----------------------------------------------------------------


def needs(cls_name):
    return pytest.mark.xfail(not hasattr(nets, cls_name), raises=(AttributeError, KeyError, convert.ConvertError),
                             reason=f"nets.py has no {cls_name} yet", strict=True)


@needs("DiT")
def test_dit_training_checkpoint_and_state_dict(tmp_path):
    """DiT's train.py saves {model, ema, opt, args} with args an argparse.Namespace: the EMA is taken, args is kept as
    plain data, and the config is read from the shapes. The released files are plain EMA state dicts."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("dit-tiny", (4, 8, 8), label_dim=10))
    model = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0)
    net(torch.randn(2, 4, 8, 8), torch.rand(2), y=torch.eye(10)[:2]).square().mean().backward()
    opt.step()
    args = argparse.Namespace(data_path="/data/imagenet/train", model="DiT-XL/2", image_size=64, num_classes=10,
                              epochs=1400, global_batch_size=256, global_seed=0, vae="ema", ckpt_every=50_000)
    torch.save(dict(model=model, ema=net.state_dict(), opt=opt.state_dict(), args=args), tmp_path / "0050000.pt")
    cfg = convert.convert(str(tmp_path / "0050000.pt"), str(tmp_path / "out.pt"))
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert cfg["net"] == "dit-tiny" and cfg["shape"] == [4, 8, 8] and cfg["label_dim"] == 10 and cfg["net_kwargs"] == {}
    assert cfg["source"]["train_args"] == vars(args) and cfg["source"]["format"] == "dit-pt"
    assert state["ema"][0].keys() == net.state_dict().keys()
    assert all(torch.equal(state["ema"][0][k], v) for k, v in net.state_dict().items())
    assert_same_outputs(net, cfg, state, 10)
    torch.save(net.state_dict(), tmp_path / "plain.pt")  # the released files: a plain EMA state dict
    assert convert.convert(str(tmp_path / "plain.pt"), str(tmp_path / "out2.pt"))["net"] == "dit-tiny"


def test_dit_checkpoint_refusals_are_one_line(tmp_path, monkeypatch):
    """Only a Namespace is added to torch's weights-only loader: a call hidden in it is refused, in one plain line."""
    monkeypatch.chdir(tmp_path)
    sd = {"x_embedder.proj.weight": torch.zeros(1)}
    torch.save(dict(model=sd, ema=sd, opt={}, args=argparse.Namespace(model=Call(os.system, f"touch {MARKER}"))),
               tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "evil.pt"), str(tmp_path / "o.pt")])
    message = str(e.value)
    assert message.startswith("convert.py: error: cannot read") and "GLOBAL" in message and "system" in message
    assert "\n" not in message and "\x1b" not in message, message
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "o.pt").exists()


def tiny_registry_entry(monkeypatch, base, **kwargs):
    name = f"{base}-tiny-test"
    cls, base_kwargs = nets.NETS[base]
    monkeypatch.setitem(nets.NETS, name, (cls, {**base_kwargs, **kwargs}))
    return name


def assert_same_outputs(net, cfg, state, label_dim):
    """The converted checkpoint, rebuilt from its config, computes what the source net computes (float64, exact)."""
    ours = nets.build_net(cfg["net"], cfg["shape"], label_dim=cfg["label_dim"], use_r=False, logvar=cfg["logvar"])
    ours.load_state_dict(state["ema"][0], strict=True)
    ours, net = ours.double().eval(), net.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *cfg["shape"], generator=g, dtype=torch.float64)
    t = torch.randn(2, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.tensor([0, label_dim - 1]), label_dim).double()
    with torch.no_grad():
        assert torch.equal(ours(x, t, y=y), net(x, t, y=y))


@needs("DhariwalUNet")
def test_adm_pickle_converts(tmp_path, monkeypatch):
    """EDM's ADM (heads fixed to 64 channels there), class-conditional, EDM preconditioning."""
    name = tiny_registry_entry(monkeypatch, "adm", model_channels=32, channel_mult=(1, 2), num_blocks=1,
                               attn_resolutions=(8,))
    torch.manual_seed(0)
    net = randomize_(nets.build_net(name, (3, 16, 16), label_dim=10))
    kwargs = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, augment_dim=0, model_channels=32,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
    write_edm_pickle(tmp_path / "adm.pkl", net, kwargs, precond="EDMPrecond")
    cfg = convert.convert(str(tmp_path / "adm.pkl"), str(tmp_path / "out.pt"))
    assert cfg["net"] == name and cfg["label_dim"] == 10 and cfg["cond"] is True and cfg["source"]["precond"] == "EDMPrecond"
    assert any("eval mode" in n for n in cfg["source"]["notes"])
    assert_same_outputs(net, cfg, torch.load(tmp_path / "out.pt", weights_only=True), 10)


def write_edm2_pickle(path, net, dropout):
    """As EDM2's training loop writes a snapshot: an EasyDict whose `ema` is the Precond in fp16; Precond and UNet record
    the arguments passed (the rest are EDM2's defaults)."""
    kwargs = {**nets.NETS["edm2-tiny"][1], "img_resolution": 16, "img_channels": 3, "label_dim": 10, "dropout": dropout}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "dropout_res"}
    with nvidia_modules() as (reconstruct, EasyDict):
        unet = mirror(net.half(), reconstruct, EVIL_SRC, skip=("logvar_fourier", "logvar_linear"))
        unet.meta["class_name"], unet.meta["state"]["_init_kwargs"] = "UNet", EasyDict(kwargs)
        heads = {n: mirror(getattr(net, n), reconstruct, EVIL_SRC) for n in ("logvar_fourier", "logvar_linear")}
        pre = Persistent(reconstruct, "Precond", dict(_modules=dict(unet=unet, **heads), _init_kwargs=EasyDict(
            kwargs, use_fp16=True, logvar_channels=128)), EVIL_SRC)
        loss = Persistent(reconstruct, "EDM2Loss", dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5), EVIL_SRC)
        with open(path, "wb") as f:
            pickle.dump(EasyDict(dataset_kwargs=EasyDict(path="img64.zip"), loss_fn=loss, encoder=None, ema=pre), f)


@needs("EDM2UNet")
def test_edm2_pickle_converts(tmp_path):
    """EDM2: the head lives on Precond in the official file and at the top level in ours; fp16 becomes fp32. Like
    EDM2-XS/S, this one was trained without dropout, and convert.py says nothing about dropout."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("edm2-tiny", (3, 16, 16), label_dim=10, logvar=True))
    write_edm2_pickle(tmp_path / "edm2.pkl", net, dropout=0.0)
    assert all(v.dtype == torch.float16 for v in net.state_dict().values())
    cfg = convert.convert(str(tmp_path / "edm2.pkl"), str(tmp_path / "out.pt"))
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert cfg["net"] == "edm2-tiny" and cfg["logvar"] is True and cfg["source"]["format"] == "edm2-pkl"
    assert cfg["source"]["precond"] == "Precond" and cfg["source"]["notes"] == [] and cfg["sigma_data"] == 0.5
    assert all(v.dtype == torch.float32 for v in state["ema"][0].values() if v.is_floating_point())
    assert_same_outputs(net, cfg, state, 10)
    # As a diffusion teacher / in fid.py calc: the net the diffusion method builds (no head) loads, the head dropped.
    frozen = checkpoints.frozen_ema(state, cfg["shape"], 10, "cpu", "converted EDM2")
    assert frozen.logvar_linear is None and not frozen.training
    x, t, y = torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(10)[:2]
    torch.testing.assert_close(frozen(x, t, y=y), net.float().eval()(x, t, y=y), rtol=1e-4, atol=1e-5)


def test_fid_calc_on_a_converted_checkpoint(tiny_edm, detector, tmp_path):
    """fid.py calc evaluates a converted file as the diffusion model it is (Config fields from the defaults)."""
    ckpt = str(tmp_path / "edm.pt")
    convert.convert(tiny_edm[1], ckpt)
    rec = fid.cli(["calc", "--ckpt", ckpt, "--ref", tiny_ref(tmp_path / "ref.npz"), "--detector", detector[0],
                   "--num", "2", "--steps", "1", "--device", "cpu"])
    assert rec["method"] == "diffusion" and rec["sampler"] == {"sample_steps": 1} and math.isfinite(rec["fid"])


# --- train.py takes the result --------------------------------------------------------------------------------------


def test_converted_checkpoint_as_init_and_teacher(tiny_edm, tmp_path):
    """--init (cm: consistency tuning) and --teacher + --init (scm: sCD) accept the converted file unchanged."""
    _, pkl = tiny_edm
    ckpt = str(tmp_path / "edm.pt")
    convert.convert(pkl, ckpt)
    write_image_zip(tmp_path / "imgs.zip", n=8, res=16, labels=False)
    common = ["--data", str(tmp_path / "imgs.zip"), "--net", "ddpmpp-tiny", "--steps", "1", "--batch", "2",
              "--log-every", "1", "--num-samples", "4", "--cache", str(tmp_path)]
    train.cli(["--method", "cm", "--init", ckpt, "--out", str(tmp_path / "cm"), *common])
    train.cli(["--method", "scm", "--init", ckpt, "--teacher", ckpt, "--out", str(tmp_path / "scd"), *common])
    train.cli(["--method", "diffusion", "--init", ckpt, "--augment", "0.5", "--out", str(tmp_path / "edm"), *common])
    for run in ("cm", "scd", "edm"):
        assert os.path.exists(tmp_path / run / "ckpt.pt")
    # EDM's nets take sigma_data 0.5; read with another they are other denoisers: refused before anything is written
    with pytest.raises(SystemExit, match=r"--init .* was trained with sigma_data 0\.5 and this run has 1\.0"):
        train.cli(["--method", "cm", "--init", ckpt, "--sigma-data", "1", "--out", str(tmp_path / "sd"), *common])
    assert not os.path.exists(tmp_path / "sd")
    nets_of = {run: torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["net"] for run in ("cm", "edm")}
    assert "map_augment.weight" not in nets_of["cm"]  # dropped: it only ever saw zero labels
    assert nets_of["edm"]["map_augment.weight"].shape == (16, 9)  # kept: EDM's labels, training continues with them
    # The teacher is exactly the converted net (frozen, eval mode).
    ds = train.data.load(str(tmp_path / "imgs.zip"), str(tmp_path))
    teacher = checkpoints.load_teacher(ckpt, __import__("scm"), ds, 0, torch.device("cpu"), dict(sigma_data=0.5))
    sd = torch.load(ckpt, weights_only=True)["ema"][0]
    assert not teacher.training and all(torch.equal(teacher.state_dict()[k], v) for k, v in sd.items())


@needs("EDM2UNet")
def test_converted_edm2_as_init_with_dropout_res(tmp_path):
    """An EDM2 snapshot (fp16, class-conditional, log-variance head) starts cm as the ImageNet presets do, with
    dropout only at the --dropout-res resolutions; --dropout-res on a net other than EDM2 is a usage error."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("edm2-tiny", (3, 16, 16), label_dim=10, logvar=True))
    write_edm2_pickle(tmp_path / "edm2.pkl", net, dropout=0.1)
    ckpt = str(tmp_path / "edm2.pt")
    assert convert.convert(str(tmp_path / "edm2.pkl"), ckpt)["source"]["notes"][0].startswith("trained with dropout 0.1")
    write_image_zip(tmp_path / "imgs.zip", n=8, res=16, labels=True, meta={"label_dim": 10})
    common = ["--method", "cm", "--data", str(tmp_path / "imgs.zip"), "--init", ckpt, "--net", "edm2-tiny", "--cond",
              "--dropout", "0.3", "--steps", "1", "--batch", "2", "--log-every", "1", "--num-samples", "2",
              "--cache", str(tmp_path)]
    train.cli([*common, "--dropout-res", "16", "--out", str(tmp_path / "cm")])
    cfg = torch.load(tmp_path / "cm" / "ckpt.pt", weights_only=True)["config"]
    student = train.build_net(cfg, __import__("cm"), (3, 16, 16), 10)
    drops = {name: b.dropout for name, b in [*student.enc.items(), *student.dec.items()] if isinstance(b, nets.EDM2Block)}
    assert {n: p for n, p in drops.items() if p} == {n: 0.3 for n in drops if n.startswith("16x16")}
    with pytest.raises(SystemExit, match="--dropout-res applies to EDM2 nets only"):
        train.cli([*common[:7], "ddpmpp-tiny", *common[8:], "--dropout-res", "16", "--out", str(tmp_path / "bad")])
