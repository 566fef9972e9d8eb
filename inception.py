"""The FID detector: Inception-v3 "2015-12-05" (the TF graph every published FID uses; Heusel et al.,
arXiv:1706.08500v6, take its pool3 features) as a torch module, and its published weights, fetched or found on disk
and checked by SHA-256 before they are loaded. The TF graph's differences from torchvision's Inception-v3 are the ones
pytorch-fid ports (its `inception.py`: FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2). fid.py holds
the rest of the protocol; this file is the network and where its weights come from. It imports nothing of the
project: every problem is a DetectorError with a one-line message (fid.py reports it as its own usage error), and the
download cache is the caller's.

Weights: the torchvision-style state dict pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or its copy
weights-inception-2015-12-05-6726825d.pth (torch-fidelity), loaded with weights_only=True. NVIDIA's TorchScript .pt /
pickle detector is refused: loading it runs code stored in the downloaded file.
"""
import hashlib
import os
import re
import shutil
import sys
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

DETECTOR_URLS = {
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth":
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
}
DETECTOR_DEFAULT = "pt_inception-2015-12-05-6726825d.pth"
PUBLISHED_SHA256_PREFIX = "6726825d"
FETCH_HINT = f"fetch {' or '.join(DETECTOR_URLS.values())} and pass --detector PATH"


class DetectorError(Exception):
    """A detector file that is missing, unverifiable or unloadable; the message is one line."""


# --- Detector: Inception-v3 "2015-12-05" ----------------------------------------------------------------------
# torchvision's Inception-v3 module names (so the published state dicts load strictly), with the TF graph's
# differences: 1008 logits, avg-pool branches that do not count the zero padding (A, C, first E block), a max-pool
# branch in the last E block (Mixed_7c), BN eps 1e-3. No auxiliary head. fc is loaded but FID never uses it.


class Conv(nn.Module):
    """conv (no bias) + BN + ReLU, named like torchvision's BasicConv2d."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)  # TF's BN epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def tf_avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages over real pixels only


class BlockA(nn.Module):  # Mixed_5b, 5c, 5d (35 x 35)
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(tf_avg_pool(x))], 1)


class BlockB(nn.Module):  # Mixed_6a (35 -> 17)
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # Mixed_6b..6e (17 x 17), factorised 7 x 7
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(c_in, c7, 1), Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(c_in, c7, 1), Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                                self.branch7x7dbl_5),
                          self.branch_pool(tf_avg_pool(x))], 1)


class BlockD(nn.Module):  # Mixed_7a (17 -> 8)
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(c_in, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b (avg-pool branch), Mixed_7c (max-pool branch: the TF graph's, not the paper's)
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, "avg"), BlockE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        """x: (B, 3, 299, 299) normalised to about [-1, 1] -> pool3 features (B, 2048)."""
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (B, 64, 147, 147)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (B, 192, 71, 71)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # (B, 288, 35, 35)
        x = chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)  # (B, 768, 17, 17)
        x = chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): pool3, the 8 x 8 average

# --- Detector weights ---------------------------------------------------------------------------------------------


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, name):
    """Full SHA-256 of the file; it must start with the hex digits after the last '-' of `name` (torch.hub)."""
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", name)
    if not m:
        raise DetectorError(f"detector file {name} must be named NAME-<first 8 hex digits of its SHA-256>.pth "
                            f"(torch.hub convention) so it can be verified; {FETCH_HINT}")
    digest = sha256_of(path)
    if not digest.startswith(m.group(1)):
        raise DetectorError(f"{path} has SHA-256 {digest[:16]}..., but its name promises {m.group(1)}: the file is "
                            f"corrupt or incomplete; delete it and {FETCH_HINT}")
    return digest


def fetch_detector(spec, cache_dir):
    """A verified local detector file for a path, a URL or a known file name. Returns (path, sha256)."""
    if spec.endswith((".pt", ".pkl")):
        raise DetectorError(f"{spec}: NVIDIA's TorchScript/pickle detector is not supported (loading it would run code "
                            f"stored in the file); {FETCH_HINT}")
    if os.path.isfile(spec):
        return spec, check_sha256(spec, os.path.basename(spec))
    name = os.path.basename(spec.split("?")[0])
    url = spec if spec.startswith(("http://", "https://")) else DETECTOR_URLS.get(spec)
    if url is None:
        raise DetectorError(f"no detector file {spec}; {FETCH_HINT}")
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
        return path, check_sha256(path, name)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise DetectorError(f"cannot create the download cache {cache_dir} ({e.strerror}); pass another --cache, or "
                            f"{FETCH_HINT}") from None
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = check_sha256(tmp, name)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, DetectorError):
            raise
        raise DetectorError(f"cannot download the detector from {url} ({type(e).__name__}); {FETCH_HINT}") from None
    os.replace(tmp, path)  # a crash never leaves a half file under the final name
    return path, digest


def load_detector(spec, device, cache_dir):
    """(InceptionV3 in eval mode on device, sha256 of the weights); cache_dir holds downloads."""
    path, digest = fetch_detector(spec, cache_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DetectorError(f"cannot load {path} as a state dict ({type(e).__name__})") from None
    net = InceptionV3()
    if not isinstance(state, dict):
        raise DetectorError(f"{path} does not hold a state dict")
    # BN's num_batches_tracked counters are bookkeeping the published files may or may not carry: ours are used.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state.update({k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")})
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise DetectorError(f"detector {path} does not fit this data/net: {str(e).splitlines()[0]}") from None
    if not digest.startswith(PUBLISHED_SHA256_PREFIX) and not (dist.is_initialized() and dist.get_rank() > 0):
        print(f"warning: {path} is not the published 2015-12-05 detector (SHA-256 {digest[:8]}...): "
              "FIDs are not comparable with published ones", file=sys.stderr)
    return net.eval().requires_grad_(False).to(device), digest
