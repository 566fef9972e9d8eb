"""FID (Heusel et al., arXiv:1706.08500v6) of a checkpoint against reference statistics, with one pinned protocol.
Its conventions come from NVlabs/edm `fid.py` (calculate_inception_stats, calculate_fid_from_inception_stats: float64
sums, .npz files with mu and sigma) and `generate.py` (the uint8 rounding), and from pytorch-fid (the detector).

    python fid.py ref  --data cifar10 --out cifar10-ref.npz                        # statistics of the 50k train images
    python fid.py calc --ckpt runs/cm-cifar10-000/ckpt.pt --steps 1 --num 50000 --ref cifar10-ref.npz
    torchrun --nproc_per_node=8 fid.py calc --ckpt RUN/ckpt.pt --num-images 50000 --ref cifar10-ref.npz --json fid.json
    python fid.py calc ... --steps 2 --sigmas 80,0.821,0                            # an explicit 2-step list
    python fid.py calc ... --repeats 3              # EDM's habit: 3 disjoint seed sets; each FID, their min and mean
    python fid.py ref  --data imagenet.zip --resolution 256 --out in256-ref.npz     # latent models: the encoding's crop
    python fid.py calc --ckpt runs/meanflow-latents-000 --ref in256-ref.npz        # SD-VAE latents: decoded first
    python fid.py calc ... --json RUN/fid.json --force    # --force replaces an earlier fid.py calc record only

Protocol (the same for `ref`, `calc` and train.py's --fid-every, fid_evaluator):
  * Detector: Inception-v3 "2015-12-05" (inception.py; the TF graph FID has always used), 2048-d pool3 features in
    float32 (TF32 off).
    Weights: the torchvision-style state dict pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or its copy
    weights-inception-2015-12-05-6726825d.pth (torch-fidelity); --detector takes a path, a URL or one of these names
    (looked up in the cache, downloaded when a network exists). Checked by SHA-256: the 8 hex digits before .pth are
    the hash's prefix (torch.hub convention); only 6726825d is the published detector. NVIDIA's TorchScript .pt /
    pickle detector is refused: loading it runs code stored in the downloaded file.
  * Images in [-1, 1] -> uint8 by clip(floor(127.5 x + 128), 0, 255) (EDM), even when nothing is written to disk.
  * Resize to 299 x 299 with TF1 bilinear (source coordinate = destination * in / out, no half-pixel offset: NVIDIA's
    detector and torch-fidelity), then (x - 128) / 128.
  * Statistics: sums of f and f^T f in float64, all-reduced over ranks; mu = S1 / N, sigma = (S2 - N mu mu^T) / (N - 1).
    Reference files are .npz with keys mu, sigma (EDM's format: its cifar10-32x32.npz works as --ref).
  * FID = |mu1 - mu2|^2 + tr sigma1 + tr sigma2 - 2 tr sqrt(sigma1 sigma2), all in float64, the trace from the
    eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1) (symmetric, clipped at 0).
  * Samples: the first EMA (or --ema i), eval mode, the method's own sampler. Image i's noise and (for conditional
    models, uniform) label come from a CPU generator seeded by data.mix_seed(seed, i), so the set does not depend on
    the rank count, the batch size or the device. Images are made in chunks of --batch; chunk c goes to rank
    c % world, and multi-step CM samplers (cm, scm, tcm) draw their re-noising from a generator seeded by
    mix_seed(seed, c, 1): multi-step sets depend on --batch, never on the rank count. meanflow and diffusion
    samplers are deterministic given the noise.
  * --steps N: omitted = the checkpoint's own list. cm/scm/tcm: 1 = (sample_sigmas[0], 0); N > 1 = the reference's
    default Karras-index list sigma_k, k = floor(linspace(998, 2, N + 1)), last set to 0 (FastGen 34f30e8,
    `fastgen/networks/noise_schedule.py`: EDMNoiseSchedule.get_t_list), or
    --sigmas. meanflow: 1 = (sample_ts[0], 0); N > 1 = linspace(1, 0, N + 1) with the first entry sample_ts[0]
    (2 steps: 0.999, 0.5, 0), or --ts. diffusion: N Heun steps (2 N - 1 evaluations) on its Karras grid. shortcut: N
    steps of size 1/N (N a power of two). flowmap: N flow-map jumps on linspace(1, 0, N + 1).
  * Latent models (checkpoints of 4-channel data, the imagenet256 presets): samples / 0.18215 go through the SD-VAE
    decoder (--vae, diffusers' AutoencoderKL; bf16 on CUDA) in chunks of --vae-batch, then the uint8 rule above. The
    reference statistics come from the images with the crop the latents were encoded with (ref --resolution).
  * --repeats K: K disjoint seed sets (repeat k: images k num .. (k + 1) num - 1, as EDM's seeds 0-49999,
    50000-99999, ...); prints every FID, their minimum (what EDM reports) and mean. "fid" stays the first set's.

Outputs (ref --out, calc --json, calc --save-samples DIR: DIR/samples.png and DIR/samples.npz) are checked before any
work: each lies in an existing writable folder, is no folder and none of the command's inputs (--data, --ckpt and its
folder, --ref, --detector, --vae), and is new, unless --force is given and the file is recognisably this command's own
kind (an .npz of mu and sigma; a JSON record with fid.py's keys; a PNG; an .npz of images). Each is written to a temp
file in its folder and renamed; a failed write removes the temp file and is one line.
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import secrets
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoints
import data
import inception
import recipe
from cli import UsageError, parse_as, run_main, setup_distributed

PROTOCOL = "inception-2015-12-05 pool3; uint8 floor(127.5x+128); TF1 bilinear to 299; (x-128)/128; float64 stats"

# --- Protocol: quantise, resize, normalise -----------------------------------------------------------------------


def quantize(x):
    """[-1, 1] floats -> uint8, round half up of 127.5 (x + 1) (EDM); non-finite values become 128."""
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.floor(127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def resize_tf1(x, size):
    """TF1 bilinear (align_corners=False, half_pixel_centers=False): source = dst * in / out, the top/left
    neighbour floor(source), the other one clamped at the edge. x (B, C, H, W) float -> (B, C, size, size).
    Deviation from torch's F.interpolate(align_corners=False), which uses source = (dst + 0.5) in / out - 0.5."""
    for dim in (3, 2):  # width first, then height, as TF
        n_in = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long()
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = (src - i0).to(x.dtype).reshape([-1] + [1] * (3 - dim))
        a, b = x.index_select(dim, i0), x.index_select(dim, i1)
        x = a + (b - a) * frac
    return x


@contextlib.contextmanager
def full_fp32():
    """Features in true float32: TF32 convolutions/matmuls (cuDNN's default on Ampere+) would change them."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@torch.no_grad()
def features(detector, images):
    """uint8 RGB images (B, 3, H, W) -> float32 pool3 features (B, 2048)."""
    device = next(detector.parameters()).device
    x = resize_tf1(images.to(device).float(), 299)
    with full_fp32():
        return detector((x - 128) / 128)

# --- Detector: inception.py's DetectorError as this file's one-line UsageError --------------------------------


def load_detector(spec, device, cache_dir):
    """inception.load_detector (cache_dir falls back to data.py's default), a DetectorError reported as UsageError."""
    try:
        return inception.load_detector(spec, device, cache_dir or data.cache_dir_default())
    except inception.DetectorError as e:
        raise UsageError(str(e)) from None


def fetch_detector(spec, cache_dir):
    """inception.fetch_detector, a DetectorError reported as UsageError."""
    try:
        return inception.fetch_detector(spec, cache_dir)
    except inception.DetectorError as e:
        raise UsageError(str(e)) from None

# --- Statistics and distance ----------------------------------------------------------------------------------


class FeatureStats:
    """Sums of f, f^T f and the count (plus non-finite samples) in float64; reduced across ranks at the end."""

    def __init__(self, device, dim=2048):
        self.s1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # images, non-finite samples

    def add(self, f, nonfinite=0):
        f = f.double()
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        self.counts += torch.tensor([len(f), nonfinite], dtype=torch.float64, device=f.device)

    def result(self):
        """(mu, sigma, N, non-finite count) over all ranks, float64 on the CPU."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.s1, self.s2, self.counts):
                dist.all_reduce(t)
        n, nonfinite = self.counts.tolist()
        if n < 2:
            raise UsageError(f"need at least 2 images for a covariance, got {int(n)}")
        mu = self.s1 / n
        sigma = (self.s2 - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu(), sigma.cpu(), int(n), int(nonfinite)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), float64. With S = R R^T for either covariance, S S' is
    similar to the symmetric PSD R^T S' R, whose eigenvalues (eigvalsh, clipped at 0 against rounding) give the trace
    without sqrtm. R is a Cholesky factor where one covariance is positive definite (a reference over 50k images is);
    where neither is (a handful of images), V sqrt(w) from S1's eigendecomposition. Clamped at 0: for two nearly equal
    sets (tiny tests) rounding can otherwise leave a value like -1e-9."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    for S, other in ((sigma2, sigma1), (sigma1, sigma2)):
        R, info = torch.linalg.cholesky_ex(S)
        if info == 0:
            break
    else:
        w, V = torch.linalg.eigh(sigma1)
        R, other = V * w.clamp(min=0).sqrt(), sigma2
    M = R.T @ other @ R
    tr_sqrt = torch.linalg.eigvalsh((M + M.T) / 2).clamp(min=0).sqrt().sum()
    return max(0.0, float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt))


def load_ref(path):
    """(mu, sigma) float64 numpy arrays from an .npz with keys mu, sigma (EDM's fid-refs format)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"cannot read reference statistics {path} (an .npz with mu and sigma): {e}") from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise UsageError(f"{path}: expected mu (2048,) and sigma (2048, 2048), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: the reference statistics hold NaN or Inf values")
    return mu, sigma

# --- Generation ----------------------------------------------------------------------------------------------------


def sampler_config(method, method_cfg, steps=None, sigmas=None, ts=None):
    """method_cfg with the sampler --steps / --sigmas / --ts ask for (see the module docstring)."""
    fields = dict(meanflow="sample_ts", diffusion="sample_steps", shortcut="sample_steps", flowmap="sample_steps")
    field = fields.get(method.__name__, "sample_sigmas")
    given = dict(sample_sigmas=sigmas, sample_ts=ts).get(field)
    if (sigmas and field != "sample_sigmas") or (ts and field != "sample_ts"):
        takes = dict(sample_sigmas="--steps or --sigmas", sample_ts="--steps or --ts").get(field, "--steps only")
        raise UsageError(f"--sigmas is for cm, scm and tcm, --ts for meanflow; {method.__name__} takes {takes}")
    if given:
        if steps is not None and steps != len(given) - 1:
            raise UsageError(f"--steps {steps} contradicts the {len(given) - 1}-step list {','.join(map(str, given))}")
        value = tuple(given)
    elif steps is None:
        return method_cfg
    elif steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    elif field == "sample_steps":
        value = steps
    elif steps == 1:
        value = (getattr(method_cfg, field)[0], 0.0)
    elif field == "sample_sigmas":  # Karras grid, rho 7, N = 1000, ascending on [0.002, 80] (EDMNoiseSchedule)
        k = np.floor(np.linspace(998, 2, steps + 1))
        value = tuple(((0.002 ** (1 / 7) + k / 999 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7)[:-1].tolist()) + (0.0,)
    else:
        value = (method_cfg.sample_ts[0],) + tuple(np.linspace(1, 0, steps + 1)[1:].tolist())
    try:
        return dataclasses.replace(method_cfg, **{field: value})
    except ValueError as e:
        raise UsageError(f"sampler list: {e}") from None


# --- Latent models: the SD-VAE decoder ---------------------------------------------------------------------------

VAE_FACTOR = 8  # pixels per latent position, along each axis


def vae_decoder(name=data.SD_VAE, device="cpu", dtype="auto"):
    """The SD-VAE decoder as a function: unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), about [-1, 1],
    float32. dtype auto: bf16 on CUDA (fp16 without bf16), fp32 on CPU."""
    device = torch.device(device)
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    torch_dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[dtype]
    vae = data.load_sd_vae(name, device, torch_dtype, need="FID of a latent model (decoding with the SD-VAE)")

    def decode(z):
        return vae.decode(z.to(device, torch_dtype)).sample.float()
    return decode


@torch.no_grad()
def decode_latents(decode, z, chunk=32):
    """Images from latents z (B, 4, h, w) as trained on (scaled by 0.18215): decode(z / 0.18215), `chunk` at a time."""
    return torch.cat([decode(z[i:i + chunk] / data.SD_VAE_SCALE).float() for i in range(0, len(z), chunk)])


def image_shape(shape, decode):
    """Shape of the images FID sees: the samples' own, or the decoded latents'."""
    return tuple(shape) if decode is None else (3, shape[1] * VAE_FACTOR, shape[2] * VAE_FACTOR)


@torch.no_grad()
def generate(net, method, method_cfg, shape, label_dim, start, count, seed, chunk, device, decode=None, vae_batch=32):
    """uint8 images start .. start + count - 1 (one chunk) and their number of non-finite samples. decode: None for
    image models; for latent models the VAE decoder (vae_decoder), applied to the samples by decode_latents."""
    eps, labels = [], []
    for i in range(start, start + count):
        gen = torch.Generator().manual_seed(data.mix_seed(seed, i))  # per image, on the CPU: any device, any split
        eps.append(torch.randn(shape, generator=gen))
        if label_dim:
            labels.append(torch.randint(label_dim, (), generator=gen))
    eps = torch.stack(eps).to(device)
    y = F.one_hot(torch.stack(labels), label_dim).float().to(device) if label_dim else None
    extra = {}
    if "gen" in inspect.signature(method.sample).parameters:  # re-noising of multi-step CM samplers
        extra["gen"] = torch.Generator(device).manual_seed(data.mix_seed(seed, chunk, 1))
    x = method.sample(net, eps, method_cfg, y=y, **extra)
    if decode is not None:
        finite = torch.isfinite(x).flatten(1).all(1)  # a NaN latent may decode to a finite image
        x = decode_latents(decode, x, vae_batch)
        x = torch.where(finite.reshape(-1, 1, 1, 1).to(x.device), x, torch.nan)
    nonfinite = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    return quantize(x), nonfinite


def sample_stats(net, method, method_cfg, shape, label_dim, num, detector, device, seed=0, batch=250, keep=False,
                 decode=None, repeat=0, vae_batch=32, progress=None):
    """Feature statistics of `num` samples of `net` (an EMA copy in eval mode) on every rank: chunk c of `batch`
    images goes to rank c % world. repeat k uses images k num .. (k + 1) num - 1 (and chunk seeds after those of
    repeat k - 1). progress: a data.Progress over all repeats' images, or None. Returns (mu, sigma, non-finite count,
    all uint8 images on rank 0 or None)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    stats = FeatureStats(device)
    chunks = -(-num // batch)
    kept = torch.zeros((num, *image_shape(shape, decode)), dtype=torch.uint8, device=device) if keep else None
    for c in range(rank, chunks, world):
        start, count = c * batch, min(batch, num - c * batch)
        images, nonfinite = generate(net, method, method_cfg, shape, label_dim, repeat * num + start, count, seed,
                                     repeat * chunks + c, device, decode, vae_batch)
        stats.add(features(detector, images), nonfinite)
        if keep:
            kept[start:start + count] = images
        if progress is not None:  # the ranks move in step: when this rank ends chunk c, chunks up to c + world - 1 end
            progress.update(repeat * num + min(num, (c - rank + world) * batch))
    if keep and world > 1:
        dist.all_reduce(kept)  # each image is non-zero on one rank only
    mu, sigma, _, nonfinite = stats.result()
    return mu, sigma, nonfinite, (kept.cpu() if keep and rank == 0 else None)


def compute_fid(net, method, method_cfg, shape, label_dim, num, ref_stats, detector, device, seed=0, batch=250):
    """FID of `num` samples against ref_stats = (mu, sigma); call on every rank (train.py --fid-every). NaN when
    any sample is not finite."""
    mu, sigma, nonfinite, _ = sample_stats(net, method, method_cfg, tuple(shape), label_dim, num, detector, device,
                                           seed, batch)
    return float("nan") if nonfinite else frechet_distance(mu, sigma, *ref_stats)


def fid_evaluator(args, cfg, ds, label_dim, method, method_cfg, rank, ddp, device):
    """train.py --fid-every: a function ema -> FID (this file's protocol, per-image seeds), to call on every rank."""
    if not ds.is_image or ds.shape[0] != 3:
        raise UsageError(f"--fid-every needs RGB images; {cfg['data']} has samples of shape {ds.shape}")
    ref = load_ref(args.fid_ref)
    spec = args.fid_detector or inception.DETECTOR_DEFAULT
    if rank == 0:  # may download the weights once into the cache
        detector, _ = load_detector(spec, device, args.cache)
    if ddp:
        dist.barrier()
    if rank != 0:
        detector, _ = load_detector(spec, device, args.cache)
    return lambda ema: compute_fid(ema, method, method_cfg, ds.shape, label_dim, args.fid_num, ref, detector,
                                   device, seed=cfg["seed"])


# --- Outputs: checked before any work, written through a temp file -------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD_KEYS = ("fid", "ckpt", "ref", "detector_sha256", "protocol")  # every calc --json record holds these


def is_npz_of(path, keys):
    """Whether path is an .npz archive of exactly the arrays `keys` (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return set(f.files) == set(keys)
    except Exception:  # not an .npz (a .npy array has no `with`, a pickle is refused, a text is no zip, ...)
        return False


def is_record(path):
    """Whether path is a JSON object with the keys of a calc record."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and all(k in record for k in RECORD_KEYS)


def is_png(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def inputs(args):
    """(flag, path) of every existing file or folder the command reads; --ckpt also names its run folder."""
    name = os.path.basename(args.detector.split("?")[0])
    found = [("--detector", args.detector), ("--detector", os.path.join(args.cache, name))]  # the cached download
    if args.command == "ref":
        found.append(("--data", args.data))
    else:
        run = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
        found += [("--ckpt", args.ckpt), ("--ckpt", os.path.join(args.ckpt, "ckpt.pt")), ("--ckpt", run),
                  ("--ref", args.ref), ("--vae", args.vae)]
    return [(flag, path) for flag, path in found if os.path.exists(path)]


def outputs(args):
    """(flag, path, is_ours, what is_ours recognises) of every file the command writes."""
    if args.command == "ref":
        return [("--out", args.out, lambda p: is_npz_of(p, ("mu", "sigma")),
                 "fid.py reference statistics (an .npz of mu and sigma)")]
    found = [("--json", args.json, is_record, "a fid.py calc record")] if args.json else []
    if args.save_samples:
        png, npz = (os.path.join(args.save_samples, name) for name in ("samples.png", "samples.npz"))
        found += [("--save-samples", png, is_png, "a PNG"),
                  ("--save-samples", npz, lambda p: is_npz_of(p, ("images",)), "fid.py samples (an .npz of images)")]
    return found


def check_folder(folder, flag, value):
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {value}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: the folder {folder} is not writable")


def check_outputs(args):
    """The rule of the module docstring's "Outputs", before any work (UsageError at the first path that breaks it)."""
    reads = inputs(args)

    def check_not_input(flag, path):
        for in_flag, other in reads:
            if os.path.exists(path) and os.path.samefile(path, other):
                raise UsageError(f"{flag} {path} is this command's {in_flag} {other}: write the result elsewhere")

    if args.command == "calc" and args.save_samples:
        folder = args.save_samples
        check_not_input("--save-samples", folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--save-samples {folder} is a file; name a folder")
        check_folder(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder)), "--save-samples",
                     folder)
    planned = {}
    for flag, path, is_ours, kind in outputs(args):
        check_not_input(flag, path)
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder; name a file")
        folder = os.path.dirname(os.path.abspath(path))
        if flag != "--save-samples":  # checked above (it may not exist yet)
            check_folder(folder, flag, path)
        if os.path.lexists(path):
            if not args.force:
                raise UsageError(f"{flag} {path} exists; pass --force to replace it, or choose another file")
            if not is_ours(path):
                raise UsageError(f"{flag} {path} exists and is not {kind}: not replaced, even with --force")
        real = os.path.realpath(path)
        if real in planned:
            raise UsageError(f"{flag} {path} and {planned[real]} name the same file")
        planned[real] = f"{flag} {path}"


def write_new(path, write):
    """write(tmp) fills a new temp file next to path (same extension: PIL picks the format by it), which is renamed
    over path: a crash leaves the old file or the new one. On failure the temp file is removed; an OSError (a full
    disk, a read-only folder) becomes a one-line UsageError."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # claimed: never another file
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_json(path, record):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
    write_new(path, write)


def write_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append .npz to one without it
            np.savez(f, **arrays)
    write_new(path, write)

# --- Command line --------------------------------------------------------------------------------------------------


def run_ref(args, rank, world, device):
    detector, digest = load_detector(args.detector, device, args.cache)  # before the (large) data
    if args.resolution is not None:  # images of any size, cropped as data.py encode-latents crops them
        stats = FeatureStats(device)
        total = data.count_images(args.data)
        progress = data.Progress(f"features of {args.data}", total, "images") if rank == 0 else None
        for start, images in data.cropped_images(args.data, args.resolution, args.batch, first=rank, every=world):
            stats.add(features(detector, images))
            if progress is not None:
                progress.update(min(total, start + world * args.batch))
        return save_ref(args, *stats.result()[:3], digest, rank)
    if rank == 0:  # rank 0 first (it may download), then the others
        ds = data.load(args.data, args.cache)
    if world > 1:
        dist.barrier()
    if rank != 0:
        ds = data.load(args.data, args.cache)
    if not ds.is_image or ds.shape[0] != 3:
        raise UsageError(f"{args.data} is not a set of RGB images (samples of shape {ds.shape})")
    stats = FeatureStats(device)
    progress = data.Progress(f"features of {args.data}", len(ds), "images") if rank == 0 else None
    for c in range(rank, -(-len(ds) // args.batch), world):
        stats.add(features(detector, ds.x[c * args.batch:(c + 1) * args.batch]))
        if progress is not None:
            progress.update(min(len(ds), (c + world) * args.batch))
    return save_ref(args, *stats.result()[:3], digest, rank)


def save_ref(args, mu, sigma, n, digest, rank):
    if rank == 0:
        write_npz(args.out, mu=mu.numpy(), sigma=sigma.numpy())
        crop = f", center-crop-dhariwal {args.resolution}" if args.resolution is not None else ""
        print(f"{args.out}: statistics of {n} images of {args.data}{crop} (detector {digest[:8]})")


def read_checkpoint(path, ema, device):
    """(state, method module, shape) of a checkpoint whose fields this file reads hold what they should: the method
    one of checkpoints.METHOD_NAMES (a file never picks the code that runs), the rest checked here (one-line errors)."""
    state = checkpoints.load_checkpoint(path, device)
    cfg = state["config"]
    shape = cfg.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int for n in shape) and shape[0] in (3, 4)):
        raise UsageError(f"{path} was trained on data of shape {shape or 'unknown'}, neither RGB images nor "
                         "SD-VAE latents: FID is for 3-channel images (or 4-channel latents, decoded)")
    if type(cfg.get("label_dim")) is not int or cfg["label_dim"] < 0:
        raise UsageError(f"{path}: label_dim must be an integer >= 0, got {cfg.get('label_dim')!r}")
    if type(state["step"]) is not int or not isinstance(state["ema"], list) or \
            not all(isinstance(weights, dict) for weights in state["ema"]):
        raise UsageError(f"{path} is not a checkpoint of this repository (step must be an integer, ema a list of "
                         "state dicts)")
    if not 0 <= ema < len(state["ema"]):
        raise UsageError(f"{path} holds {len(state['ema'])} EMA nets; --ema {ema} does not exist")
    return state, checkpoints.method_module(cfg["method"]), tuple(shape)


def run_calc(args, rank, world, device):
    t0 = time.time()
    state, method, shape = read_checkpoint(args.ckpt, args.ema, device)
    cfg = state["config"]
    ref = load_ref(args.ref)
    try:  # the config's values, from the file: a wrong kind (a string for a number, ...) is bad input
        method_cfg = recipe.method_config(method, cfg)
        net = checkpoints.frozen_ema(state, shape, cfg["label_dim"], device, f"{args.ckpt} ema {args.ema}", args.ema)
    except (TypeError, ValueError, KeyError) as e:
        detail = (str(e).splitlines() or [""])[0]
        raise UsageError(f"{args.ckpt}: its config does not build a {cfg['method']} net ({type(e).__name__}: "
                         f"{detail})") from None
    method_cfg = sampler_config(method, method_cfg, args.steps, args.sigmas, args.ts)
    detector, digest = load_detector(args.detector, device, args.cache)
    decode = None
    if shape[0] == 4:  # SD-VAE latents; rank 0 loads first (it may download), then the others
        if rank == 0:
            decode = vae_decoder(args.vae, device, args.vae_dtype)
        if world > 1:
            dist.barrier()
        if rank != 0:
            decode = vae_decoder(args.vae, device, args.vae_dtype)
    fids = []
    progress = data.Progress("generating", args.repeats * args.num, "images") if rank == 0 else None
    for k in range(args.repeats):
        mu, sigma, nonfinite, kept = sample_stats(net.eval(), method, method_cfg, shape, cfg["label_dim"], args.num,
                                                  detector, device, args.seed, args.batch,
                                                  keep=bool(args.save_samples) and k == 0, decode=decode, repeat=k,
                                                  vae_batch=args.vae_batch, progress=progress)
        if nonfinite:
            raise UsageError(f"{nonfinite} of {args.num} samples are not finite: the model diverged")
        fids.append(frechet_distance(mu, sigma, *ref))
        if k == 0:
            images = kept
    fid = fids[0]
    sampler = {k: getattr(method_cfg, k) for k in ("sample_sigmas", "sample_ts", "sample_steps")
               if hasattr(method_cfg, k)}
    record = dict(fid=fid, fids=fids, fid_min=min(fids), fid_mean=sum(fids) / len(fids), repeats=args.repeats,
                  num=args.num, steps=args.steps, sampler=sampler, method=cfg["method"], ckpt=args.ckpt,
                  step=state["step"], ema=args.ema, seed=args.seed, batch=args.batch, ref=args.ref,
                  detector=args.detector, detector_sha256=digest, protocol=PROTOCOL, world_size=world,
                  vae=args.vae if decode is not None else None, seconds=round(time.time() - t0, 1))
    if rank == 0:
        print(f"FID {fid:.4f} | {args.num} samples of {args.ckpt} (step {state['step']}, ema {args.ema}, {sampler}) "
              f"vs {args.ref} | {world} ranks | {record['seconds']} s")
        if args.repeats > 1:
            print(f"FID of {args.repeats} seed sets: {', '.join(f'{v:.4f}' for v in fids)} | "
                  f"min {record['fid_min']:.4f} | mean {record['fid_mean']:.4f}")
        if args.json:
            write_json(args.json, record)
        if args.save_samples:
            try:
                os.makedirs(args.save_samples, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create --save-samples {args.save_samples}: {e.strerror or e}") from None
            write_new(os.path.join(args.save_samples, "samples.png"),
                      lambda tmp: data.save_picture(tmp, images[:256].float() / 127.5 - 1, None))
            write_npz(os.path.join(args.save_samples, "samples.npz"), images=images.numpy())
    return record


def build_parser():
    p = argparse.ArgumentParser(description="FID with a pinned protocol (see the docstring).", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="reference statistics of a dataset", allow_abbrev=False)
    ref.add_argument("--data", required=True, help="cifar10, an image zip or folder (EDM layout)")
    ref.add_argument("--out", required=True, help="output .npz (mu, sigma)")
    calc = sub.add_parser("calc", help="FID of a checkpoint", allow_abbrev=False)
    calc.add_argument("--ckpt", required=True, help="checkpoint file, run folder or convert.py export (.safetensors)")
    calc.add_argument("--ref", required=True, help=".npz with mu and sigma (fid.py ref, or EDM's fid-refs)")
    calc.add_argument("--num", "--num-images", dest="num", type=int, default=50_000,
                      help="number of samples (write --num-images under torchrun, which reads --num as --numa-binding)")
    calc.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's own list)")
    calc.add_argument("--sigmas", type=parse_as(tuple), help="cm/scm/tcm: explicit sigma list ending in 0")
    calc.add_argument("--ts", type=parse_as(tuple), help="meanflow: explicit t list ending in 0")
    calc.add_argument("--seed", type=int, default=0, help="image i uses seed mix_seed(seed, i)")
    calc.add_argument("--ema", type=int, default=0, help="which EMA of the checkpoint")
    calc.add_argument("--save-samples", help="folder for samples.png and samples.npz (uint8 images)")
    calc.add_argument("--json", help="write the result as JSON here")
    calc.add_argument("--repeats", type=int, default=1, help="disjoint seed sets of --num images each (EDM: 3, min)")
    calc.add_argument("--vae", default=data.SD_VAE, help="latent models: diffusers AutoencoderKL name or path")
    calc.add_argument("--vae-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                      help="latent models: decoder precision (auto: bf16 on CUDA, fp32 on the CPU)")
    calc.add_argument("--vae-batch", type=int, default=32, help="latent models: latents per decoder call")
    ref.add_argument("--resolution", type=int, help="center-crop-dhariwal every image to this size first, as "
                     "data.py encode-latents did (reference statistics for latent models)")
    for command in (ref, calc):
        command.add_argument("--force", action="store_true",
                             help="replace an existing output of this command's own kind (never an input)")
        command.add_argument("--detector", default=inception.DETECTOR_DEFAULT,
                       help="Inception weights: path, URL or known file name")
        command.add_argument("--batch", type=int, default=250, help="images per chunk and rank")
        command.add_argument("--device", default="auto", help="auto, cpu or cuda")
        command.add_argument("--cache", default=data.cache_dir_default(), help="download cache")
    return p


def check_numbers(args):
    lowest = [("--batch", args.batch, 1)]
    if args.command == "calc":
        lowest += [("--num", args.num, 2), ("--repeats", args.repeats, 1), ("--vae-batch", args.vae_batch, 1),
                   ("--seed", args.seed, 0)]
    elif args.resolution is not None:
        lowest.append(("--resolution", args.resolution, 1))
    for flag, value, lo in lowest:
        if value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_numbers(args)
    check_outputs(args)  # every rank: all refuse alike, before any work
    ddp, rank, world, device = setup_distributed(args.device)
    try:
        failed = None
        if rank == 0:  # download the detector once, before the other ranks look for it
            try:
                fetch_detector(args.detector, args.cache)
            except UsageError as e:
                failed = e
        if ddp:  # the others wait for it, and stop with it where it failed
            flag = torch.tensor([failed is not None], dtype=torch.int32, device=device)
            dist.broadcast(flag, 0)
            if flag.item() and rank != 0:
                raise UsageError("rank 0 could not fetch the detector (its error above)")
        if failed is not None:
            raise failed
        return (run_ref if args.command == "ref" else run_calc)(args, rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 1 (a torchrun rank leaves through
    os._exit: cli.run_main)."""
    return run_main(main, "fid.py", (UsageError, data.DataError), argv)


if __name__ == "__main__":
    cli()
