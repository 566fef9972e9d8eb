"""convert.py: official checkpoints in NVIDIA's persistence-pickle layout (built here from our own nets, with
stand-ins for torch_utils/dnnlib that exist only while writing), the restricted unpickler, and train.py use."""
import builtins
import contextlib
import io
import math
import os
import pickle
import sys
import types

import pytest
import torch

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
    """Our module tree as persistent objects (containers stay real torch.nn containers, as in EDM)."""
    state = dict(module.__dict__)
    children = {n: mirror(c, reconstruct, module_src) for n, c in module._modules.items() if n not in skip and c is not None}
    if isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
        out = type(module)()
        out.__dict__["_modules"] = children
        return out
    state["_modules"] = children
    return Persistent(reconstruct, type(module).__name__, state, module_src)


MARKER = "convert-executed-module-src"
EVIL_SRC = f"open({MARKER!r}, 'w').write('ran')\nraise RuntimeError('module_src was executed')\n"


def write_edm_pickle(path, net, net_kwargs, precond="VPPrecond", extra=None):
    with nvidia_modules() as (reconstruct, EasyDict):
        inner = mirror(net, reconstruct, EVIL_SRC)
        inner.meta["state"].update(_init_args=(), _init_kwargs=EasyDict(net_kwargs))
        pre_kwargs = EasyDict(img_resolution=net_kwargs["img_resolution"], img_channels=net_kwargs["in_channels"],
                              label_dim=net_kwargs.get("label_dim", 0), use_fp16=False, model_type="SongUNet")
        ema = Persistent(reconstruct, precond, dict(training=False, _parameters={}, _buffers={}, _modules={"model": inner},
                                                    _init_args=(), _init_kwargs=pre_kwargs, **(extra or {})), EVIL_SRC)
        loss = Persistent(reconstruct, "VPLoss", dict(beta_d=19.9, beta_min=0.1), EVIL_SRC)
        top = dict(ema=ema, loss_fn=loss, augment_pipe=None, dataset_kwargs=EasyDict(path="cifar10.zip"))
        with open(path, "wb") as f:
            pickle.dump(top, f)


TINY_KWARGS = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13, embedding_type="positional",
                   channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])


@pytest.fixture
def tiny_edm(tmp_path):
    """A ddpmpp-tiny-shaped SongUNet with EDM's augment mapping (augment_dim 9), random weights, as an EDM VP pickle."""
    torch.manual_seed(0)
    net = nets.SongUNet(**{k: v for k, v in TINY_KWARGS.items() if k not in
                           ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")})
    randomize_(net)
    write_edm_pickle(tmp_path / "edm.pkl", net, TINY_KWARGS)
    return net.eval(), str(tmp_path / "edm.pkl")

# --- EDM: SongUNet -------------------------------------------------------------------------------------------------


def test_edm_pickle_converts_without_running_module_src(tiny_edm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src_net, pkl = tiny_edm
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    cfg = convert.convert(pkl, str(tmp_path / "out.pt"))
    assert not (tmp_path / MARKER).exists()
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert state["step"] == 0 and len(state["ema"]) == 1 and state["config"] == cfg
    assert cfg["method"] == "diffusion" and cfg["net"] == "ddpmpp-tiny" and cfg["shape"] == [3, 16, 16]
    assert cfg["label_dim"] == 0 and cfg["cond"] is False and cfg["logvar"] is False and cfg["dropout"] is None
    src = cfg["source"]
    assert src["precond"] == "VPPrecond" and src["file"] == "edm.pkl" and len(src["sha256"]) == 64
    assert src["net_kwargs"]["augment_dim"] == 9 and src["dropped"] == [] and cfg["net_kwargs"] == {"augment_dim": 9}
    assert any("VP preconditioning" in n for n in src["notes"])
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
    weights_only=False. Ours refuses a pickle hidden there."""
    monkeypatch.chdir(tmp_path)
    hidden = pickle.dumps(Call(os.system, f"touch {MARKER}"), protocol=2)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(dict(ema=Call(torch.storage._load_from_bytes, hidden)), f)
    with pytest.raises(convert.ConvertError, match="cannot read"):
        convert.convert(str(tmp_path / "evil.pkl"), str(tmp_path / "o.pt"))
    assert not (tmp_path / MARKER).exists()


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
def test_dit_state_dict_round_trip(tmp_path):
    """A DiT training checkpoint {model, ema, opt, args}: the EMA is taken; the config is read from the shapes."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("dit-tiny", (4, 8, 8), label_dim=10))
    other = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    torch.save(dict(model=other, ema=net.state_dict(), opt={}, args=None), tmp_path / "dit.pt")
    cfg = convert.convert(str(tmp_path / "dit.pt"), str(tmp_path / "out.pt"))
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert cfg["net"] == "dit-tiny" and cfg["shape"] == [4, 8, 8] and cfg["label_dim"] == 10 and cfg["net_kwargs"] == {}
    assert state["ema"][0].keys() == net.state_dict().keys()
    assert all(torch.equal(state["ema"][0][k], v) for k, v in net.state_dict().items())
    torch.save(net.state_dict(), tmp_path / "plain.pt")  # the released files: a plain EMA state dict
    assert convert.convert(str(tmp_path / "plain.pt"), str(tmp_path / "out2.pt"))["net"] == "dit-tiny"


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


@needs("EDM2UNet")
def test_edm2_pickle_converts(tmp_path):
    """EDM2: the head lives on Precond in the official file and at the top level in ours; fp16 becomes fp32."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("edm2-tiny", (3, 16, 16), label_dim=10, logvar=True)).half()
    kwargs = {**nets.NETS["edm2-tiny"][1], "img_resolution": 16, "img_channels": 3, "label_dim": 10}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "dropout_res"}
    with nvidia_modules() as (reconstruct, EasyDict):
        unet = mirror(net, reconstruct, EVIL_SRC, skip=("logvar_fourier", "logvar_linear"))
        unet.meta["class_name"], unet.meta["state"]["_init_kwargs"] = "UNet", EasyDict(kwargs)
        heads = {n: mirror(getattr(net, n), reconstruct, EVIL_SRC) for n in ("logvar_fourier", "logvar_linear")}
        pre = Persistent(reconstruct, "Precond", dict(_modules=dict(unet=unet, **heads), _init_kwargs=EasyDict(
            img_resolution=16, img_channels=3, label_dim=10, use_fp16=True, logvar_channels=128)), EVIL_SRC)
        with open(tmp_path / "edm2.pkl", "wb") as f:
            pickle.dump(dict(ema=pre, encoder=None, loss_fn=None, dataset_kwargs=EasyDict()), f)
    cfg = convert.convert(str(tmp_path / "edm2.pkl"), str(tmp_path / "out.pt"))
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert cfg["net"] == "edm2-tiny" and cfg["logvar"] is True and cfg["source"]["format"] == "edm2-pkl"
    assert all(v.dtype == torch.float32 for v in state["ema"][0].values() if v.is_floating_point())
    assert_same_outputs(net, cfg, state, 10)
    # As a diffusion teacher / in fid.py calc: the net the diffusion method builds (no head) loads, the head dropped.
    frozen = train.frozen_ema(state, cfg["shape"], 10, "cpu", "converted EDM2")
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
    nets_of = {run: torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["net"] for run in ("cm", "edm")}
    assert "map_augment.weight" not in nets_of["cm"]  # dropped: it only ever saw zero labels
    assert nets_of["edm"]["map_augment.weight"].shape == (16, 9)  # kept: EDM's labels, training continues with them
    # The teacher is exactly the converted net (frozen, eval mode).
    ds = train.data.load(str(tmp_path / "imgs.zip"), str(tmp_path))
    teacher = train.load_teacher(ckpt, __import__("scm"), ds, 0, torch.device("cpu"))
    sd = torch.load(ckpt, weights_only=True)["ema"][0]
    assert not teacher.training and all(torch.equal(teacher.state_dict()[k], v) for k, v in sd.items())
