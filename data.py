"""Datasets for train.py, all held in memory (CIFAR-10 is 150 MB as uint8).

    toy                    built-in 2-D mixture of 8 Gaussians on a ring (no download)
    path/to/points.npy     any N x D float array of points
    cifar10                the official CIFAR-10 python tarball, downloaded once into the cache (md5 checked)
    path/to/dataset.zip    EDM dataset_tool layout: images (png/jpg) + optional dataset.json with labels;
    path/to/folder/        the same as a folder

Images come out as float in [-1, 1] (uint8 / 127.5 - 1), shape (B, C, H, W); points as float32 (B, D).
Every problem with the input raises DataError with a one-line message. Also here: the sample order (a seeded
permutation per epoch, indexed by global sample position) and sample pictures.
"""
import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(Exception):
    pass


@dataclass
class Dataset:
    x: torch.Tensor  # (N, C, H, W) uint8 images or (N, D) float32 points
    labels: torch.Tensor  # (N,) int64, or None
    label_dim: int  # number of classes (0: unlabelled)
    name: str

    @property
    def is_image(self):
        return self.x.dtype == torch.uint8

    @property
    def shape(self):
        return tuple(self.x.shape[1:])

    def __len__(self):
        return self.x.shape[0]

    def get(self, idx, flip=None, device="cpu"):
        """Samples idx (B,) as floats on device; flip (B,) bool mirrors images horizontally."""
        x = self.x[idx].to(device)
        if not self.is_image:
            return x
        x = x.float() / 127.5 - 1
        if flip is not None:
            x = torch.where(flip.to(device).reshape(-1, 1, 1, 1), x.flip(3), x)
        return x

    def one_hot(self, idx, device="cpu"):
        return torch.nn.functional.one_hot(self.labels[idx], self.label_dim).float().to(device)


# --- Sample order ----------------------------------------------------------------------------------------------


def mix_seed(*keys):
    """A well-mixed 63-bit seed from integers (never numpy's global RNG)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler:
    """Dataset indices for global sample positions: a fresh permutation per epoch, seeded by (seed, epoch),
    so position p always maps to the same sample whatever the world size or resume point."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.perm = n, seed, None, None

    def __call__(self, start, count):
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            if epoch != self.epoch:
                self.epoch = epoch
                self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1)))
            take = min(count, self.n - offset)
            out.append(self.perm[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(out)


# --- Loading -------------------------------------------------------------------------------------------------------


def load(spec, cache_dir):
    """The dataset named by `spec` (see the module docstring)."""
    if spec == "toy":
        return Dataset(toy_points(100_000, seed=0), None, 0, "toy")
    if spec == "cifar10":
        x, labels = load_cifar10(cache_dir)
        return Dataset(x, labels, 10, "cifar10")
    if not os.path.exists(spec):
        raise DataError(f"no such dataset or file: {spec!r} (expected toy, cifar10, a .npy file, a .zip or a folder)")
    name = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
    if spec.endswith(".npy"):
        return Dataset(load_points(spec), None, 0, name)
    x, labels = load_image_dataset(spec)
    label_dim = int(labels.max()) + 1 if labels is not None else 0
    return Dataset(x, labels, label_dim, name)


def toy_points(n, seed=0):
    """n points from 8 Gaussians (std 0.1) at radius 1, equal weights; float32 (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(8, (n,), generator=g)
    angle = k.double() * (2 * math.pi / 8)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centers + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def load_points(path):
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path} as a .npy array ({type(e).__name__}: {e})") from None
    if a.ndim != 2 or a.shape[0] < 2 or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{path}: expected an N x D numeric array of points, got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: the array contains NaN or Inf")
    return torch.from_numpy(a)


def save_picture(path, samples, ds):
    """Samples as a PNG: images (N, C, H, W) in [-1, 1] as a grid; points as a 512 px scatter of the first two
    dimensions, samples in blue over 2048 points of the dataset `ds` in grey."""
    if samples.ndim == 4:
        n, C, H, W = samples.shape
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        grid = torch.zeros(rows * cols, C, H, W, dtype=torch.uint8)
        grid[:n] = (samples.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()
        grid = grid.reshape(rows, cols, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, cols * W, C)
        Image.fromarray(grid.squeeze(2).numpy()).save(path)
        return
    size = 512
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    sets = [ds.x[:2048, :2].double().numpy(), samples[:, :2].double().cpu().numpy()]
    lim = max(np.abs(np.concatenate(sets)).max(), 1e-6) * 1.1
    for p, color in zip(sets, [(190, 190, 190), (20, 80, 200)]):
        col = np.clip(((p[:, 0] / lim + 1) / 2 * (size - 2)).astype(int), 0, size - 2)
        row = np.clip(((1 - p[:, 1] / lim) / 2 * (size - 2)).astype(int), 0, size - 2)
        for di, dj in ((0, 0), (0, 1), (1, 0), (1, 1)):  # 2 x 2 px dots
            canvas[row + di, col + dj] = color
    Image.fromarray(canvas).save(path)

# --- Image folders and zips (EDM dataset_tool layout) ---------------------------------------------------------


def load_image_dataset(path):
    """(N, C, H, W) uint8 and (N,) int64 labels or None, from a zip or folder in EDM's dataset_tool layout."""
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                       for root, _, files in os.walk(path) for f in files)

        def read(name):
            with open(os.path.join(path, name), "rb") as f:
                return f.read()
        return _decode_images(path, names, read)
    try:
        with zipfile.ZipFile(path) as z:
            return _decode_images(path, sorted(z.namelist()), z.read)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read {path} as a zip file ({e})") from None


def _decode_images(path, names, read):
    images = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
    if not images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
    arrays = []
    for n in images:
        try:
            img = np.array(Image.open(io.BytesIO(read(n))))
        except Exception as e:
            raise DataError(f"{path}: cannot decode {n} ({e})") from None
        img = img[:, :, None] if img.ndim == 2 else img
        if arrays and img.shape != arrays[0].shape:
            raise DataError(f"{path}: {n} has shape {img.shape}, but {images[0]} has {arrays[0].shape}; all must match")
        arrays.append(img)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    labels = None
    if "dataset.json" in names:
        try:
            meta = json.loads(read("dataset.json"))
            table = dict(meta["labels"]) if meta.get("labels") is not None else None
        except Exception as e:
            raise DataError(f"{path}: cannot parse dataset.json ({e})") from None
        if table is not None:
            missing = [n for n in images if n not in table]
            if missing:
                raise DataError(f"{path}: dataset.json has no label for {missing[0]} ({len(missing)} missing)")
            labels = torch.tensor([int(table[n]) for n in images], dtype=torch.int64)
    return x, labels

# --- CIFAR-10 ------------------------------------------------------------------------------------------------


def cache_dir_default():
    return os.environ.get("FLOWMAPS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flowmaps"))


def load_cifar10(cache_dir, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """CIFAR-10 training set: (50000, 3, 32, 32) uint8 and (50000,) labels. Downloads on first use."""
    path = os.path.join(cache_dir, "cifar-10-python.tar.gz")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            urllib.request.urlretrieve(url, tmp)
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise DataError(f"cannot download CIFAR-10 from {url} ({type(e).__name__}); "
                            f"download it yourself and put cifar-10-python.tar.gz (md5 {md5}) in {cache_dir}") from None
        os.replace(tmp, path)
    digest = _md5(path)
    if digest != md5:
        raise DataError(f"{path} has md5 {digest}, expected {md5}: delete it and try again")
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i in range(1, 6):
                batch = _NumpyUnpickler(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}"), encoding="bytes").load()
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, KeyError, pickle.UnpicklingError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a valid CIFAR-10 python archive ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the CIFAR batches are pickles, and a pickle may
    otherwise call any function it names."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol-2 bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)
