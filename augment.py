"""EDM's non-leaky augmentation pipeline (Karras et al. 2022, App. F.2; built on StyleGAN2-ADA, Karras et al. 2020),
geometric part only, batched on the device and drawn from a torch.Generator.

Each enabled transform is applied to an image with probability min(1, multiplier * p), independently of the
others; when applied, its parameter is drawn as below, otherwise the parameter is the identity (label 0). The net
sees the augmentation labels, so it learns the augmented distributions *as such* and generates clean images when
the labels are zero (sampling). The label vector concatenates, in this order (EDM's), for the enabled transforms:

    transform       parameter when applied                        labels
    xflip           w in {0, 1}, fair coin                         w                      (1)
    yflip           w in {0, 1}, fair coin                         w                      (1)
    rotate_int      k in {0, 1, 2, 3} quarter turns, uniform       [k in {1, 2}, k in {2, 3}]   (2)
    translate_int   w ~ U(-1, 1)^2, shift round(w * 0.125 * size)  shift / (0.125 * size)       (2)
    scale           w ~ N(0, 1), zoom s = 2^(0.2 w)                w                      (1)
    rotate_frac     a ~ U(-pi, pi)                                 [cos a - 1, sin a]     (2)
    aniso           w ~ N(0, 1), stretch 2^(0.2 w) along angle r   [w cos r, w sin r]     (2)
                    (r ~ U(-pi, pi) with probability 1/2, else 0; as in EDM, (w, r) and (-w, r + pi) share a label)
    translate_frac  w ~ N(0, 1)^2, shift w * 0.125 * size          w                      (2)

PIPES names the two recipes (multipliers as in EDM's train.py; xflip's 1e8 makes x-flips always eligible, i.e. a
fair coin whatever p). The pixel transforms move whole pixels (reflected at the border); the geometric ones are
composed into one affine map and resampled once: reflect-pad, 2x upsample with the sym6 wavelet low-pass filter,
bilinear sampling, 2x downsample with the same filter.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

PIPES = {
    # EDM CIFAR-10 (EDM's train.py with --augment, p = 0.12): 9-d labels, augment_dim=9 in the net.
    "edm": dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1),
    # MeanFlow CIFAR-10 (FastGen 34f30e8, `fastgen/configs/experiments/EDM/config_mf_cifar10.py`, p = 0.12): no
    # y-flip, no rotation; 6-d labels.
    "meanflow": dict(xflip=1e8, scale=1, aniso=1, translate_frac=1),
}
ORDER = ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac")
LABEL_DIMS = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2, translate_frac=2)
TRANSLATE_INT_MAX = 0.125  # fraction of the image size
SCALE_STD = 0.2  # log2 std of the isotropic zoom
ANISO_STD = 0.2  # log2 std of the anisotropic stretch
ANISO_ROTATE_PROB = 0.5  # probability that the stretch axis is rotated
TRANSLATE_FRAC_STD = 0.125  # fraction of the image size
# sym6 wavelet low-pass decomposition filter (12 taps; sums to sqrt(2)).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


def label_dim(pipe):
    """Length of the label vector of a pipe (a PIPES name or a dict of multipliers)."""
    pipe = PIPES[pipe] if isinstance(pipe, str) else pipe
    return sum(LABEL_DIMS[k] for k in ORDER if pipe.get(k, 0) > 0)


def sample_params(n, p, pipe, gen):
    """Parameters of n augmentations: {transform: (n,) or (n, 2) tensor}, identity where not applied. Every draw
    comes from `gen`, on its device, in a fixed order (reproducible from its seed)."""
    pipe = PIPES[pipe] if isinstance(pipe, str) else pipe
    unknown = set(pipe) - set(ORDER)
    if unknown:
        raise ValueError(f"unknown augmentations {sorted(unknown)}; choose from {', '.join(ORDER)}")
    dev = gen.device

    def applied(name):  # (n,) bool
        return torch.rand(n, generator=gen, device=dev) < pipe[name] * p

    def uniform(*shape):  # U(-1, 1)
        return torch.rand(shape, generator=gen, device=dev) * 2 - 1

    out = {}
    for name in ORDER:
        if pipe.get(name, 0) <= 0:
            continue
        if name in ("xflip", "yflip", "rotate_int"):
            w = torch.randint(4 if name == "rotate_int" else 2, (n,), generator=gen, device=dev)
        elif name == "translate_int":
            w = uniform(n, 2)
        elif name == "rotate_frac":
            w = uniform(n) * math.pi
        elif name == "aniso":
            w = torch.randn(n, generator=gen, device=dev)
            r = uniform(n) * math.pi
            r = torch.where(torch.rand(n, generator=gen, device=dev) < ANISO_ROTATE_PROB, r, torch.zeros_like(r))
            w = torch.stack([w, r], dim=1)  # (n, 2): log2-stretch / ANISO_STD, axis angle
        else:  # scale, translate_frac
            w = torch.randn((n, 2) if name == "translate_frac" else (n,), generator=gen, device=dev)
        keep = applied(name)
        out[name] = torch.where(keep.reshape(-1, *[1] * (w.ndim - 1)), w, torch.zeros_like(w))
    return out


def labels_of(params, H, W):
    """(n, label_dim) float32 augmentation labels of sampled parameters, in EDM's order and scaling."""
    cols = []
    for name in ORDER:
        if name not in params:
            continue
        w = params[name]
        if name == "rotate_int":
            cols += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        elif name == "translate_int":
            shift = integer_shift(w, H, W)
            cols += [shift[:, 0] / (W * TRANSLATE_INT_MAX), shift[:, 1] / (H * TRANSLATE_INT_MAX)]
        elif name == "rotate_frac":
            cols += [w.cos() - 1, w.sin()]
        elif name == "aniso":
            cols += [w[:, 0] * w[:, 1].cos(), w[:, 0] * w[:, 1].sin()]
        elif name == "translate_frac":
            cols += [w[:, 0], w[:, 1]]
        else:  # xflip, yflip, scale
            cols += [w]
    return torch.stack([c.float() for c in cols], dim=1)


def integer_shift(w, H, W):
    """(n, 2) int64 pixel shifts (x, y) of translate_int parameters w in [-1, 1]^2."""
    return torch.stack([(w[:, 0] * (W * TRANSLATE_INT_MAX)).round(), (w[:, 1] * (H * TRANSLATE_INT_MAX)).round()], 1).long()


def augment(x, p, pipe, gen):
    """(augmented x, labels): x (B, C, H, W) float images, p the overall probability, pipe a PIPES name or dict,
    gen a torch.Generator on x's device. p = 0 returns x itself and zero labels (no draws)."""
    if p == 0:
        return x, torch.zeros(x.shape[0], label_dim(pipe), device=x.device)
    params = sample_params(x.shape[0], p, pipe, gen)
    return apply(x, params), labels_of(params, x.shape[2], x.shape[3]).to(x.device)


def apply(x, params):
    """The augmentations `params` applied to x (B, C, H, W): pixel transforms, then one geometric resampling."""
    B, C, H, W = x.shape
    if "xflip" in params:
        x = torch.where(params["xflip"].reshape(B, 1, 1, 1) == 1, x.flip(3), x)
    if "yflip" in params:
        x = torch.where(params["yflip"].reshape(B, 1, 1, 1) == 1, x.flip(2), x)
    if "rotate_int" in params:  # k quarter turns as x-flip (k = 1, 2), y-flip (k = 2, 3), transpose (k = 1, 3)
        k = params["rotate_int"].reshape(B, 1, 1, 1)
        x = torch.where((k == 1) | (k == 2), x.flip(3), x)
        x = torch.where((k == 2) | (k == 3), x.flip(2), x)
        x = torch.where((k == 1) | (k == 3), x.transpose(2, 3), x)
    if "translate_int" in params:
        x = _translate_int(x, integer_shift(params["translate_int"], H, W))
    G_inv = _geometry(params, B, H, W, x.device)
    if G_inv is not None:
        x = _resample(x, G_inv)
    return x


def _reflect(i, n):
    """Index i mirrored into [0, n) (the border pixel is not repeated)."""
    return n - 1 - (n - 1 - i % (2 * n - 2)).abs()


def _translate_int(x, shift):
    """Content moved right by shift[:, 0] and down by shift[:, 1] pixels; vacated pixels mirror the image."""
    B, C, H, W = x.shape
    cols = _reflect(torch.arange(W, device=x.device) - shift[:, :1], W)  # (B, W): source column of each column
    rows = _reflect(torch.arange(H, device=x.device) - shift[:, 1:], H)  # (B, H)
    x = torch.gather(x, 3, cols[:, None, None, :].expand(B, C, H, W))
    return torch.gather(x, 2, rows[:, None, :, None].expand(B, C, H, W))


def _matrices(a, b, c, d, tx, ty):
    """(B, 3, 3) affine matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (B,) entries."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).reshape(-1, 3, 3)


def _rotation(theta):
    return _matrices(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), torch.zeros_like(theta), torch.zeros_like(theta))


def _diag(sx, sy):
    zero = torch.zeros_like(sx)
    return _matrices(sx, zero, zero, sy, zero, zero)


def _geometry(params, B, H, W, device):
    """G_inv (B, 3, 3): output pixel (x, y, 1), centred on the image, -> the input point it shows; None if no
    geometric transform is enabled. Output(q) = Input(G_inv q)."""
    G_inv = None

    def then(M):
        nonlocal G_inv
        G_inv = M if G_inv is None else G_inv @ M

    if "scale" in params:
        s = (params["scale"].double() * SCALE_STD).exp2()  # content zoomed by s
        then(_diag(1 / s, 1 / s))
    if "rotate_frac" in params:
        then(_rotation(params["rotate_frac"].double()))
    if "aniso" in params:
        w, r = params["aniso"].double().unbind(1)
        s = (w * ANISO_STD).exp2()  # content stretched by s along angle r, by 1 / s across
        then(_rotation(-r) @ _diag(1 / s, s) @ _rotation(r))
    if "translate_frac" in params:
        t = params["translate_frac"].double() * TRANSLATE_FRAC_STD  # content moved by t * size
        then(_translation(-t[:, 0] * W, -t[:, 1] * H, B, device))
    return G_inv


def _translation(tx, ty, B, device):
    """(B, 3, 3) translations by numbers or (B,) tensors."""
    one = torch.ones(B, dtype=torch.float64, device=device)
    return _matrices(one, 0 * one, 0 * one, one, tx * one, ty * one)


def _scaling(sx, sy, B, device):
    one = torch.ones(B, dtype=torch.float64, device=device)
    return _diag(sx * one, sy * one)


def _resample(x, G_inv):
    """x (B, C, H, W) resampled through G_inv: reflect-pad by what the map reaches, upsample 2x with the sym6
    filter, sample bilinearly, filter and downsample 2x back to (H, W)."""
    B, C, H, W = x.shape
    dev = x.device
    taps = torch.tensor(SYM6, dtype=x.dtype, device=dev)
    pad = len(SYM6) // 4  # filter support margin, in output pixels
    cx, cy = (W - 1) / 2, (H - 1) / 2

    # Margin: how far outside the image the corners of the output reach in the input, plus the filter support.
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float64, device=dev)
    reach = (G_inv @ corners.T)[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, B * 4): x and y of every corner
    margin = torch.cat([-reach, reach]).amax(dim=1)  # (4,): left, top, right, bottom
    margin = margin + torch.tensor([pad * 2 - cx, pad * 2 - cy] * 2, dtype=torch.float64, device=dev)
    margin = torch.minimum(margin.clamp_min(0), torch.tensor([W - 1, H - 1] * 2, dtype=torch.float64, device=dev))
    mx0, my0, mx1, my1 = (int(m) for m in margin.ceil().tolist())
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
    G_inv = _translation((mx0 - mx1) / 2, (my0 - my1) / 2, B, dev) @ G_inv  # centre of the padded image

    # 2x upsample: zero insertion, then the (flipped) low-pass filter along x and y.
    up = taps.flip(0).reshape(1, 1, 1, -1).repeat(C, 1, 1, 1)  # (C, 1, 1, taps)
    Hp, Wp = x.shape[2], x.shape[3]
    x = torch.stack([x, torch.zeros_like(x)], dim=4).reshape(B, C, Hp, 2 * Wp)[..., :-1]
    x = F.conv2d(x, up, groups=C, padding=[0, (len(SYM6) + 1) // 2])
    x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(B, C, 2 * Hp, x.shape[3])[:, :, :-1]
    x = F.conv2d(x, up.transpose(2, 3), groups=C, padding=[(len(SYM6) + 1) // 2, 0])
    # The same map in upsampled pixels, whose centres sit half a pixel off the original grid's.
    G_inv = _scaling(2, 2, B, dev) @ G_inv @ _scaling(0.5, 0.5, B, dev)
    G_inv = _translation(-0.5, -0.5, B, dev) @ G_inv @ _translation(0.5, 0.5, B, dev)

    # Sample the output (with `pad` extra pixels a side for the downsampling filter) in normalised coordinates.
    out_h, out_w = (H + 2 * pad) * 2, (W + 2 * pad) * 2
    theta = _scaling(2 / x.shape[3], 2 / x.shape[2], B, dev) @ G_inv @ _scaling(out_w / 2, out_h / 2, B, dev)
    grid = F.affine_grid(theta[:, :2, :].to(x.dtype), [B, C, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Low-pass filter and keep every other pixel, then crop the margin.
    down = taps.reshape(1, 1, 1, -1).repeat(C, 1, 1, 1)
    x = F.conv2d(x, down, groups=C, stride=[1, 2], padding=[0, (len(SYM6) - 1) // 2])[..., pad:-pad]
    x = F.conv2d(x, down.transpose(2, 3), groups=C, stride=[2, 1], padding=[(len(SYM6) - 1) // 2, 0])[:, :, pad:-pad]
    return x


@contextlib.contextmanager
def augment_labels(net, aug):
    """Inside, every call of `net` (through DDP or bare, in the method's loss) gets the augmentation labels aug
    (B, augment_dim): the method files need not know about augmentation. None: no labels (zero at sampling)."""
    if aug is None:
        yield
        return

    def feed(module, args, kwargs):
        if args[0].shape[0] != aug.shape[0]:
            raise RuntimeError(f"augmentation labels for {aug.shape[0]} samples, net called on {args[0].shape[0]}")
        return args, {**kwargs, "aug": aug}
    handle = net.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
