"""data.py: image zips/folders in EDM's layout, .npy points, and the CIFAR-10 download path (offline)."""
import hashlib
import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write_image_zip(path, n=12, res=16, labels=True, seed=0):
    """A tiny dataset in EDM dataset_tool layout: 00000/img00000000.png ... + dataset.json."""
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)
    names = [f"00000/img{i:08d}.png" for i in range(n)]
    with zipfile.ZipFile(path, "w") as z:
        for name, a in zip(names, arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="png")
            z.writestr(name, buf.getvalue())
        if labels:
            z.writestr("dataset.json", json.dumps({"labels": [[name, i % 3] for i, name in enumerate(names)]}))
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
