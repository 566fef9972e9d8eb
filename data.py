"""Datasets for train.py.

    toy                    built-in 2-D mixture of 8 Gaussians on a ring (no download)
    path/to/points.npy     any N x D float array of points
    cifar10                the official CIFAR-10 python tarball, downloaded once into the cache (md5 checked)
    path/to/dataset.zip    EDM dataset_tool layout: images (png/jpg) + optional dataset.json with labels;
    path/to/folder/        the same as a folder (e.g. ImageNet-64 made by EDM's or EDM2's dataset tool)
    path/to/latents/       pre-encoded SD-VAE latents (ImageNet-256), made by `encode-latents` below

Images come out as float in [-1, 1] (uint8 / 127.5 - 1), shape (B, C, H, W); points as float32 (B, D); latents as
0.18215 (mean + std eps), (B, 4, 32, 32). Small datasets are held in memory (CIFAR-10 is 150 MB as uint8). Image sets
larger than MMAP_BYTES (ImageNet-64: 1.28 M x 3 x 64 x 64 = 15.7 GB) are decoded once into a uint8 .npy file in the
cache folder and memory-mapped, so the ranks of one machine share one copy in the page cache (train.py lets rank 0
load first). Latents are memory-mapped too. Every problem with the input raises DataError with a one-line message.
Also here: the sample order (a seeded permutation per epoch, indexed by global sample position), sample pictures,
the progress line of long loops (also fid.py's) and the encoding step:

    python data.py encode-latents --src imagenet.zip --out latents/ [--vae stabilityai/sd-vae-ft-mse] [--device cuda]
    python data.py decode --data imagenet64.zip     # fill the memory-mapped cache once, before a multi-GPU run
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import sys
import time
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
MMAP_BYTES = 2**30  # decoded image sets above this size are cached as .npy and memory-mapped
SD_VAE_SCALE = 0.18215  # Stable Diffusion's latent scale factor (facebookresearch/DiT `train.py` scales by it)
IMAGENET_CLASSES = 1000
MAX_LABEL_DIM = 100_000  # above ImageNet-21k's 21841 classes; a larger label_dim is a typo (its one-hot would not fit)


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

    def get(self, idx, flip=None, device="cpu", generator=None):
        """Samples idx (B,) as floats on device; flip (B,) bool mirrors images horizontally. `generator` is
        unused (the data are fixed; LatentDataset.get draws its noise from it)."""
        x = self.x[idx].to(device)
        if not self.is_image:
            return x
        x = x.float() / 127.5 - 1
        if flip is not None:
            x = torch.where(flip.to(device).reshape(-1, 1, 1, 1), x.flip(3), x)
        return x

    def one_hot(self, idx, device="cpu"):
        return torch.nn.functional.one_hot(self.labels[idx], self.label_dim).float().to(device)


def rms_spread(points):
    """RMS distance of points (N, D) to their mean, in float64."""
    p = points.double().cpu()
    return float((p - p.mean(0)).pow(2).sum(1).mean().sqrt())

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
    if spec.lower().endswith(".npy"):
        return Dataset(load_points(spec), None, 0, name)
    if os.path.isfile(os.path.join(spec, LATENTS_JSON)):
        return LatentDataset(spec)
    x, labels, label_dim = load_image_dataset(spec, cache_dir)
    return Dataset(x, labels, label_dim, name)


def peek_resolution(path):
    """Height of the first image of a zip or folder, without loading the rest (train.py picks a preset with it);
    None if there is none to read (data.load then says why)."""
    try:
        with _members(path) as (names, read):
            first = next(n for n in names if n.lower().endswith(IMAGE_EXTS))
            return Image.open(io.BytesIO(read(first))).size[1]
    except (DataError, StopIteration, OSError):
        return None


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
    real = np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)  # not complex, bool or text
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1 or not real:
        raise DataError(f"{path}: expected an N x D array of real numbers (N >= 2, D >= 1), got shape {a.shape} "
                        f"dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: the array contains NaN or Inf")
    return torch.from_numpy(a)


def save_picture(path, samples, ds):
    """Samples as a PNG: images (N, C, H, W) in [-1, 1] as a grid; points as a 512 px scatter of the first two
    dimensions, samples in blue over 2048 points of the dataset `ds` in grey. Latents (no decoder here): a false-colour
    grid of latent channels 0-2 as RGB, each divided by 3x its standard deviation over the grid (a preview of spatial
    structure, not the image; decode with the VAE for that)."""
    if isinstance(ds, LatentDataset):
        rgb = samples[:, :3].double()
        samples = rgb / (3 * rgb.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8))
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


@contextlib.contextmanager
def _members(path):
    """(sorted member names, read(name) -> bytes) of a zip or folder."""
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                       for root, _, files in os.walk(path) for f in files)

        def read(name):
            with open(os.path.join(path, name), "rb") as f:
                return f.read()
        yield names, read
        return
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read {path} as a zip file ({e})") from None
    with z:
        yield sorted(z.namelist()), z.read


def load_image_dataset(path, cache_dir=None):
    """(N, C, H, W) uint8, (N,) int64 labels or None, and label_dim, from a zip or folder in EDM's dataset_tool
    layout. Above MMAP_BYTES (and with a cache_dir) the images come memory-mapped from a decoded .npy cache."""
    with _members(path) as (names, read):
        images = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
        if not images:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
        labels, label_dim = _read_labels(path, names, images, read)
        first = _decode(path, images[0], read)
        if cache_dir is None or len(images) * first.size <= MMAP_BYTES:
            arrays = [first] + [_decode(path, n, read, first.shape, images[0]) for n in images[1:]]
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
        else:
            x = torch.from_numpy(_decoded_cache(path, images, read, first, cache_dir))
    return x, labels, label_dim


def _decode(path, name, read, shape=None, first_name=None):
    try:
        img = np.array(Image.open(io.BytesIO(read(name))))
    except Exception as e:
        raise DataError(f"{path}: cannot decode {name} ({e})") from None
    img = img[:, :, None] if img.ndim == 2 else img  # (H, W, C)
    if shape is not None and img.shape != shape:
        raise DataError(f"{path}: {name} has shape {img.shape}, but {first_name} has {shape}; all must match")
    return img


def _decoded_cache(path, images, read, first, cache_dir):
    """All images as a (N, C, H, W) uint8 array memory-mapped from cache_dir, decoded on first use (one process
    writes, under a temporary name, then renames). The key covers the source's path, sizes and mtimes."""
    key = hashlib.sha256(os.path.abspath(path).encode())
    if os.path.isdir(path):
        for n in images:
            stat = os.stat(os.path.join(path, n))
            key.update(f"{n}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    else:
        stat = os.stat(path)
        key.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    file = os.path.join(cache_dir, f"{name}-{key.hexdigest()[:16]}.npy")
    if not os.path.exists(file):
        print(f"decoding {len(images)} images of {path} once into {file}", flush=True)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{file}.{socket.gethostname()}.{os.getpid()}.tmp"  # nodes may share the cache
        H, W, C = first.shape
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), C, H, W))
        progress = Progress("decoding", len(images), "images")
        for i, n in enumerate(images):
            out[i] = (first if i == 0 else _decode(path, n, read, first.shape, images[0])).transpose(2, 0, 1)
            progress.update(i + 1)
        out.flush()
        del out
        os.replace(tmp, file)
    return np.load(file, mmap_mode="c")  # copy-on-write map: pages shared, nothing written back


def _read_labels(path, names, images, read):
    """Labels from dataset.json, and the label dimension: dataset.json's "label_dim" if given, else 1000 when the
    dataset's name contains "imagenet" (a subset may lack the top classes, but nets must keep ImageNet's 1000
    outputs), else the largest label + 1."""
    if "dataset.json" not in names:
        return None, 0
    try:
        meta = json.loads(read("dataset.json"))
        table = dict(meta["labels"]) if meta.get("labels") is not None else None
    except Exception as e:
        raise DataError(f"{path}: cannot parse dataset.json ({e})") from None
    if table is None:
        return None, 0
    missing = [n for n in images if n not in table]
    if missing:
        raise DataError(f"{path}: dataset.json has no label for {missing[0]} ({len(missing)} missing)")
    bad = [n for n in images if not _is_int(table[n])]
    if bad:
        raise DataError(f"{path}: dataset.json labels must be integers, got {table[bad[0]]!r} for {bad[0]}")
    labels = torch.tensor([table[n] for n in images], dtype=torch.int64)
    label_dim = meta.get("label_dim") or (IMAGENET_CLASSES if "imagenet" in os.path.basename(os.path.normpath(path)).lower()
                                          else int(labels.max()) + 1)
    check_labels(path, labels, label_dim, "dataset.json")
    return labels, label_dim


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_labels(path, labels, label_dim, source):
    """label_dim an integer in [1, MAX_LABEL_DIM] and every label in [0, label_dim)."""
    if not _is_int(label_dim) or not 1 <= label_dim <= MAX_LABEL_DIM:
        raise DataError(f"{path}: {source}'s label_dim must be an integer in [1, {MAX_LABEL_DIM}], got {label_dim!r}")
    if labels.min() < 0 or labels.max() >= label_dim:
        raise DataError(f"{path}: labels must lie in [0, {label_dim}), got [{int(labels.min())}, {int(labels.max())}]")

# --- Latents (ImageNet-256 through the SD-VAE) ---------------------------------------------------------------------
# A folder with mean.npy and std.npy (float16, (N, 4, 32, 32): the VAE posterior per image), labels.npy ((N,) int64,
# or absent) and latents.json {"format", "count", "shape", "label_dim", "scale", "vae", "resolution", "crop"}.
# Each draw samples the posterior afresh, as FastGen 34f30e8 does with pre-encoded mean and std
# (`fastgen/networks/DiT/network.py`, SDVAE.encode).

LATENTS_JSON = "latents.json"
LATENTS_FORMAT = "sd-vae-posterior-v1"


class LatentDataset:
    """Pre-encoded latents, memory-mapped. Each draw is a fresh posterior sample scale (mean + std eps)."""

    is_image = False  # not pixels: train.py must not clamp samples to [-1, 1]

    def __init__(self, path):
        try:
            with open(os.path.join(path, LATENTS_JSON)) as f:
                meta = json.load(f)
            self.mean = np.load(os.path.join(path, "mean.npy"), mmap_mode="r")
            self.std = np.load(os.path.join(path, "std.npy"), mmap_mode="r")
            has_labels = os.path.exists(os.path.join(path, "labels.npy"))
            labels = np.load(os.path.join(path, "labels.npy")) if has_labels else None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the latent dataset ({type(e).__name__}: {e})") from None
        if meta.get("format") != LATENTS_FORMAT or self.mean.shape != self.std.shape or len(self.mean) != meta.get("count"):
            raise DataError(f"{path}: {LATENTS_JSON} does not describe mean.npy/std.npy ({LATENTS_FORMAT}, same shapes)")
        self.labels, self.label_dim = None, 0
        if labels is not None:
            if labels.shape != (len(self.mean),) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: labels.npy must hold {len(self.mean)} integers, got shape {labels.shape} "
                                f"dtype {labels.dtype}")
            self.labels, self.label_dim = torch.from_numpy(labels.astype(np.int64)), meta.get("label_dim")
            check_labels(path, self.labels, self.label_dim, LATENTS_JSON)
        self.scale, self.meta = float(meta["scale"]), meta
        self.name = os.path.basename(os.path.normpath(path))

    @property
    def shape(self):
        return tuple(self.mean.shape[1:])

    def __len__(self):
        return self.mean.shape[0]

    def get(self, idx, flip=None, device="cpu", generator=None):
        """scale (mean + std eps) for samples idx (B,), eps = torch.randn((B, *shape), generator=generator) drawn on
        the generator's device (global RNG without one), so a per-micro-batch generator makes draws reproducible.
        No x-flips: a flipped image's latent is not the flipped latent."""
        if flip is not None:
            raise DataError("x-flips are not supported for latents (flip the images before encoding instead)")
        rows = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx)
        mean = torch.from_numpy(self.mean[rows].astype(np.float32))  # (B, 4, 32, 32)
        std = torch.from_numpy(self.std[rows].astype(np.float32))
        rng_device = generator.device if generator is not None else "cpu"
        eps = torch.randn(mean.shape, generator=generator, device=rng_device)
        return ((mean.to(rng_device) + std.to(rng_device) * eps) * self.scale).to(device)

    def one_hot(self, idx, device="cpu"):
        return torch.nn.functional.one_hot(self.labels[idx], self.label_dim).float().to(device)


def center_crop_dhariwal(img, res):
    """ADM's (guided-diffusion's) ImageNet crop, also EDM2's "center-crop-dhariwal": halve with a box filter while
    the short side is at least 2 res, resize the short side to res (bicubic), then take the centre res x res."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - res) // 2, (img.size[1] - res) // 2
    return img.crop((left, top, left + res, top + res))


SD_VAE = "stabilityai/sd-vae-ft-mse"  # the VAE of FastGen 34f30e8's DiT runs (`fastgen/networks/DiT/network.py`, SDVAE)


def load_sd_vae(name, device, dtype=torch.float32, need="encode-latents"):
    """diffusers' AutoencoderKL `name` in eval mode, frozen. diffusers is optional: imported here only, for the two
    jobs that need it (encode-latents here, decoding latent samples in fid.py)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise DataError(f"{need} needs diffusers: pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(name, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the VAE {name!r} ({type(e).__name__}); pass --vae PATH to a local copy") from None
    return vae.to(device).eval().requires_grad_(False)


def sd_vae_encoder(name=SD_VAE, device="cuda"):
    """images (B, 3, H, W) in [-1, 1] -> (posterior mean, posterior std), each (B, 4, H/8, W/8), by diffusers'
    AutoencoderKL (an optional dependency, needed only here)."""
    vae = load_sd_vae(name, device)

    @torch.no_grad()
    def encode(images):
        posterior = vae.encode(images.to(device)).latent_dist
        return posterior.mean, posterior.std
    return encode


def _image_labels(path, names, images, read):
    """dataset.json labels if present; otherwise ImageNet class folders (n01440764/...), numbered in sorted order
    (ADM's rule); otherwise none."""
    labels, label_dim = _read_labels(path, names, images, read)
    if labels is not None:
        return labels.numpy(), label_dim
    synsets = [n.split("/")[-2] if "/" in n else "" for n in images]
    if all(re.fullmatch(r"n\d{8}", s) for s in synsets):
        classes = sorted(set(synsets))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[s] for s in synsets], np.int64), max(len(classes), IMAGENET_CLASSES)
    return None, 0


def count_images(src):
    """The number of images (IMAGE_EXTS) of a zip or folder: what cropped_images goes through."""
    with _members(src) as (names, _):
        return sum(n.lower().endswith(IMAGE_EXTS) for n in names)


def cropped_images(src, resolution, batch, first=0, every=1):
    """(start, uint8 (B, 3, res, res)) for the chunks first, first + every, ... of `batch` images of a zip or folder,
    each converted to RGB and cropped by center_crop_dhariwal(resolution): the crop of encode-latents, and so of
    `fid.py ref --resolution` for the reference statistics of latent models."""
    with _members(src) as (names, read):
        images = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
        if not images:
            raise DataError(f"{src}: no images ({', '.join(IMAGE_EXTS)}) found")
        for start in range(first * batch, len(images), every * batch):
            chunk = []
            for n in images[start:start + batch]:
                try:
                    img = Image.open(io.BytesIO(read(n))).convert("RGB")
                except Exception as e:
                    raise DataError(f"{src}: cannot decode {n} ({e})") from None
                chunk.append(np.asarray(center_crop_dhariwal(img, resolution)))
            yield start, torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2)  # (B, 3, res, res)


def check_new_folder(out, src):
    """encode-latents writes only into a new or empty folder, never into or above its source."""
    real_out, real_src = os.path.realpath(out), os.path.realpath(src)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"--out {out} exists and is not an empty folder: choose a new folder")
    if real_out == real_src or real_out.startswith(real_src + os.sep) or real_src.startswith(real_out + os.sep):
        raise DataError(f"--out {out} is the source {src}, inside it or above it: choose a folder beside it")


def encode_latents(src, out, encoder, batch=64, resolution=256, vae_name=None):
    """Encode every image of src (zip or folder) after center_crop_dhariwal(resolution) and x = uint8 / 127.5 - 1
    with `encoder(x) -> (mean, std)`; writes the latent folder `out` (latents.json last, so a crash leaves no
    dataset that loads)."""
    with _members(src) as (names, read):
        images = [n for n in names if n.lower().endswith(IMAGE_EXTS)]
        if not images:
            raise DataError(f"{src}: no images ({', '.join(IMAGE_EXTS)}) found")
        labels, label_dim = _image_labels(src, names, images, read)
    os.makedirs(out, exist_ok=True)
    files, progress = None, Progress("encoding", len(images), "images")
    for start, chunk in cropped_images(src, resolution, batch):
        mean, std = encoder(chunk.float() / 127.5 - 1)
        if files is None:
            files = [np.lib.format.open_memmap(os.path.join(out, f), mode="w+", dtype=np.float16,
                                               shape=(len(images), *mean.shape[1:])) for f in ("mean.npy", "std.npy")]
        for f, a in zip(files, (mean, std)):
            f[start:start + len(chunk)] = a.float().cpu().numpy().astype(np.float16)
        progress.update(start + len(chunk))
    for f in files:
        f.flush()
    if labels is not None:
        np.save(os.path.join(out, "labels.npy"), labels)
    meta = dict(format=LATENTS_FORMAT, count=len(images), shape=list(files[0].shape[1:]), label_dim=label_dim,
                scale=SD_VAE_SCALE, vae=vae_name, resolution=resolution, crop="center-crop-dhariwal", source=os.path.basename(src))
    with open(os.path.join(out, LATENTS_JSON), "w") as f:
        json.dump(meta, f, indent=2)
    return meta

# --- CIFAR-10 ------------------------------------------------------------------------------------------------


def cache_dir_default():
    return os.environ.get("FLOWMAPS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flowmaps"))


def load_cifar10(cache_dir, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """CIFAR-10 training set: (50000, 3, 32, 32) uint8 and (50000,) labels. Downloads on first use."""
    path = os.path.join(cache_dir, "cifar-10-python.tar.gz")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        try:
            urllib.request.urlretrieve(url, tmp)
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise DataError(f"cannot download CIFAR-10 from {url} ({type(e).__name__}); "
                            f"download it yourself and put cifar-10-python.tar.gz (md5 {md5}) in {cache_dir}") from None
        os.replace(tmp, path)
    digest = file_digest(path, "md5")
    if digest != md5:
        raise DataError(f"{path} has md5 {digest}, expected {md5}: delete it and try again")
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i in range(1, 6):
                batch = _NumpyUnpickler(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}"), encoding="bytes").load()
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, KeyError, pickle.UnpicklingError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a valid CIFAR-10 python archive ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def format_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`what done/total unit, rate, ETA` on stderr at most every `every` seconds, and a last line at the total if one
    was printed: a long loop shows that it moves and when it ends, a short one prints nothing.

        progress = Progress("generating", num, "images")
        for ...: progress.update(images_done)
    """

    def __init__(self, what, total, unit="", every=5.0, clock=time.monotonic):
        self.what, self.total, self.unit, self.every, self.clock = what, total, unit, every, clock
        self.t0 = self.last = clock()
        self.printed = False

    def update(self, done):
        now = self.clock()
        if now - self.last < self.every and not (self.printed and done >= self.total):
            return
        rate = done / max(now - self.t0, 1e-9)
        eta = f"ETA {format_time((self.total - done) / rate)}" if rate > 0 else "ETA unknown"
        if done >= self.total:
            eta = f"done in {format_time(now - self.t0)}"
        unit, speed = f" {self.unit}" if self.unit else "", f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
        print(f"{self.what} {done}/{self.total}{unit}, {speed}{unit}/s, {eta}", file=sys.stderr, flush=True)
        self.last, self.printed = now, True


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in 1 MiB blocks (CIFAR-10's md5; convert.py's sha256 of multi-GB weights)."""
    h = hashlib.new(algorithm)
    progress = Progress(f"{algorithm} of {os.path.basename(path)}", -(-os.path.getsize(path) >> 20), "MiB")
    with open(path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(1 << 20), b""), start=1):
            h.update(chunk)
            progress.update(i)
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

# --- Command line --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Dataset tools.")
    sub = p.add_subparsers(dest="command", required=True)
    encode_cmd = sub.add_parser("encode-latents", help="encode an image zip/folder into SD-VAE latents (ImageNet-256)")
    encode_cmd.add_argument("--src", required=True,
                            help="image zip or folder (dataset.json labels, or n0xxxxxxx class folders)")
    encode_cmd.add_argument("--out", required=True,
                            help="output folder for mean.npy, std.npy, labels.npy, latents.json")
    encode_cmd.add_argument("--vae", default=SD_VAE, help="diffusers AutoencoderKL name or path")
    encode_cmd.add_argument("--batch", type=int, default=64)
    encode_cmd.add_argument("--resolution", type=int, default=256)
    encode_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    decode_cmd = sub.add_parser("decode", help="decode a large image zip/folder into the memory-mapped cache now, in one "
                                               "process (do this before a multi-GPU run: waiting ranks could time out)")
    decode_cmd.add_argument("--data", required=True)
    decode_cmd.add_argument("--cache", default=cache_dir_default())
    args = p.parse_args(argv)
    if args.command == "decode":
        try:
            ds = load(args.data, args.cache)
        except DataError as err:
            sys.exit(f"data.py: error: {err}")
        print(f"{args.data}: {len(ds)} samples of shape {ds.shape}, label_dim {ds.label_dim}")
        return
    try:
        check_new_folder(args.out, args.src)  # before the VAE loads
        encoder = sd_vae_encoder(args.vae, args.device)
        meta = encode_latents(args.src, args.out, encoder, args.batch, args.resolution, vae_name=args.vae)
    except DataError as err:
        sys.exit(f"data.py: error: {err}")
    print(f"{args.out}: {meta['count']} latents of shape {meta['shape']}, label_dim {meta['label_dim']}")


if __name__ == "__main__":
    main()
