"""data.py: image zips/folders in EDM's layout, .npy points, and the CIFAR-10 download path (offline)."""
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write_image_zip(path, n=12, res=16, labels=True, seed=0, meta=None):
    """A tiny dataset in EDM dataset_tool layout: 00000/img00000000.png ... + dataset.json (+ `meta` entries)."""
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)
    names = [f"00000/img{i:08d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w") as z:
        for name, a in zip(names, arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="png")
            z.writestr(name, buf.getvalue())
        if labels:
            z.writestr("dataset.json", json.dumps({"labels": [[name, i % 3] for i, name in enumerate(names)], **(meta or {})}))
    return arrays


def test_image_zip_and_folder_roundtrip(tmp_path):
    arrays = write_image_zip(tmp_path / "d.zip")
    ds = data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path))
    assert ds.shape == (3, 16, 16) and ds.label_dim == 3 and len(ds) == 12 and ds.is_image
    assert torch.equal(ds.x, torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [i % 3 for i in range(12)]
    x = ds.get(torch.arange(4))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, torch.from_numpy(arrays[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    flipped = ds.get(torch.arange(4), flip=torch.tensor([True, False, True, False]))
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        z.extractall(tmp_path / "folder")
    ds2 = data.load(str(tmp_path / "folder"), cache_dir=str(tmp_path))
    assert torch.equal(ds2.x, ds.x) and torch.equal(ds2.labels, ds.labels)


def test_shared_jpeg_zip_layout_if_present(tmp_path):
    """The repository's smoke-test data format (JPEG members, dataset.json) loads; skipped only when the file
    is absent (e.g. outside this workspace)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg-test.zip")
    if not os.path.exists(path):
        pytest.skip("shared CIFAR-10 JPEG zip not present")
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "small.zip", "w") as out:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))[:20]
        for n in names:
            out.writestr(n, z.read(n))
        meta = json.loads(z.read("dataset.json"))
        out.writestr("dataset.json", json.dumps({"labels": [pair for pair in meta["labels"] if pair[0] in names]}))
    ds = data.load(str(tmp_path / "small.zip"), cache_dir=str(tmp_path))
    assert ds.x.shape == (20, 3, 32, 32) and ds.x.dtype == torch.uint8 and ds.labels.max() < 10


@pytest.mark.parametrize("content, message", [
    (b"this is not a zip", "cannot read .* as a zip"),
])
def test_unreadable_zip(tmp_path, content, message):
    (tmp_path / "bad.zip").write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.load(str(tmp_path / "bad.zip"), cache_dir=str(tmp_path))


def test_mixed_image_sizes_and_missing_labels(tmp_path):
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as z:
        for i, res in enumerate([8, 16]):
            buf = io.BytesIO()
            Image.fromarray(np.zeros((res, res, 3), np.uint8)).save(buf, format="png")
            z.writestr(f"img{i}.png", buf.getvalue())
    with pytest.raises(data.DataError, match="all must match"):
        data.load(str(tmp_path / "mixed.zip"), cache_dir=str(tmp_path))
    write_image_zip(tmp_path / "nolabel.zip", n=3, labels=False)
    with zipfile.ZipFile(tmp_path / "nolabel.zip", "a") as z:
        z.writestr("dataset.json", json.dumps({"labels": [["00000/img00000000.png", 1]]}))
    with pytest.raises(data.DataError, match="no label for"):
        data.load(str(tmp_path / "nolabel.zip"), cache_dir=str(tmp_path))


@pytest.mark.parametrize("array, message", [
    (np.zeros(5, np.float32), "N x D"),
    (np.zeros((4, 2, 2), np.float32), "N x D"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
])
def test_points_npy_validation(tmp_path, array, message):
    np.save(tmp_path / "p.npy", array)
    with pytest.raises(data.DataError, match=message):
        data.load(str(tmp_path / "p.npy"), cache_dir=str(tmp_path))


def test_toy_points_are_a_ring_of_eight():
    p = data.toy_points(8000)
    assert p.shape == (8000, 2) and p.dtype == torch.float32
    radius = p.norm(dim=1)
    assert abs(radius.mean() - 1) < 0.02
    angle = torch.atan2(p[:, 1], p[:, 0]) % (2 * np.pi)
    counts = torch.bincount(((angle + np.pi / 8) // (np.pi / 4)).long() % 8, minlength=8)
    assert counts.min() > 800  # all eight modes populated


# --- CIFAR-10 download path (no network needed) ------------------------------------------------------------------

def make_cifar_tarball(path, n_per_batch=2, payload=None):
    """A tarball in the CIFAR-10 python layout, with tiny batches (protocol-2 pickles, bytes keys)."""
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            obj = payload if payload is not None else {
                b"data": np.full((n_per_batch, 3072), i, dtype=np.uint8), b"labels": [i % 10] * n_per_batch}
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_cifar10_from_cache_with_md5(tmp_path):
    md5 = make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    x, labels = data.load_cifar10(str(tmp_path), url="http://127.0.0.1:9/unused", md5=md5)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert x[0].unique().tolist() == [1] and labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(data.DataError, match="has md5"):
        data.load_cifar10(str(tmp_path), md5="0" * 32)


def test_cifar10_download_failure_says_where_to_put_the_file(tmp_path):
    with pytest.raises(data.DataError, match="put cifar-10-python.tar.gz .* in") as e:
        data.load_cifar10(str(tmp_path / "cache"), url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert "\n" not in str(e.value)
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "cache"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_unpickler_refuses_code(tmp_path, monkeypatch):
    """The batches are pickles: anything but numpy arrays and plain containers is refused, never run."""
    monkeypatch.chdir(tmp_path)
    md5 = make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", payload={b"data": _Evil(), b"labels": []})
    with pytest.raises(data.DataError, match="refusing to load global"):
        data.load_cifar10(str(tmp_path), md5=md5)
    assert not (tmp_path / "pwned").exists()


# --- Large image sets: decoded once, memory-mapped ---------------------------------------------------------------

def test_large_image_sets_are_decoded_once_and_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MMAP_BYTES", 0)  # every set counts as large
    arrays = write_image_zip(tmp_path / "d.zip", n=6, res=8)
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a, **k: decoded.append(a[1]) or real_decode(*a, **k))
    ds = data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(ds.x, torch.from_numpy(arrays).permute(0, 3, 1, 2)) and ds.label_dim == 3
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].startswith("d-") and cached[0].endswith(".npy") and len(decoded) == 6
    assert isinstance(np.load(tmp_path / "cache" / cached[0], mmap_mode="r"), np.memmap)
    decoded.clear()
    ds2 = data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(ds2.x, ds.x) and len(decoded) == 1  # only the first image, for the size check
    assert torch.equal(ds2.get(torch.arange(2)), ds.x[:2].float() / 127.5 - 1)
    st = os.stat(tmp_path / "d.zip")
    os.utime(tmp_path / "d.zip", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed source gets a new cache
    data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_decode_command_fills_the_cache(tmp_path, monkeypatch, capsys):
    """`python data.py decode` decodes once in one process; train.py's later load finds the cache."""
    monkeypatch.setattr(data, "MMAP_BYTES", 0)
    write_image_zip(tmp_path / "d.zip", n=4, res=8)
    data.main(["decode", "--data", str(tmp_path / "d.zip"), "--cache", str(tmp_path / "cache")])
    assert "4 samples of shape (3, 8, 8)" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 1
    with pytest.raises(SystemExit, match="data.py: error: no such dataset"):
        data.main(["decode", "--data", str(tmp_path / "missing.zip")])


@pytest.mark.parametrize("name, extra, label_dim", [
    ("small.zip", {}, 3),  # largest label + 1
    ("imagenet64-subset.zip", {}, 1000),  # ImageNet keeps 1000 classes even if a subset lacks some
    ("small.zip", {"label_dim": 7}, 7),  # dataset.json says so
])
def test_label_dim_rule(tmp_path, name, extra, label_dim):
    write_image_zip(tmp_path / name, n=6, res=8, meta=extra)
    ds = data.load(str(tmp_path / name), cache_dir=str(tmp_path))
    assert ds.label_dim == label_dim and ds.one_hot(torch.arange(2)).shape == (2, label_dim)


def test_labels_beyond_label_dim_are_an_error(tmp_path):
    write_image_zip(tmp_path / "d.zip", n=6, res=8, meta={"label_dim": 2})
    with pytest.raises(data.DataError, match=r"labels must lie in \[0, 2\)"):
        data.load(str(tmp_path / "d.zip"), cache_dir=str(tmp_path))


# --- Latents ----------------------------------------------------------------------------------------------------

class StandInEncoder:
    """A fixed stand-in for the SD-VAE: 8x8 average pooling, then fixed linear maps 3 -> 4 channels for the
    posterior mean and (through a softplus) the std. Counts the images it sees."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.A, self.B = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        self.seen = []

    def __call__(self, images):
        self.seen.append(images.clone())
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, H/8, W/8)
        mean = torch.einsum("oc,bchw->bohw", self.A, pooled)
        std = 0.05 + torch.nn.functional.softplus(torch.einsum("oc,bchw->bohw", self.B, pooled))
        return mean, std


def write_photo_zip(path, sizes, labels):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        names = []
        for i, (w, h) in enumerate(sizes):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="png")
            names.append(f"00000/img{i:08d}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, y] for n, y in zip(names, labels)]}))


def test_center_crop_dhariwal():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))  # W 100, H 60
    out = data.center_crop_dhariwal(img, 16)
    assert out.size == (16, 16)
    # By hand: 100x60 -> box-halved once to 50x30 (30 < 32), bicubic to 27x16, centre crop from x = 5.
    expect = img.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC).crop((5, 0, 21, 16))
    assert np.array_equal(np.asarray(out), np.asarray(expect))
    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(data.center_crop_dhariwal(square, 16)), np.asarray(square))


@pytest.fixture
def latents(tmp_path):
    write_photo_zip(tmp_path / "photos.zip", [(40, 32), (32, 48), (32, 32), (64, 40), (33, 35)], [0, 2, 1, 2, 0])
    enc = StandInEncoder()
    data.encode_latents(str(tmp_path / "photos.zip"), str(tmp_path / "lat"), enc, batch=2, resolution=32)
    return str(tmp_path / "lat"), enc


def test_encode_latents_writes_posterior_mean_std_and_labels(latents, tmp_path):
    out, enc = latents
    meta = json.load(open(os.path.join(out, "latents.json")))
    assert meta["count"] == 5 and meta["shape"] == [4, 4, 4] and meta["scale"] == 0.18215 and meta["label_dim"] == 3
    assert meta["crop"] == "center-crop-dhariwal" and meta["resolution"] == 32
    mean, std = np.load(os.path.join(out, "mean.npy")), np.load(os.path.join(out, "std.npy"))
    assert mean.dtype == std.dtype == np.float16 and mean.shape == std.shape == (5, 4, 4, 4)
    assert np.load(os.path.join(out, "labels.npy")).tolist() == [0, 2, 1, 2, 0]
    # The encoder saw the cropped images in [-1, 1], in batches of 2.
    assert [len(x) for x in enc.seen] == [2, 2, 1]
    with zipfile.ZipFile(tmp_path / "photos.zip") as z:
        img = Image.open(io.BytesIO(z.read("00000/img00000003.png"))).convert("RGB")
    x = torch.from_numpy(np.array(data.center_crop_dhariwal(img, 32))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(enc.seen[1][1], x)
    m, s = StandInEncoder()(x[None])
    np.testing.assert_array_equal(mean[3], m[0].numpy().astype(np.float16))
    np.testing.assert_array_equal(std[3], s[0].numpy().astype(np.float16))


def test_latent_dataset_draws_scaled_posterior_samples(latents):
    out, _ = latents
    ds = data.load(out, cache_dir=out)
    assert isinstance(ds, data.LatentDataset) and ds.shape == (4, 4, 4) and len(ds) == 5 and not ds.is_image
    assert ds.label_dim == 3 and ds.one_hot(torch.tensor([1])).tolist() == [[0.0, 0.0, 1.0]]
    mean = torch.from_numpy(np.load(os.path.join(out, "mean.npy"))).double()
    std = torch.from_numpy(np.load(os.path.join(out, "std.npy"))).double()
    idx = torch.tensor([3, 0, 3])
    # Exact: x = 0.18215 (mean + std eps) with eps = randn((B, 4, 4, 4), generator) ...
    x = ds.get(idx, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(x.double(), 0.18215 * (mean[idx] + std[idx] * eps), rtol=1e-6, atol=1e-6)
    # ... so the same seed gives the same draw and another seed another one.
    assert torch.equal(ds.get(idx, generator=torch.Generator().manual_seed(7)), x)
    assert not torch.allclose(ds.get(idx, generator=torch.Generator().manual_seed(8)), x)
    # Statistics over 4000 draws of sample 3 (float64): mean within 5 standard errors, std within 10%.
    n = 4000
    draws = ds.get(torch.full((n,), 3), generator=torch.Generator().manual_seed(0)).double()
    err = (draws.mean(0) - 0.18215 * mean[3]).abs() / (0.18215 * std[3] / n**0.5)
    assert err.max() < 5
    torch.testing.assert_close(draws.std(0), 0.18215 * std[3], rtol=0.1, atol=0)
    with pytest.raises(data.DataError, match="x-flips are not supported"):
        ds.get(idx, flip=torch.tensor([True, False, True]))


def test_latent_folder_trains_and_previews(latents, tmp_path):
    """train.py loads the latent folder through data.load (choosing the imagenet256 preset) and writes a false-colour
    preview of latent samples."""
    import train
    out, _ = latents
    run = str(tmp_path / "run")
    train.cli(["--method", "meanflow", "--data", out, "--net", "ddpmpp-tiny", "--steps", "1", "--batch", "2",
               "--log-every", "1", "--num-samples", "4", "--out", run])  # the imagenet256 preset: cond, bf16
    assert np.load(os.path.join(run, "samples.npy")).shape == (4, 4, 4, 4)
    assert Image.open(os.path.join(run, "samples.png")).size == (8, 8)  # a 2 x 2 grid of 4 x 4 latents, RGB
    assert Image.open(os.path.join(run, "samples.png")).mode == "RGB"
    assert json.load(open(os.path.join(run, "config.json")))["label_dim"] == 3


def test_encode_latents_without_diffusers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    write_image_zip(tmp_path / "d.zip", n=2, res=8)
    with pytest.raises(SystemExit, match="pip install diffusers"):
        data.main(["encode-latents", "--src", str(tmp_path / "d.zip"), "--out", str(tmp_path / "lat"), "--device", "cpu"])


def test_encode_latents_writes_only_into_a_new_folder(tmp_path, monkeypatch):
    """An existing non-empty --out, a file, or the source folder itself (or a folder inside it) is refused before the
    VAE loads; no byte of what was there changes."""
    def no_vae(*a, **k):
        raise AssertionError("the VAE was loaded before the output check")
    monkeypatch.setattr(data, "sd_vae_encoder", no_vae)
    write_image_zip(tmp_path / "d.zip", n=2, res=8)
    (tmp_path / "imgs").mkdir()
    write_image_zip(tmp_path / "imgs" / "inner.zip", n=2, res=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mean.npy").write_bytes(b"mine")
    (tmp_path / "file").write_bytes(b"mine too")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for src, out, message in [("d.zip", "full", "not an empty folder"), ("d.zip", "file", "not an empty folder"),
                              ("imgs", "imgs/lat", "inside it"), ("imgs", "imgs", "not an empty folder")]:
        with pytest.raises(SystemExit, match=message):
            data.main(["encode-latents", "--src", str(tmp_path / src), "--out", str(tmp_path / out), "--device", "cpu"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "imgs" / "lat").exists()
