"""fid.py and inception.py: the Frechet distance in float64, the Inception-v3 port's layout, the weight loader and its
checks, the TF1 resize, and the ref/calc commands end to end (per-image seeds; 2 gloo ranks equal 1 process). The
published detector weights cannot be fetched here: every test uses random weights saved under a hub-style file name."""
import ast
import io
import json
import math
import os
import re
import subprocess
import sys
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import fid
import inception
import recipe
import train
from conftest import ROOT, save_hub_named, tiny_ref
from test_data import write_image_zip

# --- Frechet distance ------------------------------------------------------------------------------------------


def random_cov(d, rank, g):
    A = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return A @ A.T / rank


def sqrtm_denman_beavers(A, iters=60):
    """Principal square root by the Denman-Beavers iteration (Y -> A^1/2, Z -> A^-1/2), no eigendecomposition."""
    Y, Z = A.clone(), torch.eye(len(A), dtype=A.dtype)
    for _ in range(iters):
        Y, Z = (Y + torch.linalg.inv(Z)) / 2, (Z + torch.linalg.inv(Y)) / 2
    return Y


def fid_direct(mu1, s1, mu2, s2, tr_sqrt):
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def test_frechet_matches_two_direct_computations():
    """Against tr sqrt(S1 S2) from the eigenvalues of the non-symmetric product, and from a Denman-Beavers square
    root of S1 S2 (full-rank, well-conditioned: both oracles converge). Tolerance 1e-9 relative, float64."""
    g = torch.Generator().manual_seed(0)
    d = 24
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = random_cov(d, 4 * d, g) + 0.1 * torch.eye(d), random_cov(d, 4 * d, g) + 0.1 * torch.eye(d)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    db = sqrtm_denman_beavers(s1 @ s2).trace()
    assert got == pytest.approx(fid_direct(mu1, s1, mu2, s2, eig), rel=1e-9)
    assert got == pytest.approx(fid_direct(mu1, s1, mu2, s2, db), rel=1e-9)
    assert got > 1.0


def test_frechet_closed_form_commuting_and_symmetry():
    """Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2; also rotated by one orthogonal
    Q (still commuting), symmetric in its arguments, 0 for identical statistics."""
    g = torch.Generator().manual_seed(1)
    d = 16
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64) * 3
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert fid.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s1, s2 = Q @ torch.diag(a) @ Q.T, Q @ torch.diag(b) @ Q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)
    s = random_cov(d, 3 * d, g)
    assert abs(fid.frechet_distance(mu1, s, mu1, s)) < 1e-10 * float(s.trace())


def test_frechet_singular_covariances_stay_finite():
    """Rank-3 covariances in 512 dimensions (as FID on a handful of images): finite, >= 0 up to rounding, equal to
    the closed form when they commute (diagonal with zeros)."""
    g = torch.Generator().manual_seed(2)
    d = 512
    s1, s2 = random_cov(d, 3, g), random_cov(d, 3, g)
    mu = torch.zeros(d, dtype=torch.float64)
    value = fid.frechet_distance(mu, s1, mu, s2)
    assert math.isfinite(value) and value > -1e-8
    a, b = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    a[:3], b[1:4] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 0.5, 2.0])
    expected = float((a.sqrt() - b.sqrt()).square().sum())
    assert fid.frechet_distance(mu, torch.diag(a), mu, torch.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_factors_whichever_covariance_is_positive_definite():
    """One covariance singular (rank 3, as a handful of images), the other positive definite, in both orders: the
    Cholesky factor of the definite one gives what the non-symmetric product's three nonzero eigenvalues give; so does
    S1's eigendecomposition where both are singular. Tolerance 1e-5 absolute on a value of ~120: the 37 zero
    eigenvalues come out as +-1e-15, and the square roots of those the function keeps add up to ~1e-6."""
    g = torch.Generator().manual_seed(4)
    d = 40
    low, full = random_cov(d, 3, g), random_cov(d, 4 * d, g) + 0.1 * torch.eye(d)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    for s1, s2 in ((low, full), (full, low), (low, random_cov(d, 5, g))):
        lam = torch.linalg.eigvals(s1 @ s2).real  # rank 3: 3 eigenvalues, the rest rounding (whose sqrt is not small)
        eig = lam[lam > 1e-9 * lam.max()].sqrt().sum()
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid_direct(mu1, s1, mu2, s2, eig), abs=1e-5)


def test_feature_stats_match_numpy_for_any_batch_split():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(37, 2048, generator=g) * 3 + 1  # float32 features, as the detector gives
    ref_mu, ref_sigma = f.double().mean(0).numpy(), np.cov(f.double().numpy(), rowvar=False)
    for split in ([37], [5, 30, 2], [1] * 37):
        stats = fid.FeatureStats("cpu")
        for part in torch.split(f, split):
            stats.add(part)
        mu, sigma, n, bad = stats.result()
        assert n == 37 and bad == 0
        np.testing.assert_allclose(mu.numpy(), ref_mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma.numpy(), ref_sigma, rtol=1e-9, atol=1e-11)

# --- Protocol: quantisation and TF1 resize -----------------------------------------------------------------------


def test_quantize_round_trips_the_data_convention():
    """Data are u / 127.5 - 1; floor(127.5 x + 128) gives u back for all 256 values; clipping; NaN -> 128."""
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(fid.quantize(u.float() / 127.5 - 1), u)
    x = torch.tensor([-5.0, -1.0, -0.999, 0.0, 0.999, 1.0, 7.0, float("nan"), float("inf")])
    assert fid.quantize(x).tolist() == [0, 0, 0, 128, 255, 255, 255, 128, 128]


def test_resize_tf1_hand_computed():
    """Source coordinate = dst * in / out (no half-pixel offset): a 4-pixel ramp 0, 10, 20, 30 upsampled to 8 gives
    0, 5, ..., 30, 30 (the last source 3.5 clamps its right neighbour); 4 -> 2 picks pixels 0 and 2; in == out is
    the identity. torch's F.interpolate(align_corners=False) samples (dst + 0.5) in / out - 0.5 instead: it starts
    at 0, 2.5, 7.5 and differs, which is why FIDs from pytorch-fid's resize are not comparable."""
    ramp = torch.tensor([0.0, 10.0, 20.0, 30.0]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = fid.resize_tf1(ramp, 8)
    assert up.shape == (1, 1, 8, 8)
    assert up[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 30.0]
    assert torch.equal(up[0, 0, :, 3], torch.full((8,), 15.0))  # constant along the height
    assert fid.resize_tf1(ramp, 2)[0, 0, 0].tolist() == [0.0, 20.0]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fid.resize_tf1(x, 5), x)
    torch_up = F.interpolate(ramp, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch_up[0, 0, 0, :3].tolist() == [0.0, 2.5, 7.5]
    assert not torch.allclose(torch_up, up)


def test_resize_tf1_matches_a_scalar_formula():
    """Every output pixel of a random 5 x 7 image resized to 11 x 11, against the bilinear formula written per pixel
    (float64 throughout, tolerance 1e-12)."""
    x = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 255
    out = fid.resize_tf1(x, 11)
    img = x[0, 0].tolist()
    for i in range(11):
        for j in range(11):
            sy, sx = i * 5 / 11, j * 7 / 11
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            top = img[y0][x0] + (img[y0][x1] - img[y0][x0]) * fx
            bottom = img[y1][x0] + (img[y1][x1] - img[y1][x0]) * fx
            assert out[0, 0, i, j].item() == pytest.approx(top + (bottom - top) * fy, abs=1e-12)

# --- Inception port: layout and loader ------------------------------------------------------------------------


def expected_convs():
    """(name, c_in, c_out, kh, kw) of every conv + BN of torchvision's Inception3 without its aux head, in module
    order, from the architecture (Szegedy et al. 2015, torchvision's inception.py layout)."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]

    def block(name, rows):
        convs.extend((f"{name}.{r[0]}", *r[1:]) for r in rows)

    for name, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        block(name, [("branch1x1", c, 64, 1, 1), ("branch5x5_1", c, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
                     ("branch3x3dbl_1", c, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3),
                     ("branch3x3dbl_3", 96, 96, 3, 3), ("branch_pool", c, pool, 1, 1)])
    block("Mixed_6a", [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
                       ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)])
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block(name, [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
                     ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", 768, c7, 1, 1),
                     ("branch7x7dbl_2", c7, c7, 7, 1), ("branch7x7dbl_3", c7, c7, 1, 7),
                     ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
                     ("branch_pool", 768, 192, 1, 1)])
    block("Mixed_7a", [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                       ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                       ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)])
    for name, c in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        block(name, [("branch1x1", c, 320, 1, 1), ("branch3x3_1", c, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
                     ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", c, 448, 1, 1),
                     ("branch3x3dbl_2", 448, 384, 3, 3), ("branch3x3dbl_3a", 384, 384, 1, 3),
                     ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", c, 192, 1, 1)])
    return convs


SPOT_CHECKS = {  # first and last key of every block, some factorised kernels, fc
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1), "Mixed_5b.branch_pool.bn.running_var": (32,),
    "Mixed_5c.branch1x1.conv.weight": (64, 256, 1, 1), "Mixed_5c.branch_pool.bn.running_var": (64,),
    "Mixed_5d.branch1x1.conv.weight": (64, 288, 1, 1), "Mixed_5d.branch_pool.bn.running_var": (64,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_3.bn.running_var": (96,),
    "Mixed_6b.branch1x1.conv.weight": (192, 768, 1, 1), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch_pool.bn.running_var": (192,),
    "Mixed_6c.branch1x1.conv.weight": (192, 768, 1, 1), "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6c.branch_pool.bn.running_var": (192,),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1), "Mixed_6d.branch_pool.bn.running_var": (192,),
    "Mixed_6e.branch1x1.conv.weight": (192, 768, 1, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_6e.branch_pool.bn.running_var": (192,),
    "Mixed_7a.branch3x3_1.conv.weight": (192, 768, 1, 1), "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.bn.running_var": (192,),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1), "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch_pool.bn.running_var": (192,),
    "Mixed_7c.branch1x1.conv.weight": (320, 2048, 1, 1), "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048), "fc.bias": (1008,),
}


def test_inception_layout_matches_the_published_state_dicts():
    """Keys (in order) and shapes equal the torchvision-style layout of pt_inception-2015-12-05-6726825d.pth.
    Counts: 94 conv+BN units x 5 tensors + fc.{weight,bias} = 472 keys (BN num_batches_tracked aside).
    Parameters: torchvision's Inception3 has 27,161,264 (its docs' num_params, aux head and 1000 classes); the aux
    head is 768*128 + 2*128 + 128*768*25 + 2*768 + 768*1000 + 1000 = 3,326,696; 8 more classes add 8 * 2049: so
    23,850,960. The state dict also holds BN running means and variances (2 * 17,216 channels): 23,885,392 floats."""
    net = inception.InceptionV3()
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = {}
    for name, c_in, c_out, kh, kw in expected_convs():
        expected[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        expected.update({f"{name}.bn.{p}": (c_out,) for p in ("weight", "bias", "running_mean", "running_var")})
    expected.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    assert list(sd.items()) == list(expected.items())
    assert {k: sd[k] for k in SPOT_CHECKS} == SPOT_CHECKS
    assert len(expected_convs()) == 94 and len(sd) == 472
    derived = sum(co * ci * kh * kw + 2 * co for _, ci, co, kh, kw in expected_convs()) + 2048 * 1008 + 1008
    assert derived == 27_161_264 - 3_326_696 + 8 * 2049 == 23_850_960
    assert sum(p.numel() for p in net.parameters()) == derived
    assert sum(math.prod(s) for s in sd.values()) == 23_885_392
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 94 and all(m.eps == 1e-3 for m in bn)


def test_tf_graph_pool_branches():
    """The A, C and first E blocks average over real pixels only (count_include_pad=False), the last E block
    max-pools: a block whose only nonzero path is branch_pool (identity 1x1 conv, BN off) shows which."""
    def pool_output(block, c_in):
        with torch.no_grad():
            for name, m in block.named_modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.zero_()
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.fill_(1 - m.eps)  # BN is the identity
            block.branch_pool.conv.weight[:, :, 0, 0] = torch.eye(block.branch_pool.conv.out_channels, c_in)
        x = torch.rand(1, c_in, 5, 5, generator=torch.Generator().manual_seed(0)) + 1
        out = block.eval()(x)[:, -block.branch_pool.conv.out_channels:]
        return x[:, :out.shape[1]], out
    blocks = (inception.BlockA(192, 32), 192), (inception.BlockC(768, 128), 768), (inception.BlockE(1280, "avg"), 1280)
    for block, c_in in blocks:
        x, out = pool_output(block, c_in)
        torch.testing.assert_close(out[..., 0, 0], x[..., :2, :2].mean((-1, -2)))  # corner: 4 real pixels
    x, out = pool_output(inception.BlockE(2048, "max"), 2048)
    torch.testing.assert_close(out[..., 0, 0], x[..., :2, :2].amax((-1, -2)))


def test_loader_round_trip_and_features(detector, tmp_path):
    """The file loads strictly, with or without BN's num_batches_tracked, into exactly the saved weights; features
    are (N, 2048), float32, finite, equal to the saved net on the protocol's input, and do not depend on the batch
    they were computed in (float32 tolerance 1e-5)."""
    path, net = detector
    loaded, digest = inception.load_detector(path, "cpu", str(tmp_path))
    assert digest == data.file_digest(path) and os.path.basename(path).endswith(f"-{digest[:8]}.pth")
    bare = save_hub_named({k: v for k, v in net.state_dict().items() if "num_batches" not in k}, str(tmp_path))
    for other in (loaded, inception.load_detector(bare, "cpu", str(tmp_path))[0]):
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in net.state_dict().items())
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = fid.features(loaded, images)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all() and f.std() > 0
    with torch.no_grad():
        direct = net(fid.resize_tf1(images.float(), 299) / 128 - 1)
    torch.testing.assert_close(f, direct, rtol=1e-5, atol=1e-6)
    split = torch.cat([fid.features(loaded, images[:1]), fid.features(loaded, images[1:])])
    torch.testing.assert_close(split, f, rtol=1e-5, atol=1e-6)


def test_loader_refusals(detector, tmp_path, monkeypatch):
    path, _ = detector
    cache = str(tmp_path / "cache")
    wrong = tmp_path / "rand-inception-00000000.pth"
    os.link(path, wrong)
    with pytest.raises(inception.DetectorError, match="SHA-256 .* promises 00000000"):
        inception.load_detector(str(wrong), "cpu", cache)
    unnamed = tmp_path / "inception.pth"
    os.link(path, unnamed)
    with pytest.raises(inception.DetectorError, match="torch.hub convention"):
        inception.load_detector(str(unnamed), "cpu", cache)
    with pytest.raises(inception.DetectorError, match="run code"):
        inception.load_detector("inception-2015-12-05.pt", "cpu", cache)
    short = save_hub_named({"fc.weight": torch.zeros(1008, 2048)}, str(tmp_path), "partial")
    with pytest.raises(inception.DetectorError, match=r"^detector .*partial-.*\.pth does not fit this data/net: "):
        inception.load_detector(short, "cpu", cache)
    assert not os.path.exists(cache)  # local files never touch the cache


def test_fid_reports_detector_errors_as_usage_errors(detector, tmp_path):
    """fid.py's boundary: inception.py's DetectorError comes out of fid.load_detector / fid.fetch_detector (and so
    out of fid.fid_evaluator, train.py --fid-every) as the UsageError the commands print as one line, same text."""
    cache = str(tmp_path)
    short = save_hub_named({"fc.weight": torch.zeros(1008, 2048)}, cache, "partial")
    pairs = [(lambda: inception.load_detector(short, "cpu", cache), lambda: fid.load_detector(short, "cpu", cache)),
             (lambda: inception.load_detector("missing/x.pth", "cpu", cache),
              lambda: fid.load_detector("missing/x.pth", "cpu", cache)),
             (lambda: inception.fetch_detector("inception-2015-12-05.pt", cache),
              lambda: fid.fetch_detector("inception-2015-12-05.pt", cache))]
    for direct, through_fid in pairs:
        with pytest.raises(inception.DetectorError) as raised:
            direct()
        with pytest.raises(train.UsageError) as reported:
            through_fid()
        assert str(reported.value) == str(raised.value) and "\n" not in str(reported.value)
    assert fid.load_detector(detector[0], "cpu", None)[1] == data.file_digest(detector[0])  # None: data.py's cache


def test_inception_imports_nothing_of_the_project():
    """inception.py stands alone: standard library, torch and numpy only."""
    with open(os.path.join(ROOT, "inception.py")) as f:
        tree = ast.parse(f.read())
    roots = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert roots <= set(sys.stdlib_module_names) | {"torch", "numpy"}, roots


def test_missing_detector_names_the_urls(tmp_path, monkeypatch, capsys):
    """No network: the known name is fetched (urlopen fails here, patched) and the one-line error names both URLs
    and the flag; a missing local path says the same. From the shell: exit status 1."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    with pytest.raises(inception.DetectorError) as e:
        inception.load_detector(inception.DETECTOR_DEFAULT, "cpu", cache_dir=str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "--detector PATH" in message
    assert all(url in message for url in inception.DETECTOR_URLS.values())
    assert not os.listdir(tmp_path)  # no half file left behind
    missing = "no detector file missing/x.pth; fetch https://github.com/mseitzer"
    with pytest.raises(inception.DetectorError, match=missing):
        inception.load_detector("missing/x.pth", "cpu", str(tmp_path))
    p = subprocess.run([sys.executable, "fid.py", "ref", "--data", "toy", "--out", str(tmp_path / "r.npz"),
                        "--detector", "missing/x.pth"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "fid.py: error: no detector file" in p.stderr

# --- Sampler lists -------------------------------------------------------------------------------------------------


def test_sampler_lists():
    import cm
    import diffusion
    import meanflow
    import scm
    one = fid.sampler_config(cm, cm.Config(), steps=1)
    assert one.sample_sigmas == (79.5638, 0.0)
    two = fid.sampler_config(cm, cm.Config(), steps=2).sample_sigmas
    assert two[0] == pytest.approx(79.5638, abs=1e-4) and two[1] == pytest.approx(2.5265, abs=1e-4) and two[2] == 0
    assert fid.sampler_config(scm, scm.Config(), steps=1).sample_sigmas == (80.0, 0.0)
    assert fid.sampler_config(scm, scm.Config(), sigmas=(80.0, 0.821, 0.0)).sample_sigmas == (80.0, 0.821, 0.0)
    assert fid.sampler_config(meanflow, meanflow.Config(), steps=2).sample_ts == pytest.approx((0.999, 0.5, 0.0))
    assert fid.sampler_config(diffusion, diffusion.Config(), steps=3).sample_steps == 3
    assert fid.sampler_config(cm, cm.Config()) == cm.Config()
    for kwargs, message in [(dict(steps=3, sigmas=(80.0, 1.0, 0.0)), "contradicts"), (dict(ts=(0.9, 0.0)), "--ts"),
                            (dict(sigmas=(1.0, 2.0, 0.0)), "decrease"), (dict(steps=0), ">= 1")]:
        with pytest.raises(train.UsageError, match=message):
            fid.sampler_config(cm, cm.Config(), **kwargs)
    with pytest.raises(train.UsageError, match="--steps only"):
        fid.sampler_config(diffusion, diffusion.Config(), sigmas=(80.0, 0.0))

# --- ref / calc end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def image_run(tmp_path_factory):
    """A 2-step conditional cm run (ddpmpp-tiny, 16 x 16 RGB, 3 classes, 3 EMAs), its data and a toy run."""
    tmp = tmp_path_factory.mktemp("fid-runs")
    write_image_zip(tmp / "imgs.zip", n=10, res=16)
    fast = ["--log-every", "1", "--num-samples", "4"]
    train.cli(["--method", "cm", "--data", str(tmp / "imgs.zip"), "--net", "ddpmpp-tiny", "--steps", "2", "--batch",
               "4", "--cond", "--out", str(tmp / "img"), *fast])
    train.cli(["--method", "cm", "--data", "toy", "--steps", "2", "--batch", "16", "--out", str(tmp / "toy"), *fast])
    return tmp


def load_ema(image_run, i):
    import cm
    state = torch.load(image_run / "img" / "ckpt.pt", weights_only=True)
    net = train.build_net(state["config"], cm, (3, 16, 16), 3).eval()
    net.load_state_dict(state["ema"][i])
    return net, cm, recipe.method_config(cm, state["config"])


def test_per_image_seeds(image_run):
    """Image i depends on (seed, i) only: 5 images in one chunk equal chunks of 3 + 2 (float rounding of another
    batch size may move a pixel by 1); the first 3 are what 3 alone give; another seed gives other images."""
    net, cm, method_cfg = load_ema(image_run, 0)
    whole, bad = fid.generate(net, cm, method_cfg, (3, 16, 16), 3, 0, 5, 0, 0, "cpu")
    parts = torch.cat([fid.generate(net, cm, method_cfg, (3, 16, 16), 3, s, n, 0, c, "cpu")[0]
                       for c, (s, n) in enumerate([(0, 3), (3, 2)])])
    assert bad == 0 and whole.shape == (5, 3, 16, 16) and whole.dtype == torch.uint8 and whole.float().std() > 0
    assert (whole.int() - parts.int()).abs().max() <= 1 and (whole == parts).float().mean() > 0.99
    assert torch.equal(parts[:3], fid.generate(net, cm, method_cfg, (3, 16, 16), 3, 0, 3, 0, 0, "cpu")[0])
    other, _ = fid.generate(net, cm, method_cfg, (3, 16, 16), 3, 0, 3, 1, 0, "cpu")
    assert (other != whole[:3]).float().mean() > 0.5


def test_calc_json_samples_and_compute_fid(detector, image_run, tmp_path, monkeypatch):
    """calc end to end (JSON, samples.png, samples.npz = the generated uint8 images); train.py's compute_fid on the
    same setting hands frechet_distance bitwise the same statistics (recorded, so the 2048-d distance runs once)."""
    det, ref = detector[0], tiny_ref(tmp_path / "ref.npz")
    calls, real = [], fid.frechet_distance
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: calls.append(args) or real(*args))
    a = fid.cli(["calc", "--ckpt", str(image_run / "img" / "ckpt.pt"), "--ref", ref, "--detector", det, "--num", "4",
                 "--batch", "4", "--steps", "1", "--device", "cpu", "--json", str(tmp_path / "a.json"),
                 "--save-samples", str(tmp_path / "a")])
    rec = json.load(open(tmp_path / "a.json"))
    assert rec["fid"] == a["fid"] > 0 and rec["num"] == 4 and rec["world_size"] == 1 and rec["step"] == 2
    assert rec["detector_sha256"] == data.file_digest(det) and rec["sampler"] == {"sample_sigmas": [79.5638, 0.0]}
    assert os.path.getsize(tmp_path / "a" / "samples.png") > 0
    net, cm, method_cfg = load_ema(image_run, 0)
    images = np.load(tmp_path / "a" / "samples.npz")["images"]
    assert np.array_equal(images, fid.generate(net, cm, method_cfg, (3, 16, 16), 3, 0, 4, 0, 0, "cpu")[0].numpy())
    loaded, _ = inception.load_detector(det, "cpu", str(tmp_path))
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: calls.append(args) or -1.0)
    value = fid.compute_fid(net, cm, method_cfg, [3, 16, 16], 3, 4, fid.load_ref(ref), loaded, "cpu", seed=0, batch=4)
    assert value == -1.0 and len(calls) == 2
    for x, y in zip(*calls):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_calc_does_not_depend_on_batch(detector, image_run, tmp_path):
    ref = tiny_ref(tmp_path / "ref.npz")
    common = ["calc", "--ckpt", str(image_run / "img" / "ckpt.pt"), "--ref", ref, "--detector", detector[0],
              "--num", "5", "--steps", "1", "--device", "cpu"]
    a, b = fid.cli([*common, "--batch", "3"]), fid.cli([*common, "--batch", "5"])
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4)


def test_calc_bad_input(detector, image_run, tmp_path):
    det = detector[0]
    mu = np.zeros(2048)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=np.eye(2048))
    np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=np.eye(10))
    ref, img = str(tmp_path / "ref.npz"), str(image_run / "img" / "ckpt.pt")
    cases = [([str(image_run / "toy"), ref], "neither RGB images nor"), ([str(tmp_path / "nope.pt"), ref], "no checkpoint"),
             ([img, str(tmp_path / "bad.npz")], r"mu \(2048,\)"), ([img, str(tmp_path / "none.npz")], "cannot read"),
             ([img, ref, "--ema", "3"], "holds 3 EMA nets"), ([img, ref, "--ts", "0.5,0"], "--ts for meanflow")]
    for (ckpt, r, *extra), message in cases:
        with pytest.raises(SystemExit) as e:
            fid.cli(["calc", "--ckpt", ckpt, "--ref", r, "--detector", det, "--num", "4", "--device", "cpu", *extra])
        assert "fid.py: error:" in str(e.value) and "\n" not in str(e.value)
        assert __import__("re").search(message, str(e.value)), (message, str(e.value))
    with pytest.raises(SystemExit, match="not a set of RGB images"):
        fid.cli(["ref", "--data", "toy", "--out", str(tmp_path / "x.npz"), "--detector", det])


# --- Outputs: no command overwrites what it did not create ----------------------------------------------------------


def hashes(*roots):
    """{path: SHA-256} of every file under roots (files or folders)."""
    found = {}
    for root in map(str, roots):
        walk = [(os.path.dirname(root), [], [os.path.basename(root)])] if os.path.isfile(root) else os.walk(root)
        for folder, _, files in walk:
            for name in files:
                found[os.path.join(folder, name)] = data.file_digest(os.path.join(folder, name))
    return found


def refused(argv, message):
    """fid.py's one-line error (exit status 1) matching `message`."""
    with pytest.raises(SystemExit) as e:
        fid.cli(argv)
    text = str(e.value.code)
    assert text.startswith("fid.py: error: ") and "\n" not in text, text
    assert re.search(message, text), (message, text)


@pytest.fixture
def no_work(monkeypatch):
    """Any work (detector, checkpoint, dataset) fails the test: the refusals must come before it."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the output checks")
    for module, name in ((fid, "fetch_detector"), (fid, "load_detector"), (checkpoints, "load_checkpoint"),
                         (data, "load"), (data, "cropped_images")):
        monkeypatch.setattr(module, name, work)


@pytest.fixture
def cheap_work(monkeypatch):
    """The commands' work without the Inception net or the 2048-d distance: features from the pixels."""
    monkeypatch.setattr(fid, "fetch_detector", lambda spec, cache: (spec, "0" * 64))
    monkeypatch.setattr(fid, "load_detector", lambda spec, device, cache: (None, "0" * 64))
    monkeypatch.setattr(fid, "features", lambda detector, images: images.float().flatten(1)[:, :1] * torch.ones(2048))
    monkeypatch.setattr(fid, "frechet_distance", lambda mu, *_: float(mu.sum()))


def test_outputs_never_replace_an_input(detector, image_run, tmp_path, no_work):
    """`ref --out` the dataset or the detector, `calc --json` the checkpoint (also named through its
    run folder) or the reference, `--save-samples` the run folder: refused with and without --force, every byte kept."""
    det, run, zip_ = detector[0], str(image_run / "img"), str(image_run / "imgs.zip")
    ref = tiny_ref(tmp_path / "ref.npz")
    before = hashes(image_run, det, ref)
    for force in ([], ["--force"]):
        refused(["ref", "--data", zip_, "--out", zip_, "--detector", det, *force], "is this command's --data")
        refused(["ref", "--data", zip_, "--out", det, "--detector", det, *force], "is this command's --detector")
        calc = ["calc", "--ckpt", run, "--ref", ref, "--detector", det, *force]
        refused([*calc, "--json", os.path.join(run, "ckpt.pt")], "is this command's --ckpt")
        refused([*calc, "--json", ref], "is this command's --ref")
        refused([*calc, "--save-samples", run], "--save-samples .* is this command's --ckpt")
    assert hashes(image_run, det, ref) == before


def test_force_never_replaces_another_kind_of_file(detector, image_run, tmp_path, no_work):
    """an existing output is refused without --force, and with it unless it is the command's own
    kind: a checkpoint is no reference .npz, a config.json no calc record, an .npz of other arrays no samples."""
    det, run, zip_ = detector[0], str(image_run / "img"), str(image_run / "imgs.zip")
    ref = tiny_ref(tmp_path / "ref.npz")
    (tmp_path / "s").mkdir()
    np.savez(tmp_path / "s" / "samples.npz", weights=np.zeros(3))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "samples.png").write_text("not a picture")
    (tmp_path / "notes.json").write_text('{"fid": "my notes"}')
    before = hashes(image_run, det, tmp_path)
    other = os.path.join(run, "ckpt.pt")  # not an input of ref
    refused(["ref", "--data", zip_, "--out", other, "--detector", det], "exists; pass --force")
    refused(["ref", "--data", zip_, "--out", other, "--detector", det, "--force"],
            "is not fid.py reference statistics .*not replaced, even with --force")
    calc = ["calc", "--ckpt", str(image_run / "toy"), "--ref", ref, "--detector", det, "--force"]
    refused([*calc, "--json", os.path.join(run, "config.json")], "is not a fid.py calc record")
    refused([*calc, "--json", str(tmp_path / "notes.json")], "is not a fid.py calc record")
    refused([*calc, "--save-samples", str(tmp_path / "s")], r"samples.npz exists and is not fid.py samples")
    refused([*calc, "--save-samples", str(tmp_path / "t")], r"samples.png exists and is not a PNG")
    assert hashes(image_run, det, tmp_path) == before


def test_outputs_are_checked_before_any_work(detector, image_run, tmp_path, no_work, monkeypatch):
    """a missing or unwritable folder, a folder as the file, a file as --save-samples and two outputs
    naming one file are refused before the detector, checkpoint or data are touched (no_work)."""
    det, zip_ = detector[0], str(image_run / "imgs.zip")
    ref = tiny_ref(tmp_path / "ref.npz")
    (tmp_path / "s").mkdir()
    (tmp_path / "file").write_text("a file")
    ro = tmp_path / "read-only"
    ro.mkdir()
    before = hashes(image_run, tmp_path)
    refuse_ref = ["ref", "--data", zip_, "--detector", det, "--out"]
    refused([*refuse_ref, str(tmp_path / "no" / "r.npz")], "the folder .*no does not exist")
    refused([*refuse_ref, str(tmp_path / "s")], "is a folder; name a file")
    calc = ["calc", "--ckpt", str(image_run / "img"), "--ref", ref, "--detector", det]
    refused([*calc, "--json", str(tmp_path / "no" / "r.json")], "the folder .*no does not exist")
    refused([*calc, "--save-samples", str(tmp_path / "file")], "is a file; name a folder")
    refused([*calc, "--save-samples", str(tmp_path / "no" / "s")], "the folder .*no does not exist")
    refused([*calc, "--save-samples", str(tmp_path / "s"), "--json", str(tmp_path / "s" / "samples.npz")],
            "name the same file")
    real_access = os.access  # root may write anywhere: a read-only folder is what os.access says of it
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.realpath(path) != str(ro) and real_access(path, mode))
    refused([*refuse_ref, str(ro / "r.npz")], "read-only is not writable")
    refused([*calc, "--json", str(ro / "r.json")], "read-only is not writable")
    refused([*calc, "--save-samples", str(ro / "new")], "read-only is not writable")
    assert hashes(image_run, tmp_path) == before


def test_force_replaces_the_commands_own_outputs(image_run, tmp_path, cheap_work):
    """What --force may replace, it does: a reference .npz of mu and sigma, a calc record, samples.png and samples.npz;
    the writes leave no temp file."""
    zip_, ref = str(image_run / "imgs.zip"), tiny_ref(tmp_path / "ref.npz")
    out = tiny_ref(tmp_path / "out.npz")
    old = fid.load_ref(out)[0]
    refused(["ref", "--data", zip_, "--out", out], "exists; pass --force")
    fid.cli(["ref", "--data", zip_, "--out", out, "--force", "--device", "cpu"])
    assert not np.array_equal(fid.load_ref(out)[0], old)
    calc = ["calc", "--ckpt", str(image_run / "img"), "--ref", ref, "--num", "2", "--batch", "2", "--steps", "1",
            "--device", "cpu", "--json", str(tmp_path / "fid.json"), "--save-samples", str(tmp_path / "s")]
    first = fid.cli(calc)
    refused(calc, "exists; pass --force")
    second = fid.cli([*calc, "--seed", "1", "--force"])
    assert json.load(open(tmp_path / "fid.json"))["seed"] == 1 and second["fid"] != first["fid"]
    assert sorted(os.listdir(tmp_path)) == ["fid.json", "out.npz", "ref.npz", "s"]
    assert sorted(os.listdir(tmp_path / "s")) == ["samples.npz", "samples.png"]


def test_a_failed_write_is_one_line_and_leaves_no_temp_file(image_run, tmp_path, cheap_work, monkeypatch):
    """a full disk while writing (half a file, then ENOSPC): one-line error, exit status 1, the file
    it would have replaced unchanged, no temp file left."""
    import errno
    zip_, ref = str(image_run / "imgs.zip"), tiny_ref(tmp_path / "ref.npz")
    out = tiny_ref(tmp_path / "out.npz")
    (tmp_path / "fid.json").write_text(json.dumps({k: 0 for k in fid.RECORD_KEYS}))
    before = hashes(tmp_path)

    def full_disk(file, text):
        file.write(text)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", lambda file, **arrays: full_disk(file, b"half an npz"))
    monkeypatch.setattr(json, "dump", lambda record, file, **kwargs: full_disk(file, "half a record"))
    refused(["ref", "--data", zip_, "--out", out, "--force", "--device", "cpu"],
            "cannot write .*out.npz: No space left on device")
    refused(["calc", "--ckpt", str(image_run / "img"), "--ref", ref, "--num", "2", "--batch", "2", "--steps", "1",
             "--device", "cpu", "--json", str(tmp_path / "fid.json"), "--force"],
            "cannot write .*fid.json: No space left on device")
    assert hashes(tmp_path) == before


@pytest.fixture(scope="module")
def malformed(image_run, tmp_path_factory):
    """Copies of the image run's checkpoint with one config value or field replaced: {name: path}."""
    import copy
    state = torch.load(image_run / "img" / "ckpt.pt", weights_only=True)
    edits = dict(method_this=("config", "method", "this"), method_os_path=("config", "method", "os.path"),
                 net_os=("config", "net", "os"), net_list=("config", "net", ["ddpmpp"]),
                 label_dim_text=("config", "label_dim", "3"), shape_floats=("config", "shape", [3.0, 16.0, 16.0]),
                 sigmas_text=("config", "sample_sigmas", "abc"), no_dropout=("config", "dropout", None),
                 ema_dict=(None, "ema", {"0": 1}), step_tensor=(None, "step", torch.tensor(2)))
    folder, paths = tmp_path_factory.mktemp("malformed"), {}
    for name, (part, key, value) in edits.items():
        edited = copy.deepcopy(state)
        target = edited["config"] if part else edited
        if name == "no_dropout":
            del target[key]
        else:
            target[key] = value
        paths[name] = str(folder / f"{name}.pt")
        torch.save(edited, paths[name])
    return paths


def test_a_checkpoint_never_chooses_the_code(malformed, tmp_path, cheap_work, capsys):
    """the method and net a checkpoint names come from checkpoints.METHOD_NAMES and nets.NETS only; a
    method "this" would print the Zen of Python if it were imported. One line each, nothing imported."""
    ref = tiny_ref(tmp_path / "ref.npz")
    had_this = "this" in sys.modules
    for name, message in [("method_this", "unknown method 'this'; choose from"),
                          ("method_os_path", "unknown method 'os.path'"), ("net_os", "unknown net 'os'; choose from"),
                          ("net_list", r"unknown net \['ddpmpp'\]")]:
        refused(["calc", "--ckpt", malformed[name], "--ref", ref, "--device", "cpu"], message)
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    assert ("this" in sys.modules) == had_this


@pytest.mark.parametrize("name, message", [
    ("label_dim_text", "label_dim must be an integer >= 0, got '3'"),
    ("shape_floats", r"shape \[3.0, 16.0, 16.0\], neither RGB images nor"),
    ("sigmas_text", "its config does not build a cm net \\(TypeError"),
    ("no_dropout", "its config does not build a cm net \\(KeyError: 'dropout'\\)"),
    ("ema_dict", "not a checkpoint of this repository \\(step must be an integer, ema a list"),
    ("step_tensor", "not a checkpoint of this repository \\(step must be an integer")])
def test_malformed_checkpoint_is_one_line(malformed, tmp_path, cheap_work, name, message):
    """values of the wrong kind in a checkpoint are bad input, not a traceback."""
    refused(["calc", "--ckpt", malformed[name], "--ref", tiny_ref(tmp_path / "ref.npz"), "--device", "cpu", "--json",
             str(tmp_path / "r.json")], message)
    assert not (tmp_path / "r.json").exists()


def test_bad_numbers_and_cache_are_one_line(detector, image_run, tmp_path, no_work):
    """--seed -1 (a numpy traceback) and --resolution 0 (taken as "no crop") are refused; a --cache that
    is a file is one DetectorError line."""
    det, ref = detector[0], tiny_ref(tmp_path / "ref.npz")
    refused(["calc", "--ckpt", str(image_run / "img"), "--ref", ref, "--detector", det, "--seed", "-1"],
            "--seed must be >= 0, got -1")
    refused(["ref", "--data", str(image_run / "imgs.zip"), "--out", str(tmp_path / "r.npz"), "--detector", det,
             "--resolution", "0"], "--resolution must be >= 1, got 0")
    with pytest.raises(inception.DetectorError, match="cannot create the download cache .*ref.npz"):
        inception.fetch_detector(inception.DETECTOR_DEFAULT, ref)



def launch(*args, ranks):
    """fid.py in a subprocess, under torchrun (gloo) when ranks > 1, one thread per process."""
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    p = subprocess.run([sys.executable, *cmd, "fid.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def test_two_gloo_ranks_match_one_process(detector, image_run, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): `ref` gives mu/sigma equal to 1 process to 1e-12 relative. Same chunks
    (--batch 1) and 1 thread in both: the features are bitwise equal and only the float64 sums are reordered."""
    write_image_zip(tmp_path / "four.zip", n=4, res=8)
    args = ["ref", "--data", str(tmp_path / "four.zip"), "--detector", detector[0], "--batch", "1", "--device", "cpu"]
    launch(*args, "--out", str(tmp_path / "ref2.npz"), ranks=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fid.cli([*args, "--out", str(tmp_path / "ref1.npz")])
    finally:
        torch.set_num_threads(threads)
    (mu1, s1), (mu2, s2) = fid.load_ref(tmp_path / "ref1.npz"), fid.load_ref(tmp_path / "ref2.npz")
    assert np.abs(s1).max() > 0
    np.testing.assert_allclose(mu2, mu1, rtol=1e-12, atol=1e-12 * np.abs(mu1).max())
    np.testing.assert_allclose(s2, s1, rtol=1e-12, atol=1e-12 * np.abs(s1).max())


@pytest.mark.slow
def test_two_gloo_ranks_stop_in_one_line_each_when_rank_0_cannot_fetch_the_detector(tmp_path):
    """Rank 0 fetches the detector for all; where that fails, rank 1 stops with a line of its own instead of a
    broken-pipe traceback from the barrier it waited in."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "fid.py",
                        "ref", "--data", str(tmp_path / "none.zip"), "--out", str(tmp_path / "r.npz"), "--detector",
                        str(tmp_path / "none.pth"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode != 0
    assert f"fid.py: error: no detector file {tmp_path / 'none.pth'}; fetch" in p.stderr
    assert "fid.py: error: rank 0 could not fetch the detector (its error above)" in p.stderr
    assert "[rank1]" not in p.stderr and not os.path.exists(tmp_path / "r.npz")


@pytest.mark.slow
def test_two_gloo_ranks_calc_multistep(detector, image_run, tmp_path):
    """A 2-step calc (chunk-seeded re-noising) on 2 gloo ranks gives the same images and FID as 1 process."""
    ref = tiny_ref(tmp_path / "ref.npz")
    # --num-images, not --num: torchrun would read --num as its own --numa-binding
    args = ["calc", "--ckpt", str(image_run / "img" / "ckpt.pt"), "--detector", detector[0], "--ref", ref,
            "--num-images", "5", "--batch", "2", "--steps", "2", "--device", "cpu"]
    for ranks in (1, 2):
        launch(*args, "--json", str(tmp_path / f"c{ranks}.json"), "--save-samples", str(tmp_path / f"s{ranks}"),
               ranks=ranks)
    c1, c2 = (json.load(open(tmp_path / f"c{r}.json")) for r in (1, 2))
    assert c2["world_size"] == 2 and len(c2["sampler"]["sample_sigmas"]) == 3
    assert c2["fid"] == pytest.approx(c1["fid"], rel=1e-10)
    x1, x2 = (np.load(tmp_path / f"s{r}" / "samples.npz")["images"] for r in (1, 2))
    assert np.array_equal(x1, x2) and x1.std() > 0


@pytest.mark.slow
def test_train_fid_every_equals_calc(detector, image_run, tmp_path):
    """train.py --fid-every logs the FID of the first EMA; at the last step it equals `fid.py calc` of the final
    checkpoint (same protocol, same per-image seeds)."""
    ref, out = tiny_ref(tmp_path / "ref.npz"), str(tmp_path / "run")
    train.cli(["--method", "cm", "--data", str(image_run / "imgs.zip"), "--net", "ddpmpp-tiny", "--steps", "3", "--batch",
               "4", "--cond", "--out", out, "--log-every", "1", "--num-samples", "4", "--fid-every", "2", "--fid-num", "4",
               "--fid-ref", ref, "--fid-detector", detector[0]])
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    fids = {r["step"]: r["fid"] for r in recs if "fid" in r}
    assert sorted(fids) == [2, 3] and all(math.isfinite(v) and v > 0 for v in fids.values())
    calc = fid.cli(["calc", "--ckpt", os.path.join(out, "ckpt.pt"), "--ref", ref, "--detector", detector[0], "--num", "4",
                    "--device", "cpu"])
    assert calc["fid"] == pytest.approx(fids[3], rel=1e-9)


@pytest.mark.parametrize("args, message", [(["--data", "toy"], "needs RGB images"), ([], "needs --fid-ref")])
def test_train_fid_every_bad_input(tmp_path, args, message):
    argv = ["--method", "cm", "--out", str(tmp_path / "o"), "--steps", "1", "--batch", "16", "--fid-every", "1", *args]
    if args:
        argv += ["--fid-ref", tiny_ref(tmp_path / "ref.npz")]
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    assert message in e.value.code and "\n" not in e.value.code

# --- Latent models: SD-VAE decoding (a stand-in diffusers package), crops, repeats ----------------------------------

FAKE_DIFFUSERS = '''
import torch


class Decoded:
    def __init__(self, sample):
        self.sample = sample


class AutoencoderKL(torch.nn.Module):
    """Stand-in with the SD-VAE decoder's interface: 4 latent channels -> 3, 8x nearest upsampling, tanh."""
    calls = []  # (batch size, dtype, grad enabled) per decode

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 12).reshape(3, 4, 1, 1))
            self.proj.bias.zero_()

    @classmethod
    def from_pretrained(cls, name, torch_dtype=torch.float32):
        if name != "stabilityai/sd-vae-ft-mse":
            raise OSError(f"no such model {name}")
        return cls().to(torch_dtype)

    def decode(self, z):
        AutoencoderKL.calls.append((len(z), z.dtype, torch.is_grad_enabled()))
        x = torch.tanh(self.proj(z))
        return Decoded(torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest"))
'''


@pytest.fixture(scope="session")
def fake_diffusers(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-diffusers")
    (root / "diffusers" / "models").mkdir(parents=True)
    (root / "diffusers" / "__init__.py").write_text("")
    (root / "diffusers" / "models" / "__init__.py").write_text(FAKE_DIFFUSERS)
    return str(root)


@pytest.fixture
def stand_in_vae(fake_diffusers, monkeypatch):
    monkeypatch.syspath_prepend(fake_diffusers)
    for name in ("diffusers", "diffusers.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import diffusers.models
    diffusers.models.AutoencoderKL.calls.clear()
    return diffusers.models.AutoencoderKL


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory):
    """A 1-step meanflow run (ddpmpp-tiny) on 4 x 4 x 4 latents of 32 x 32 crops, 3 classes."""
    from test_data import StandInEncoder, write_photo_zip
    tmp = tmp_path_factory.mktemp("latent-run")
    write_photo_zip(tmp / "photos.zip", [(40, 32), (32, 48), (32, 32), (64, 40), (33, 35)], [0, 2, 1, 2, 0])
    data.encode_latents(str(tmp / "photos.zip"), str(tmp / "lat"), StandInEncoder(), batch=2, resolution=32)
    train.cli(["--method", "meanflow", "--data", str(tmp / "lat"), "--net", "ddpmpp-tiny", "--steps", "1", "--batch",
               "2", "--log-every", "1", "--num-samples", "2", "--out", str(tmp / "run")])
    return tmp


def test_latent_calc_decodes_scaled_samples(detector, latent_run, stand_in_vae, tmp_path):
    """calc on a latent checkpoint: the VAE sees sample / 0.18215 in chunks of --vae-batch under no_grad, and FID
    sees the decoded 32 x 32 images, quantised as images are."""
    import meanflow
    ref = tiny_ref(tmp_path / "ref.npz")
    rec = fid.cli(["calc", "--ckpt", str(latent_run / "run"), "--ref", ref, "--detector", detector[0], "--num", "5",
                   "--batch", "3", "--vae-batch", "2", "--device", "cpu", "--save-samples", str(tmp_path / "s")])
    assert rec["vae"] == "stabilityai/sd-vae-ft-mse" and math.isfinite(rec["fid"])
    assert [c[0] for c in stand_in_vae.calls] == [2, 1, 2]  # chunks of 3 + 2 images, at most 2 per decode
    assert all(dtype == torch.float32 and not grad for _, dtype, grad in stand_in_vae.calls)
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.uint8
    # By hand: per-image noise and label, the meanflow 1-step sample, / 0.18215, the stand-in decoder, uint8.
    state = torch.load(latent_run / "run" / "ckpt.pt", weights_only=True)
    net = checkpoints.frozen_ema(state, (4, 4, 4), 3, "cpu", "ema")
    eps, y = [], []
    for i in range(5):
        g = torch.Generator().manual_seed(data.mix_seed(0, i))
        eps.append(torch.randn((4, 4, 4), generator=g))
        y.append(torch.randint(3, (), generator=g))
    z = meanflow.sample(net, torch.stack(eps), recipe.method_config(meanflow, state["config"]),
                        y=torch.nn.functional.one_hot(torch.stack(y), 3).float())
    with torch.no_grad():
        x = stand_in_vae().decode(z / 0.18215).sample
    expect = fid.quantize(x).numpy()
    assert np.abs(images.astype(int) - expect).max() <= 1 and (images == expect).mean() > 0.99
    assert images.std() > 0


def test_latent_images_do_not_depend_on_the_split(latent_run, stand_in_vae):
    """Per-image seeds survive decoding: 5 images in one chunk equal chunks of 2 + 3, as ranks would make them."""
    import meanflow
    state = torch.load(latent_run / "run" / "ckpt.pt", weights_only=True)
    net = checkpoints.frozen_ema(state, (4, 4, 4), 3, "cpu", "ema")
    method_cfg = recipe.method_config(meanflow, state["config"])
    decode = fid.vae_decoder("stabilityai/sd-vae-ft-mse", "cpu")
    whole, bad = fid.generate(net, meanflow, method_cfg, (4, 4, 4), 3, 0, 5, 0, 0, "cpu", decode)
    parts = torch.cat([fid.generate(net, meanflow, method_cfg, (4, 4, 4), 3, s, n, 0, c, "cpu", decode)[0]
                       for c, (s, n) in enumerate([(0, 2), (2, 3)])])
    assert bad == 0 and whole.shape == (5, 3, 32, 32) and fid.image_shape((4, 4, 4), decode) == (3, 32, 32)
    assert (whole.int() - parts.int()).abs().max() <= 1 and (whole == parts).float().mean() > 0.99


def test_a_vae_that_cannot_be_loaded_is_one_line(stand_in_vae):
    with pytest.raises(data.DataError, match=r"cannot load the VAE 'nowhere/vae' \(OSError\); pass --vae PATH"):
        fid.vae_decoder("nowhere/vae", "cpu")


def test_latent_calc_without_diffusers_says_what_to_install(detector, latent_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(SystemExit, match="needs diffusers: pip install diffusers"):
        fid.cli(["calc", "--ckpt", str(latent_run / "run"), "--ref", tiny_ref(tmp_path / "ref.npz"), "--detector",
                 detector[0], "--num", "2", "--device", "cpu"])


def test_ref_crops_like_the_latent_encoding(detector, tmp_path):
    """ref --resolution: statistics of the images after center_crop_dhariwal, the crop encode-latents uses."""
    from test_data import write_photo_zip
    write_photo_zip(tmp_path / "photos.zip", [(40, 32), (32, 48), (24, 24)], [0, 1, 0])
    fid.cli(["ref", "--data", str(tmp_path / "photos.zip"), "--resolution", "16", "--detector", detector[0],
             "--batch", "2", "--device", "cpu", "--out", str(tmp_path / "ref.npz")])
    crops = torch.cat([x for _, x in data.cropped_images(str(tmp_path / "photos.zip"), 16, 3)])
    with zipfile.ZipFile(tmp_path / "photos.zip") as z:
        first = Image.open(io.BytesIO(z.read(sorted(n for n in z.namelist() if n.endswith(".png"))[0]))).convert("RGB")
    assert crops.shape == (3, 3, 16, 16)
    assert np.array_equal(crops[0].permute(1, 2, 0).numpy(), np.asarray(data.center_crop_dhariwal(first, 16)))
    net, _ = inception.load_detector(detector[0], "cpu", str(tmp_path))
    stats = fid.FeatureStats("cpu")
    stats.add(fid.features(net, crops))
    mu, sigma, _, _ = stats.result()
    got = fid.load_ref(tmp_path / "ref.npz")
    np.testing.assert_allclose(got[0], mu.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], sigma.numpy(), rtol=1e-6, atol=1e-6)


def test_repeats_use_disjoint_seed_sets(detector, image_run, tmp_path, monkeypatch):
    """--repeats 2: images 0-2 then 3-5 (and other re-noising chunk seeds), one FID each, their min and mean."""
    seen, real = [], fid.generate
    monkeypatch.setattr(fid, "generate", lambda *a, **k: seen.append((a[5], a[6], a[8])) or real(*a, **k))
    monkeypatch.setattr(fid, "frechet_distance", lambda mu, *_: float(mu.sum()))  # per set; skips 2048-d eigh
    rec = fid.cli(["calc", "--ckpt", str(image_run / "img" / "ckpt.pt"), "--ref", tiny_ref(tmp_path / "ref.npz"),
                   "--detector", detector[0], "--num", "3", "--batch", "3", "--steps", "1", "--device", "cpu",
                   "--repeats", "2", "--json", str(tmp_path / "r.json")])
    assert seen == [(0, 3, 0), (3, 3, 1)]  # (first image, count, chunk seed)
    assert len(rec["fids"]) == 2 and rec["fids"][0] != rec["fids"][1] and rec["fid"] == rec["fids"][0]
    assert rec["fid_min"] == min(rec["fids"]) and rec["fid_mean"] == pytest.approx(sum(rec["fids"]) / 2)
    assert json.load(open(tmp_path / "r.json"))["fids"] == rec["fids"]


def test_frechet_distance_is_clamped_at_zero():
    """Equal statistics of rank 10 in 256-d: the unclamped formula gives about -5e-4 (rounding of the near-zero
    eigenvalues); the result is 0."""
    g = np.random.default_rng(3)
    A = g.normal(size=(256, 10))
    mu, sigma = g.normal(size=256), A @ A.T
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0
