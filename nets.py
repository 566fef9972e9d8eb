"""Networks: EDM's DDPM++ UNet (`SongUNet`) and a residual `MLP` for point data.

Call signature shared by every net here (each method file documents what it feeds in):

    out = net(x, t, r=None, y=None, aug=None)                          # (B, *shape)
    out, logvar = net(x, t, r=None, y=None, aug=None, return_logvar=True)  # logvar: (B,)

    x    (B, C, H, W) or (B, D)  input (already preconditioned by the method, if it preconditions)
    t    (B,)                    time / noise label (MeanFlow: t in [0, 1]; EDM methods: c_noise = ln(sigma)/4)
    r    (B,) or None            second time (MeanFlow), embedded like t and concatenated
    y    (B, label_dim) or None  one-hot class labels; an all-zero row is the null label (CFG)
    aug  (B, augment_dim) or None  augmentation labels (zero at sampling)

All nets are plain PyTorch: explicit group norm, einsum attention, no custom autograd.Function, no numpy
constants in modules. So `torch.func.jvp`, `torch.compile` and float64 all work (REFERENCE.md §6.7, §11).

Fused JVP: `net(x, t, r, y, tangents=(dx, dt, dr))` returns the pair `(out, d_out)`. `out` is a normal
differentiable forward; `d_out`, the JVP along the tangents (None = zero), is computed in the same pass, in
fp32, without an autograd graph and with the same dropout mask. One pass thus replaces "no-grad
torch.func.jvp + a second, differentiable forward"; see the "Tangent propagation" section.

Parameter and buffer names follow EDM's checkpoints (`enc.32x32_block0.conv0.weight`, ...), so official
weights can be loaded into `SongUNet` by key.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# --- Tangent propagation -------------------------------------------------------------------------------
# Forward-mode AD written out for the few ops these nets use. Linear ops (conv, linear, resampling,
# reshapes, sums) map a tangent through the same op without bias; nonlinear ops (SiLU, group norm, softmax
# attention, sin/cos embeddings, dropout) use their derivative at the primal. Tangents never carry an
# autograd graph, so the backward pass costs exactly what a plain forward's backward costs.


class Dual(NamedTuple):
    p: torch.Tensor  # primal, with autograd graph
    d: torch.Tensor  # tangent, no graph, fp32 (or float64)

    @property
    def shape(self):
        return self.p.shape

    @property
    def device(self):
        return self.p.device

    def __add__(self, other):
        if isinstance(other, Dual):
            return Dual(self.p + other.p, self.d + other.d)
        return Dual(self.p + other, self.d)

    def __mul__(self, c):  # c: a constant (number or tensor without tangent)
        return Dual(self.p * c, self.d * (_tan(c) if torch.is_tensor(c) else c))

    def reshape(self, *shape):
        return Dual(self.p.reshape(*shape), self.d.reshape(*shape))

    def flip(self, dim):
        return Dual(self.p.flip(dim), self.d.flip(dim))

    def unbind(self, dim):
        return tuple(Dual(p, d) for p, d in zip(self.p.unbind(dim), self.d.unbind(dim)))


def as_dual(x):
    """A plain tensor as a Dual with zero tangent. Nets call it on x when t or r carries a tangent, so that
    `Tensor + Dual` (which torch would not dispatch to Dual) never happens."""
    return x if isinstance(x, Dual) else Dual(x, torch.zeros_like(_tan(x)))


def _with_tangents(x, t, r, tangents):
    """Inputs as Duals when the caller asks for a JVP: tangents = (dx, dt, dr), each a tensor or None (zero)."""
    if tangents is None:
        return x, t, r
    dx, dt, dr = tangents
    x = Dual(x, _tan(dx)) if dx is not None else as_dual(x)
    t = Dual(t, _tan(dt)) if dt is not None else t
    r = Dual(r, _tan(dr)) if dr is not None and r is not None else r
    return x, t, r


def _tan(a):
    """A tensor as it enters tangent arithmetic: no graph, at least fp32 (the JVP runs in fp32)."""
    a = a.detach()
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def _fp32(x):
    """Context for tangent matmuls/convs: autocast off, so the JVP stays fp32 under bf16 training."""
    return torch.autocast(x.device.type, enabled=False)


def cat(xs, dim):
    if not any(isinstance(x, Dual) for x in xs):
        return torch.cat(xs, dim)
    xs = [as_dual(x) for x in xs]
    return Dual(torch.cat([x.p for x in xs], dim), torch.cat([x.d for x in xs], dim))


def silu(x):
    if not isinstance(x, Dual):
        return F.silu(x)
    p = _tan(x.p)
    s = torch.sigmoid(p)
    return Dual(F.silu(x.p), x.d * s * (1 + p * (1 - s)))  # silu'(p) = s (1 + p (1 - s))


def dropout(x, p, training):
    """Dropout whose mask is drawn in fp32 whatever the activation dtype, so two passes under different
    precisions (fp32 JVP, bf16 grad pass) consume the RNG identically and share the mask (REFERENCE §1.7)."""
    if not training or p == 0:
        return x
    keep = torch.empty(x.shape, device=x.device, dtype=torch.float32).bernoulli_(1 - p)
    scale = keep / (1 - p)
    if isinstance(x, Dual):
        return Dual(x.p * scale.to(x.p.dtype), x.d * scale.to(x.d.dtype))
    return x * scale.to(x.dtype)


# --- Layers ----------------------------------------------------------------------------------------------

def weight_init(shape, mode, fan_in, fan_out):
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        if isinstance(x, Dual):
            out = self(x.p)
            with _fp32(x.d):
                return Dual(out, x.d @ _tan(self.weight).to(x.d.dtype).t())
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """EDM's Conv2d: optional 2x up/down resampling with a fixed FIR filter, then a kernel x kernel conv.
    kernel = 0 means resampling only (no weight)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 init_mode="kaiming_normal", init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.outer(f)[None, None] / f.sum().square()  # (1, 1, k, k), sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def _linear(self, x, weight):
        """Everything but the bias; linear in x."""
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype).tile([x.shape[1], 1, 1, 1])
            f_pad = (f.shape[-1] - 1) // 2
            if self.up:
                x = F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f, groups=x.shape[1], stride=2, padding=f_pad)
        if weight is not None:
            x = F.conv2d(x, weight.to(x.dtype), padding=weight.shape[-1] // 2)
        return x

    def forward(self, x):
        if isinstance(x, Dual):
            weight = _tan(self.weight) if self.weight is not None else None
            out = self(x.p)
            with _fp32(x.d):
                return Dual(out, self._linear(x.d, weight))
        x = self._linear(x, self.weight)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm written out (mean/var in fp32) so torch.compile can trace it under torch.func.jvp."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def _normalize(self, x):
        """Returns x_hat (same shape as x, fp32) and 1/std per group (B, G, 1)."""
        B = x.shape[0]
        xg = x.reshape(B, self.num_groups, -1).to(torch.promote_types(x.dtype, torch.float32))
        mean = xg.mean(dim=2, keepdim=True)
        var = (xg - mean).square().mean(dim=2, keepdim=True)
        rstd = torch.rsqrt(var + self.eps)
        return ((xg - mean) * rstd).reshape(x.shape), rstd

    def _affine(self, x_hat, dtype):
        shape = [1, -1] + [1] * (x_hat.ndim - 2)
        return (x_hat * self.weight.reshape(shape) + self.bias.reshape(shape)).to(dtype)

    def forward(self, x):
        if not isinstance(x, Dual):
            return self._affine(self._normalize(x)[0], x.dtype)
        x_hat, rstd = self._normalize(x.p)
        B, G = x.d.shape[0], self.num_groups
        xh = _tan(x_hat).reshape(B, G, -1)
        dg = x.d.reshape(B, G, -1)
        # d x_hat = rstd (dx - mean(dx) - x_hat mean(x_hat dx)), per group
        dx_hat = rstd.detach() * (dg - dg.mean(2, keepdim=True) - xh * (xh * dg).mean(2, keepdim=True))
        shape = [1, -1] + [1] * (x.d.ndim - 2)
        return Dual(self._affine(x_hat, x.p.dtype), dx_hat.reshape(x.d.shape) * _tan(self.weight).reshape(shape))


def attention(q, k, v):
    """Single-head softmax attention over tokens. q, k, v: (N, C, L). Plain einsum + softmax: fused SDPA
    kernels have no forward-mode AD (REFERENCE §6.7)."""
    scale = 1 / math.sqrt(q.shape[1])
    if not isinstance(q, Dual):
        w = torch.einsum("ncq,nck->nqk", q, k * scale).softmax(dim=2)  # (N, Lq, Lk)
        return torch.einsum("nqk,nck->ncq", w, v)
    logits = torch.einsum("ncq,nck->nqk", q.p, k.p * scale)
    w = logits.softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v.p)
    qp, kp, vp, wp = _tan(q.p), _tan(k.p), _tan(v.p), _tan(w)
    with _fp32(q.d):
        d_logits = (torch.einsum("ncq,nck->nqk", q.d, kp) + torch.einsum("ncq,nck->nqk", qp, k.d)) * scale
        d_w = wp * (d_logits - (wp * d_logits).sum(dim=2, keepdim=True))  # softmax JVP
        d_a = torch.einsum("nqk,nck->ncq", d_w, vp) + torch.einsum("nqk,nck->ncq", wp, v.d)
    return Dual(a, d_a)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(f t), sin(f t)], f_i = (1/max_positions)^(i / (n/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, t):
        tp = t.p if isinstance(t, Dual) else t
        half = self.num_channels // 2
        dtype = torch.promote_types(tp.dtype, torch.float32)  # time embeddings stay in fp32 (REFERENCE §9.4)
        freqs = torch.arange(half, dtype=dtype, device=tp.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        arg = tp.to(dtype).outer(freqs)  # (B, half)
        emb = torch.cat([arg.cos(), arg.sin()], dim=1)
        if not isinstance(t, Dual):
            return emb
        d_arg = t.d.to(dtype).outer(freqs)
        a = _tan(arg)
        return Dual(emb, torch.cat([-a.sin() * d_arg, a.cos() * d_arg], dim=1))


def _swap_halves(emb):
    """[cos, sin] -> [sin, cos], as EDM's SongUNet does (needed to load its weights)."""
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)


# --- DDPM++ (EDM SongUNet) -------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=1, dropout=0.0, skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=(1, 1),
                 resample_proj=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout, self.skip_scale = dropout, skip_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        x = silu(self.norm1(x + self.affine(emb).reshape(-1, self.out_channels, 1, 1)))
        x = self.conv1(dropout(x, self.dropout, self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = qkv.unbind(2)  # (B * heads, C / heads, H * W) each
            a = attention(q, k, v).reshape(B, C, H, W)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++ from EDM (Karras et al. 2022), 'standard' encoder/decoder, positional time embedding.
    Defaults are EDM's CIFAR-10 configuration: 55,733,891 parameters with augment_dim=9, unconditional."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, use_r=False, logvar=False):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels
        cond_channels = noise_channels * (2 if use_r else 1)  # r gets its own embedding, concatenated
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, dropout=dropout, init=init, init_zero=init_zero, init_attn=init_attn)
        self.img_resolution, self.img_channels, self.label_dim, self.use_r = img_resolution, in_channels, label_dim, use_r

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, cond_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, cond_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(cond_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.logvar_linear = Linear(noise_channels, 1, init_mode="kaiming_normal") if logvar else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        if (r is not None) != self.use_r:
            raise ValueError(f"this net was built with use_r={self.use_r} but got r={'None' if r is None else 'a tensor'}")
        x, t, r = _with_tangents(x, t, r, tangents)
        noise_emb = self.map_noise(t)
        emb = _swap_halves(noise_emb)
        if self.use_r:
            emb = cat([emb, _swap_halves(self.map_noise(r))], dim=1)
        if self.map_label is not None and y is not None:
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and aug is not None:
            emb = emb + self.map_augment(aug)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                x = block(x)
            elif name.endswith("aux_conv"):
                x = block(silu(x))
            else:
                if x.shape[1] != block.in_channels:
                    x = cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        if not return_logvar:
            return x
        return x, _logvar(self.logvar_linear, noise_emb)


def _logvar(head, noise_emb):
    """Log-variance head for learned adaptive loss weights (sCM). A function of the time embedding only."""
    if head is None:
        raise ValueError("return_logvar=True needs a net built with logvar=True")
    out = head(noise_emb)
    return (out.p if isinstance(out, Dual) else out).reshape(-1)  # (B,); no tangent needed


# --- MLP for point data ------------------------------------------------------------------------------------

class MLPBlock(nn.Module):
    def __init__(self, width, emb_channels, dropout):
        super().__init__()
        self.dropout = dropout
        self.affine = Linear(emb_channels, width, init_mode="xavier_uniform")
        self.fc0 = Linear(width, width, init_mode="xavier_uniform")
        self.fc1 = Linear(width, width, init_mode="xavier_uniform", init_weight=1e-5)

    def forward(self, x, emb):
        h = silu(self.fc0(silu(x + self.affine(emb))))
        return x + self.fc1(dropout(h, self.dropout, self.training))


class MLP(nn.Module):
    """Residual MLP with the same time/label conditioning as SongUNet, for N-D point data."""

    def __init__(self, dim=2, width=256, depth=4, time_channels=64, label_dim=0, dropout=0.0, use_r=False, logvar=False):
        super().__init__()
        self.dim, self.label_dim, self.use_r = dim, label_dim, use_r
        cond_channels = time_channels * (2 if use_r else 1)
        self.map_noise = PositionalEmbedding(time_channels, endpoint=True)
        self.map_label = Linear(label_dim, cond_channels, init_mode="xavier_uniform") if label_dim else None
        self.map_layer0 = Linear(cond_channels, width, init_mode="xavier_uniform")
        self.map_layer1 = Linear(width, width, init_mode="xavier_uniform")
        self.logvar_linear = Linear(time_channels, 1) if logvar else None
        self.fc_in = Linear(dim, width, init_mode="xavier_uniform")
        self.blocks = nn.ModuleList([MLPBlock(width, width, dropout) for _ in range(depth)])
        self.fc_out = Linear(width, dim, init_mode="xavier_uniform", init_weight=1e-5)

    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        if (r is not None) != self.use_r:
            raise ValueError(f"this net was built with use_r={self.use_r} but got r={'None' if r is None else 'a tensor'}")
        x, t, r = _with_tangents(x, t, r, tangents)
        noise_emb = self.map_noise(t)
        emb = cat([noise_emb, self.map_noise(r)], dim=1) if self.use_r else noise_emb
        if self.map_label is not None and y is not None:
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        x = self.fc_in(x)
        for block in self.blocks:
            x = block(x, emb)
        x = self.fc_out(silu(x))
        if not return_logvar:
            return x
        return x, _logvar(self.logvar_linear, noise_emb)


# --- Registry ------------------------------------------------------------------------------------------------
# name -> (class, default kwargs). train.py adds resolution/channels/dim, label_dim, use_r, dropout.

NETS = {
    "ddpmpp": (SongUNet, dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))),
    # A few-MB DDPM++ for CPU smoke runs and tests: same code path, attention included.
    "ddpmpp-tiny": (SongUNet, dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))),
    "mlp": (MLP, dict(width=256, depth=4)),
}


def build_net(name, shape, label_dim=0, use_r=False, logvar=False, **overrides):
    """Build a registered net for data of `shape` (C, H, W) or (D,)."""
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; choose from {', '.join(NETS)}")
    cls, kwargs = NETS[name]
    kwargs = {**kwargs, **overrides, "label_dim": label_dim, "use_r": use_r, "logvar": logvar}
    if cls is MLP:
        if len(shape) != 1:
            raise ValueError(f"net {name!r} is for point data (N, D); got samples of shape {tuple(shape)}")
        return cls(dim=shape[0], **kwargs)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"net {name!r} needs square images (C, H, H); got samples of shape {tuple(shape)}")
    return cls(img_resolution=shape[1], in_channels=shape[0], out_channels=shape[0], **kwargs)
