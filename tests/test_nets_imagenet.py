"""nets.py, ImageNet nets (ADM, EDM2, DiT): official parameter counts and key layouts (on the meta device), EDM2's
weight normalisation outside forward and resolution-restricted dropout, DiT's zero init and label embedding.
JVP == finite difference, fused == torch.func.jvp and compile tests for their tiny variants are in test_nets.py."""
import importlib
import math

import pytest
import torch

import nets
from conftest import randomize_
from test_nets import inputs, n_params


def meta_net(name, shape, **kwargs):
    with torch.device("meta"):  # shapes only, nothing allocated
        return nets.build_net(name, shape, **kwargs)


# --- Official configurations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, kwargs, count", [
    ("adm", (3, 64, 64), dict(label_dim=1000), 295_899_267),  # edm-imagenet-64x64-cond-adm.pkl
    ("edm2-xs", (3, 64, 64), dict(label_dim=1000, logvar=True), 124_710_949),
    ("edm2-s", (3, 64, 64), dict(label_dim=1000, logvar=True), 280_209_381),
    ("edm2-m", (3, 64, 64), dict(label_dim=1000, logvar=True), 497_803_173),
    ("edm2-l", (3, 64, 64), dict(label_dim=1000, logvar=True), 777_492_325),
    ("edm2-xl", (3, 64, 64), dict(label_dim=1000, logvar=True), 1_119_276_837),
    ("dit-b2", (4, 32, 32), dict(label_dim=1000), 130_512_416),  # official: learn_sigma, 1001 labels
    ("dit-xl2", (4, 32, 32), dict(label_dim=1000), 675_129_632),
    ("dit-b2", (4, 32, 32), dict(label_dim=1000, use_r=True), 131_288_080),  # MeanFlow: r embedder, no sigma
    ("dit-xl2", (4, 32, 32), dict(label_dim=1000, use_r=True), 676_735_504),
])
def test_official_parameter_counts(name, shape, kwargs, count):
    assert n_params(meta_net(name, shape, **kwargs)) == count


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_adm_keys():
    """EDM's ImageNet-64 ADM layout (edm-imagenet-64x64-cond-adm.pkl; NVlabs/edm `training/networks.py`,
    DhariwalUNet): map_label 768 x 1000 without bias, no augment map."""
    sd = shapes(meta_net("adm", (3, 64, 64), label_dim=1000, logvar=True))
    expected = {
        "map_label.weight": (768, 1000), "map_layer0.weight": (768, 192), "map_layer1.bias": (768,),
        "enc.64x64_conv.weight": (192, 3, 3, 3), "enc.64x64_block0.affine.weight": (384, 768),
        "enc.32x32_down.conv0.resample_filter": (1, 1, 2, 2), "enc.32x32_block0.skip.weight": (384, 192, 1, 1),
        "enc.32x32_block0.qkv.weight": (1152, 384, 1, 1), "enc.8x8_block2.norm2.weight": (768,),
        "dec.8x8_in0.proj.weight": (768, 768, 1, 1), "dec.16x16_up.conv0.weight": (768, 768, 3, 3),
        "dec.64x64_block3.conv1.weight": (192, 192, 3, 3), "out_norm.weight": (192,),
        "out_conv.weight": (3, 192, 3, 3), "logvar_linear.weight": (1, 192),
    }
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert "map_label.bias" not in sd and "map_augment.weight" not in sd
    assert "enc.32x32_down.skip.weight" not in sd  # resample_proj=False: a parameter-free resampling skip
    net = meta_net("adm", (3, 64, 64))
    attention = sorted(n for n, m in net.named_modules() if isinstance(m, nets.UNetBlock) and m.num_heads)
    assert len(attention) == 22  # at 32, 16 and 8: 3 encoder + 4 decoder blocks each, and the 8x8 decoder input
    assert net.enc["8x8_block0"].num_heads == 768 // 64 and net.enc["32x32_block0"].num_heads == 384 // 64


def test_edm2_keys():
    """EDM2 `unet.*` keys without the prefix, plus the log-variance head (NVlabs/edm2 `training/networks_edm2.py`,
    UNet and Precond); no biases."""
    C = 192
    sd = shapes(meta_net("edm2-s", (3, 64, 64), label_dim=1000, logvar=True))
    expected = {
        "out_gain": (), "emb_fourier.freqs": (C,), "emb_fourier.phases": (C,), "emb_noise.weight": (4 * C, C),
        "emb_label.weight": (4 * C, 1000), "enc.64x64_conv.weight": (C, 4, 3, 3), "enc.64x64_block0.emb_gain": (),
        "enc.64x64_block0.conv_res0.weight": (C, C, 3, 3), "enc.64x64_block0.emb_linear.weight": (C, 4 * C),
        "enc.64x64_block0.conv_res1.weight": (C, C, 3, 3), "enc.32x32_block0.conv_skip.weight": (2 * C, C, 1, 1),
        "enc.16x16_block0.attn_qkv.weight": (9 * C, 3 * C, 1, 1), "enc.16x16_block0.attn_proj.weight": (3 * C, 3 * C, 1, 1),
        "dec.8x8_in0.attn_qkv.weight": (12 * C, 4 * C, 1, 1), "dec.64x64_block3.conv_res0.weight": (C, 2 * C, 3, 3),
        "out_conv.weight": (3, C, 3, 3), "logvar_fourier.freqs": (128,), "logvar_linear.weight": (1, 128),
    }
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert not any(k.endswith("bias") for k in sd)
    assert not any("32x32" in k and "attn" in k for k in sd)  # attention at 16x16 and 8x8 only


def test_dit_keys():
    D = 1152
    sd = shapes(meta_net("dit-xl2", (4, 32, 32), label_dim=1000))
    expected = {
        "x_embedder.proj.weight": (D, 4, 2, 2), "x_embedder.proj.bias": (D,), "pos_embed": (1, 256, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.2.weight": (D, D),
        "y_embedder.embedding_table.weight": (1001, D), "blocks.27.attn.qkv.weight": (3 * D, D),
        "blocks.0.attn.proj.bias": (D,), "blocks.0.mlp.fc1.weight": (4 * D, D), "blocks.0.mlp.fc2.weight": (D, 4 * D),
        "blocks.0.adaLN_modulation.1.weight": (6 * D, D), "final_layer.linear.weight": (2 * 2 * 8, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for k, shape in expected.items():
        assert sd[k] == shape, k
    assert len([k for k in sd if k.startswith("blocks.")]) == 28 * 10


def test_registry_dropout_overrides_and_errors():
    assert meta_net("dit-b2", (4, 32, 32), dropout=0.3).blocks[0].dropout == 0.3
    assert meta_net("adm", (3, 64, 64), dropout=0.3).enc["64x64_block0"].dropout == 0.3
    assert meta_net("edm2-xs", (3, 64, 64), dropout=0.3).enc["16x16_block0"].dropout == 0.3
    with pytest.raises(ValueError, match="patch size"):
        nets.build_net("dit-tiny", (4, 9, 9))
    with pytest.raises(ValueError, match="divisible by 8; got H = 36"):
        nets.build_net("adm", (3, 36, 36))
    with pytest.raises(ValueError, match="square"):
        nets.build_net("edm2-tiny", (3, 16, 8))


# --- EDM2 -------------------------------------------------------------------------------------------------------

def tiny_edm2(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    net = nets.build_net("edm2-tiny", (3, 16, 16), label_dim=4, logvar=True, dropout=dropout)
    return randomize_(net.double(), seed)


def test_edm2_normalize_weights_keeps_the_function():
    """Forced weight normalisation only rescales weight rows, which forward normalises anyway: the function changes
    only through normalize's eps, by a relative ~eps |1/rms - 1| per layer. The first call moves rms from
    randomize_'s ~0.1 to 1 - O(eps); from then on a call changes outputs by ~1e-4 of the previous change."""
    net = tiny_edm2().eval()
    x, t, _, y = inputs((3, 16, 16))
    out0, _ = net(x, t, y=y, return_logvar=True)
    net.normalize_weights_()
    out1, _ = net(x, t, y=y, return_logvar=True)
    net.normalize_weights_()
    out2, logvar2 = net(x, t, y=y, return_logvar=True)
    net.normalize_weights_()
    out3, logvar3 = net(x, t, y=y, return_logvar=True)
    scale = out0.abs().max().item()
    assert (out1 - out0).abs().max() < 1e-2 * scale  # eps effect of the first call, ~1e-3 per layer
    assert (out2 - out1).abs().max() < 1e-5 * scale
    torch.testing.assert_close(out3, out2, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(logvar3, logvar2, rtol=0, atol=1e-9)
    for m in net.modules():
        if isinstance(m, nets.MPConv):
            rms = m.weight.flatten(1).square().mean(1).sqrt()
            torch.testing.assert_close(rms, torch.full_like(rms, 1 - 1e-4), rtol=0, atol=1e-7)


def test_edm2_forward_writes_nothing_in_place():
    """A training-mode forward + backward leaves every parameter and buffer bitwise unchanged (EDM2 writes the
    normalised weights in forward; here that is normalize_weights_, called by the training loop)."""
    net = tiny_edm2(dropout=0.2).train()
    before = {k: (v.clone(), v._version) for k, v in net.state_dict(keep_vars=True).items()}
    x, t, _, y = inputs((3, 16, 16))
    out, logvar = net(x, t, y=y, return_logvar=True)
    (out.square().mean() + logvar.sum()).backward()
    for k, v in net.state_dict(keep_vars=True).items():
        assert torch.equal(v, before[k][0]) and v._version == before[k][1], k


def test_edm2_dropout_only_at_chosen_resolutions():
    """dropout_res: every resolution by default (EDM2's own training), 16x16 and 8x8 in the CM/TCM presets."""
    for dropout_res, chosen in [(None, (64, 32, 16, 8)), ((16, 8), (16, 8)), ((64,), (64,))]:
        net = meta_net("edm2-s", (3, 64, 64), dropout=0.4, dropout_res=dropout_res)
        for name, block in [*net.enc.items(), *net.dec.items()]:
            if isinstance(block, nets.EDM2Block):
                res = int(name.split("x")[0])
                assert block.dropout == (0.4 if res in chosen else 0.0), (dropout_res, name)
    # The consistency recipes on EDM2 (reference CM/TCM/sCM configs: dropout_resolutions [16, 8]).
    presets = [p for m in ("cm", "tcm", "scm") for p in importlib.import_module(m).PRESETS.values()
               if p["net"].startswith("edm2")]
    assert len(presets) == 4 and all(p["dropout_res"] == (16, 8) for p in presets)
    # Functionally, in the tiny net (dropout at 8x8 only): 16x16 encoder outputs ignore the RNG, 8x8 ones do not.
    net = tiny_edm2(dropout=0.5).train()
    x, t, _, y = inputs((3, 16, 16))
    seen = {}
    for name in ("16x16_block0", "8x8_down", "8x8_block0"):
        net.enc[name].register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o))
    for seed in (0, 1):
        torch.manual_seed(seed)
        net(x, t, y=y)
    assert torch.equal(*seen["16x16_block0"])
    assert not torch.allclose(*seen["8x8_down"]) and not torch.allclose(*seen["8x8_block0"])


def test_edm2_null_label_and_ones_channel():
    """y=None is EDM2's zero label; the input gets one constant channel (4 input channels for RGB)."""
    net = tiny_edm2().eval()
    x, t, _, _ = inputs((3, 16, 16))
    # Bitwise: y=None builds the same zero labels and runs the very same ops.
    torch.testing.assert_close(net(x, t), net(x, t, y=torch.zeros(3, 4, dtype=x.dtype)), rtol=0, atol=0)
    assert net.enc["16x16_conv"].weight.shape[1] == 4


def test_edm2_r_input_changes_output():
    """use_r (our decision): r enters through its own Fourier embedding; the output depends on it."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("edm2-tiny", (3, 16, 16), use_r=True).double()).eval()
    x, t, r, _ = inputs((3, 16, 16))
    assert (net(x, t, r) - net(x, t, 0.5 * r)).abs().max() > 1e-3


# --- DiT --------------------------------------------------------------------------------------------------------

def test_dit_output_is_exactly_zero_at_init():
    for use_r in (False, True):
        torch.manual_seed(0)
        net = nets.build_net("dit-tiny", (4, 8, 8), label_dim=4, use_r=use_r).double()
        x, t, r, y = inputs((4, 8, 8))
        out = net(x, t, r if use_r else None, y)
        assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


def test_dit_label_embedding():
    """One-hot rows give the table row exactly; an all-zero row and y=None give the null row table[L]."""
    torch.manual_seed(0)
    net = randomize_(nets.build_net("dit-tiny", (4, 8, 8), label_dim=4).double()).eval()
    table = net.y_embedder.embedding_table.weight
    y = torch.nn.functional.one_hot(torch.tensor([2, 0, 3]), 4).double()
    y[1] = 0
    emb = net.label_embedding(y, 3)
    # Bitwise on any CPU: y @ table[:L] + (1 - sum y) table[L] with 0/1 entries only adds exact zeros and ones x rows.
    torch.testing.assert_close(emb, table[torch.tensor([2, 4, 3])], rtol=0, atol=0)
    torch.testing.assert_close(net.label_embedding(None, 3), table[[4, 4, 4]], rtol=0, atol=0)
    x, t, _, _ = inputs((4, 8, 8))
    torch.testing.assert_close(net(x, t), net(x, t, y=torch.zeros(3, 4, dtype=x.dtype)), rtol=0, atol=0)


def test_dit_learn_sigma_returns_the_first_channels():
    """learn_sigma doubles the final layer's outputs (official layout: patch p, q, then channel); the net returns
    the first C channels, i.e. the same as a learn_sigma=False net holding those rows of the final linear."""
    torch.manual_seed(0)
    full = randomize_(nets.build_net("dit-tiny", (4, 8, 8), label_dim=4, learn_sigma=True).double()).eval()
    half = nets.build_net("dit-tiny", (4, 8, 8), label_dim=4, learn_sigma=False).double().eval()
    sd = full.state_dict()
    D = sd["final_layer.linear.weight"].shape[1]
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"].reshape(4, 8, D)[:, :4].reshape(16, D)
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"].reshape(4, 8)[:, :4].reshape(16)
    half.load_state_dict(sd)
    x, t, _, y = inputs((4, 8, 8))
    torch.testing.assert_close(full(x, t, y=y), half(x, t, y=y), rtol=0, atol=1e-13)


def test_dit_pos_embed_layout():
    """Official fixed 2-D sin-cos: first half of the features encodes the column j, second half the row i, each
    [sin, cos] with frequency 1 in the first slot; token i * grid + j."""
    net = nets.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=4)
    pe, g, D = net.pos_embed[0].double(), 4, 32
    assert not net.pos_embed.requires_grad
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        row = pe[i * g + j]
        expected = torch.tensor([math.sin(j), math.cos(j), math.sin(i), math.cos(i)], dtype=torch.float64)
        torch.testing.assert_close(row[[0, D // 4, D // 2, 3 * D // 4]], expected, rtol=0, atol=1e-6)
