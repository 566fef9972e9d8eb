"""augment.py: EDM's non-leaky augmentation pipeline. Labels are decoded here on their own (EDM's layout) and the
transform they name is applied to an analytic image, so a wrong sign, scale, order or label entry fails. Probabilities
and parameter distributions are checked over many draws; train.py's wiring (labels reach the net, presets, 1 rank x 2
rounds == 2 ranks) at the end."""
import math
import os
import subprocess
import sys

import pytest
import torch

import augment
import nets
import recipe
import train
from conftest import ROOT
from test_data import write_image_zip

H = W = 32


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def only(name, mult=1):
    return {name: mult}


def smooth(x, y):
    """A smooth image that reflect-padding continues exactly: cosines even about the first and last pixel centres
    (x, y are pixel coordinates, float64)."""
    u, v = math.pi * x / (W - 1), math.pi * y / (H - 1)
    return torch.cos(2 * u) * torch.cos(v) + 0.5 * torch.cos(u) * torch.cos(3 * v) + 0.3 * torch.cos(3 * u) * torch.cos(2 * v)


def image(B):
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return smooth(x, y).expand(B, 3, H, W).clone()


def expected(M):
    """Output pixel q (centred coordinates) shows the input at M q: the analytic image there, (B, 3, H, W)."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    q = torch.stack([x - (W - 1) / 2, y - (H - 1) / 2]).reshape(2, -1)  # (2, H W)
    src = M @ q  # (B, 2, H W)
    out = smooth(src[:, 0] + (W - 1) / 2, src[:, 1] + (H - 1) / 2).reshape(-1, 1, H, W)
    return out.expand(-1, 3, H, W)


def rot(a):
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)


def diag(sx, sy):
    return torch.diag_embed(torch.stack([sx, sy], -1))


# --- Identity and labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipe", ["edm", "meanflow"])
def test_p0_is_identity_with_zero_labels(pipe):
    x = torch.randn(5, 3, H, W, generator=gen(1))
    out, labels = augment.augment(x, 0.0, pipe, gen())
    assert torch.equal(out, x) and labels.shape == (5, dict(edm=9, meanflow=6)[pipe]) and not labels.any()


def test_resampling_without_transform_reproduces_the_image():
    """The sym6 2x up/down chain is (numerically) perfect reconstruction: an identity geometric map returns the
    input to 1e-10 in float64, edges included."""
    x = torch.randn(3, 3, H, W, generator=gen(2), dtype=torch.float64)
    out = augment.apply(x, dict(scale=torch.zeros(3, dtype=torch.float64)))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)


def test_label_layout_and_dims():
    assert augment.label_dim("edm") == 9 and augment.label_dim("meanflow") == 6
    assert augment.label_dim(dict(rotate_int=1, translate_int=1)) == 4
    params = augment.sample_params(4000, 1.0, "edm", gen())
    labels = augment.labels_of(params, H, W)
    w, r = params["aniso"].unbind(1)
    cols = [params["xflip"], params["yflip"], params["scale"], params["rotate_frac"].cos() - 1,
            params["rotate_frac"].sin(), w * r.cos(), w * r.sin(), *params["translate_frac"].unbind(1)]
    torch.testing.assert_close(labels, torch.stack(cols, 1).float())


def test_flips_and_quarter_turns_invert_from_their_labels():
    x = torch.randn(64, 3, H, W, generator=gen(3))
    out, labels = augment.augment(x, 1.0, dict(xflip=1, yflip=1, rotate_int=1), gen(4))
    xf, yf, a, b = labels.unbind(1)
    k = torch.tensor([[0, 3], [1, 2]])[a.long(), b.long()]  # (k in {1, 2}, k in {2, 3}) -> k
    assert set(k.tolist()) == {0, 1, 2, 3} and set(xf.tolist()) == set(yf.tolist()) == {0, 1}
    for i in range(64):
        back = torch.rot90(out[i], -int(k[i]), dims=(1, 2))  # undo k counter-clockwise quarter turns
        back = back.flip(1) if yf[i] else back
        back = back.flip(2) if xf[i] else back
        assert torch.equal(back, x[i]), i


def test_integer_translation_from_its_labels():
    x = torch.randn(64, 3, H, W, generator=gen(5))
    out, labels = augment.augment(x, 1.0, only("translate_int"), gen(6))
    shift = labels * (0.125 * W)  # label = pixels / (0.125 size)
    assert torch.equal(shift, shift.round()) and shift.abs().max() == 4
    for i in range(64):
        tx, ty = int(shift[i, 0]), int(shift[i, 1])
        moved = torch.roll(x[i], (ty, tx), dims=(1, 2))
        ys, xs = slice(max(ty, 0), H + min(ty, 0)), slice(max(tx, 0), W + min(tx, 0))  # pixels with a source inside
        assert torch.equal(out[i][:, ys, xs], moved[:, ys, xs]), i
        if tx > 0:  # vacated columns mirror the image about its first column
            assert torch.equal(out[i][:, ys, tx - 1], x[i][:, ys.start - ty:ys.stop - ty, 1])


TOL = 0.05  # resampling error of the smooth image: below 0.04 (bilinear on the 2x grid, the filter's passband)


@pytest.mark.parametrize("name", ["scale", "rotate_frac", "translate_frac", "aniso"])
def test_geometric_transform_from_its_labels(name):
    B = 24
    x = image(B)
    params = augment.sample_params(B, 1.0, only(name), gen(7))
    out = augment.apply(x, params)
    lab = augment.labels_of(params, H, W).double()
    if name == "scale":
        s = 2 ** (0.2 * lab[:, 0])  # content zoomed by s
        M = diag(1 / s, 1 / s)
    elif name == "rotate_frac":
        M = rot(torch.atan2(lab[:, 1], lab[:, 0] + 1))
    elif name == "translate_frac":
        t = lab * (0.125 * W)  # content moved by t pixels
        torch.testing.assert_close(out, _translated(B, t), rtol=0, atol=TOL)
        return
    else:  # (w, r) and (-w, r + pi) share a label: take r from the parameters, w from the label
        r = params["aniso"][:, 1].double()
        assert ((r == 0).float().mean() - 0.5).abs() < 0.3  # both kinds present
        w = lab[:, 0] / r.cos()
        torch.testing.assert_close(w * r.sin(), lab[:, 1], rtol=0, atol=1e-5)
        s = 2 ** (0.2 * w)  # stretched by s along angle r
        M = rot(-r) @ diag(1 / s, s) @ rot(r)
    torch.testing.assert_close(out, expected(M), rtol=0, atol=TOL)


def _translated(B, t):
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([smooth(x - t[i, 0], y - t[i, 1]) for i in range(B)])[:, None].expand(B, 3, H, W)


def test_geometric_transforms_compose_in_edms_order():
    """scale, then rotation, then anisotropic stretch, then translation: the output pixel q shows the input at
    S^-1 R A^-1 (q - t) (EDM's G_inv product)."""
    B = 16
    params = augment.sample_params(B, 1.0, dict(scale=1, rotate_frac=1, aniso=1, translate_frac=1), gen(8))
    out = augment.apply(image(B), params)
    s = 2 ** (0.2 * params["scale"].double())
    w, r = params["aniso"].double().unbind(1)
    sa = 2 ** (0.2 * w)
    M = diag(1 / s, 1 / s) @ rot(params["rotate_frac"].double()) @ rot(-r) @ diag(1 / sa, sa) @ rot(r)
    t = params["translate_frac"].double() * (0.125 * W)
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    q = torch.stack([x - (W - 1) / 2, y - (H - 1) / 2]).reshape(2, -1)
    src = M @ (q - t[:, :, None])
    ref = smooth(src[:, 0] + (W - 1) / 2, src[:, 1] + (H - 1) / 2).reshape(B, 1, H, W).expand(B, 3, H, W)
    inside = (src.abs().amax(1) < (W - 1) / 2 + 6).reshape(B, 1, H, W).expand(B, 3, H, W)  # within the padding
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(out[inside], ref[inside], rtol=0, atol=TOL)

# --- Probabilities and distributions (non-leaky: what is stated above is what is drawn) ---------------------------


def test_applied_probabilities_and_parameter_distributions():
    n, p = 200_000, 0.12
    prm = augment.sample_params(n, p, "edm", gen(9))

    def close(value, target, std):  # 5 standard errors
        assert abs(float(value) - target) < 5 * std, (float(value), target)

    se = math.sqrt(p * (1 - p) / n)
    close((prm["xflip"] == 1).double().mean(), 0.5, math.sqrt(0.25 / n))  # x-flip multiplier 1e8: a fair coin
    close((prm["yflip"] == 1).double().mean(), p / 2, math.sqrt(p / 2 / n))
    applied = {k: (prm[k] != 0).reshape(n, -1).any(1) for k in ("scale", "rotate_frac", "aniso", "translate_frac")}
    for k, a in applied.items():
        close(a.double().mean(), p, se)
    close((applied["scale"] & applied["aniso"]).double().mean(), p * p, math.sqrt(p * p / n))  # independent
    m = int(applied["scale"].sum())
    w = prm["scale"][applied["scale"]].double()
    close(w.mean(), 0, 1 / math.sqrt(m))
    close(w.std(), 1, 1 / math.sqrt(2 * m))
    a = prm["rotate_frac"][applied["rotate_frac"]].double()  # U(-pi, pi)
    assert a.abs().max() <= math.pi
    close(a.mean(), 0, math.pi / math.sqrt(3 * len(a)))
    close(a.var(), math.pi ** 2 / 3, 0.1 * math.pi ** 2 / 3)
    wa, ra = prm["aniso"][applied["aniso"]].double().unbind(1)
    close(wa.std(), 1, 1 / math.sqrt(2 * len(wa)))
    close((ra == 0).double().mean(), 0.5, math.sqrt(0.25 / len(ra)))
    close(ra[ra != 0].abs().mean(), math.pi / 2, math.pi / math.sqrt(12 * len(ra) / 2))
    t = prm["translate_frac"][applied["translate_frac"]].double()
    close(t.std(0)[0], 1, 1 / math.sqrt(2 * len(t)))
    close(t.std(0)[1], 1, 1 / math.sqrt(2 * len(t)))
    # The meanflow pipe: untouched (all geometric labels zero) with probability (1 - p)^3.
    lab = augment.labels_of(augment.sample_params(n, p, "meanflow", gen(10)), H, W)
    close((lab[:, 1:] == 0).all(1).double().mean(), (1 - p) ** 3, math.sqrt(0.7 * 0.3 / n))


def test_integer_translation_distribution():
    n = 100_000
    shift = augment.labels_of(augment.sample_params(n, 1.0, only("translate_int"), gen(11)), H, W) * (0.125 * W)
    counts = torch.stack([(shift[:, 0] == v).double().mean() for v in range(-4, 5)])
    expect = torch.tensor([0.5] + [1.0] * 7 + [0.5], dtype=torch.float64) / 8  # round(U(-4, 4)): half-width ends
    torch.testing.assert_close(counts, expect, rtol=0, atol=5 * math.sqrt(0.125 / n))


def test_same_generator_seed_same_augmentation():
    x = torch.randn(8, 3, H, W, generator=gen(12))
    a = augment.augment(x, 0.5, "edm", gen(13))
    b = augment.augment(x, 0.5, "edm", gen(13))
    c = augment.augment(x, 0.5, "edm", gen(14))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])

# --- train.py --------------------------------------------------------------------------------------------------------


def test_labels_reach_the_net_only_inside_the_loss():
    torch.manual_seed(0)
    net = nets.build_net("ddpmpp-tiny", (3, 16, 16), augment_dim=6).double().eval()
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    aug = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        net.map_augment.weight.normal_()
        with augment.augment_labels(net, aug):
            inside = net(x, t)
        assert torch.equal(inside, net(x, t, aug=aug)) and not torch.equal(net(x, t), inside)
        with augment.augment_labels(net, None):
            assert torch.equal(net(x, t), net(x, t, aug=torch.zeros_like(aug)))


@pytest.mark.parametrize("method, pipe, dim, count", [("meanflow", "meanflow", 6, 55_799_811),
                                                     ("diffusion", "edm", 9, 55_733_891)])
def test_cifar10_presets(method, pipe, dim, count):
    """The MeanFlow CIFAR-10 net (augment_dim 6, as FastGen 34f30e8 sets it in
    `fastgen/configs/experiments/EDM/config_mf_cifar10.py`) has 55,799,811 parameters; EDM's is 55,733,891."""
    _, cfg, m, _ = recipe.resolve_config(["--method", method, "--data", "cifar10"])
    assert cfg["augment"] == 0.12 and cfg["augment_pipe"] == pipe and cfg["xflip"] == (method == "meanflow")
    with torch.device("meta"):
        net = train.build_net(cfg, m, (3, 32, 32), 0)
    assert net.map_augment.weight.shape[1] == dim and sum(p.numel() for p in net.parameters()) == count


def test_augment_on_points_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--augment is for images"):
        train.cli(["--method", "meanflow", "--data", "toy", "--augment", "0.1", "--out", str(tmp_path / "r")])


@pytest.mark.slow  # about 20 s alone, minutes on a busy CPU
def test_two_gloo_ranks_match_one_process_with_augmentation(tmp_path):
    """Augmentations are drawn per (seed, step, micro-batch): 2 ranks x 1 round == 1 rank x 2 rounds."""
    write_image_zip(tmp_path / "imgs.zip", n=8, res=16, labels=False)
    common = ["--method", "diffusion", "--data", str(tmp_path / "imgs.zip"), "--net", "ddpmpp-tiny", "--steps", "2",
              "--batch", "8", "--batch-gpu", "4", "--augment", "0.5", "--lr-warmup", "0",  # warm-up: updates too small
              "--log-every", "1", "--num-samples", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *common, "--out", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights identical on all 2 ranks" in p.stdout and "2 ranks x 1 rounds x 4" in p.stdout
    train.cli([*common, "--out", str(tmp_path / "single")])
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["net"]
    # Adam at lr 1e-3 from step 1 turns float-rounding differences of near-zero gradients into rare ~lr steps;
    # augmentations drawn from another seed move almost every weight.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-5).double().mean() < 0.01, float((diff > 1e-5).double().mean())
    assert a["map_augment.weight"].shape == (16, 9)
