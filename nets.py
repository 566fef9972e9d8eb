"""Networks: EDM's DDPM++ (`SongUNet`) and ADM (`DhariwalUNet`) UNets, EDM2's magnitude-preserving `EDM2UNet`,
the adaLN-Zero transformer `DiT`, and a residual `MLP` for point data. `build_net(name, shape, ...)` builds a
registered configuration (`NETS`) for a data shape.

Call signature shared by every net here (each method file documents what it feeds in):

    out = net(x, t, r=None, y=None, aug=None)                          # (B, *shape)
    out, logvar = net(x, t, r=None, y=None, aug=None, return_logvar=True)  # logvar: (B,)

    x    (B, C, H, W) or (B, D)  input (already preconditioned by the method, if it preconditions)
    t    (B,)                    time / noise label (MeanFlow: t in [0, 1]; EDM methods: c_noise = ln(sigma)/4)
    r    (B,) or None            second time (MeanFlow), embedded like t (DiT: t - r), only with use_r=True
    y    (B, label_dim) or None  one-hot class labels; an all-zero row is the null label (CFG), and so is None
                                 (EDM's and EDM2's Precond feed zero labels for None)
    aug  (B, augment_dim) or None  augmentation labels (zero at sampling)
    rows (index (B,), n, masks) or None  x holds rows `index` of an n-row batch: dropout gives each row the mask a
                                   pass over all n rows would, from the list `masks` shared by the passes over that
                                   batch (the first one to need a mask draws it as a whole-batch pass would)

All nets are plain PyTorch: no custom autograd.Function, no numpy constants in modules. Group/layer norm and
attention run the native kernels (F.group_norm, F.layer_norm, F.scaled_dot_product_attention), which save little for
backward; inside torch.func transforms, where those kernels have no usable forward-mode rule, the same ops run
written out (`_in_func_transform`). So `torch.func.jvp`, `torch.compile` and float64 all work (tests/test_nets.py:
test_jvp_matches_central_difference, test_torch_compile_matches_eager, test_float64_forward_and_logvar).

Fused JVP: `net(x, t, r, y, tangents=(dx, dt, dr))` returns the pair `(out, d_out)`. `out` is a normal
differentiable forward; `d_out`, the JVP along the tangents (None = zero), is computed in the same pass, in
fp32, without an autograd graph and with the same dropout mask. One pass thus replaces "no-grad
torch.func.jvp + a second, differentiable forward"; see the "Tangent propagation" section.

Parameter and buffer names follow the official checkpoints (EDM: `enc.32x32_block0.conv0.weight`; EDM2: the
`unet.*` keys without the prefix; DiT: `blocks.0.attn.qkv.weight`), so converted weights load by key; the
log-variance head and r embeddings are the only additions. EDM2UNet has one extra duty for the training loop:
`normalize_weights_()` after every optimizer step (forced weight normalisation, moved out of forward).
"""
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# --- Tangent propagation -------------------------------------------------------------------------------
# Forward-mode AD written out for the few ops these nets use. Linear ops (conv, linear, resampling,
# reshapes, sums) map a tangent through the same op without bias; nonlinear ops (SiLU, GELU, group/layer/pixel
# norm, softmax attention, sin/cos embeddings, clipping, dropout, products of two t-dependent factors as in
# adaptive modulation) use their derivative at the primal. Tangents never carry an autograd graph, so the
# backward pass costs exactly what a plain forward's backward costs.


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

    def __mul__(self, c):  # c: a number, a tensor without tangent, or a Dual (product rule)
        if isinstance(c, Dual):
            return Dual(self.p * c.p, self.d * _tan(c.p) + _tan(self.p) * c.d)
        return Dual(self.p * c, self.d * (_tan(c) if torch.is_tensor(c) else c))

    def __sub__(self, other):
        return self + other * -1

    def __truediv__(self, c):  # c: a number
        return Dual(self.p / c, self.d / c)

    def reshape(self, *shape):
        return Dual(self.p.reshape(*shape), self.d.reshape(*shape))

    def flip(self, dim):
        return Dual(self.p.flip(dim), self.d.flip(dim))

    def unbind(self, dim):
        return tuple(Dual(p, d) for p, d in zip(self.p.unbind(dim), self.d.unbind(dim)))

    def chunk(self, n, dim):
        return tuple(Dual(p, d) for p, d in zip(self.p.chunk(n, dim), self.d.chunk(n, dim)))

    def unsqueeze(self, dim):
        return Dual(self.p.unsqueeze(dim), self.d.unsqueeze(dim))


def lin(f, x):
    """Apply a linear map without bias (slicing, pooling, upsampling, ...) to a tensor or to both parts of a Dual."""
    return Dual(f(x.p), f(x.d)) if isinstance(x, Dual) else f(x)


def add(a, b):
    """a + b where only b may be a Dual (torch would not dispatch `Tensor + Dual` to Dual)."""
    return (as_dual(a) if isinstance(b, Dual) else a) + b


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
    # silu'(p) dp with silu'(p) = sigmoid(p) (1 + p (1 - sigmoid(p))): for an elementwise function the JVP equals the
    # VJP, so autograd's one-kernel backward computes it (five elementwise passes written out)
    return Dual(F.silu(x.p), torch.ops.aten.silu_backward(x.d, _tan(x.p)))


class _Rows:
    """A pass over rows `index` of an n-row batch (forward's rows=(index, n, masks)): its k-th dropout keeps rows
    `index` of masks[k], the k-th n-row mask, which the first pass of that batch to need it draws and appends."""

    def __init__(self, index, n, masks):
        self.index, self.n, self.masks, self.k = index, n, masks, 0

    def keep(self, x, p):
        if self.k == len(self.masks):  # drawn as a pass over all n rows draws it, so the RNG moves on alike
            full = torch.empty((self.n, *x.shape[1:]), device=x.device, dtype=torch.float32).bernoulli_(1 - p)
            self.masks.append(full.bool())
        mask = self.masks[self.k]
        self.k += 1
        if mask.shape[1:] != x.shape[1:]:
            raise ValueError(f"rows=: mask {self.k - 1} of this batch has shape {tuple(mask.shape)}, the pass needs "
                             f"{tuple(x.shape)}: passes sharing masks need the same dropout layers")
        return mask[self.index].float()  # (len(index), *x.shape[1:]), 0 or 1


_ROWS = None  # the _Rows of the running forward, if it was called with rows=


def _takes_rows(forward):
    """A net's forward with the call signature's rows= argument, which `dropout` reads from _ROWS during the pass."""
    def forward_on_rows(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None, rows=None):
        global _ROWS
        if rows is not None and len(rows[0]) != x.shape[0]:
            raise ValueError(f"rows=(index, n, masks) needs one index per row of x: got {len(rows[0])} for "
                             f"{x.shape[0]} rows")
        outer, _ROWS = _ROWS, None if rows is None else _Rows(*rows)
        try:
            return forward(self, x, t, r, y, aug, return_logvar, tangents)
        finally:
            _ROWS = outer
    return forward_on_rows


def dropout(x, p, training):
    """Dropout whose mask is drawn in fp32 whatever the activation dtype, so two passes under different
    precisions (fp32 JVP, bf16 grad pass) consume the RNG identically and share the mask (tests/test_meanflow.py,
    test_masks_shared_across_precisions_under_bf16). In a pass over some rows of a batch (rows=, `_Rows`) each row gets
    the mask a pass over the whole batch would give it, drawn once for all passes over that batch (tests/test_nets.py,
    test_passes_over_some_rows_share_the_whole_batch_masks)."""
    if not training or p == 0:
        return x
    if _ROWS is None:
        keep = torch.empty(x.shape, device=x.device, dtype=torch.float32).bernoulli_(1 - p)
    else:
        keep = _ROWS.keep(x, p)
    scale = keep / (1 - p)
    if isinstance(x, Dual):
        return Dual(x.p * scale.to(x.p.dtype), x.d * scale.to(x.d.dtype))
    return x * scale.to(x.dtype)


def gelu_tanh(x):
    """GELU, tanh approximation (DiT's MLP)."""
    if not isinstance(x, Dual):
        return F.gelu(x, approximate="tanh")
    # gelu'(p) dp by autograd's one-kernel backward (elementwise: JVP = VJP), as silu
    return Dual(F.gelu(x.p, approximate="tanh"), torch.ops.aten.gelu_backward(x.d, _tan(x.p), approximate="tanh"))


def _in_func_transform():
    """True inside torch.func transforms (jvp, grad, vmap). There the norms and attention run written out: the fused
    attention kernels have no forward-mode rule (tests/test_nets.py, test_fused_attention_has_no_forward_mode_rule),
    and the written-out ops are what a compiled torch.func.jvp traces (test_torch_compile_matches_eager).
    torch.compile reads this depth while tracing, so a compiled torch.func.jvp takes the written-out branch too."""
    return torch._C._functorch.get_dynamic_layer_stack_depth() > 0


def _fp32_stats(x):
    """x as it enters normalisation statistics: at least fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _norm_tangent(xp, d, mean, rstd):
    """Tangent of x_hat = (x - mean) rstd over the last dim, without a graph, from the mean and rstd the primal's
    kernel returned (no second pass of statistics over x): d x_hat = rstd (dx - mean(dx) - x_hat mean(x_hat dx))."""
    with torch.no_grad():
        mean, rstd = mean.detach(), rstd.detach()
        xc = _tan(xp) - mean  # x_hat / rstd; mean(x_hat dx) = rstd mean(xc dx), a batched dot product (no product tensor)
        mean_xc_d = (xc.unsqueeze(-2) @ d.unsqueeze(-1)).squeeze(-1) / d.shape[-1]
        return (d - d.mean(-1, keepdim=True)).mul_(rstd).sub_(xc.mul_(rstd**3 * mean_xc_d))


def layer_norm(x, eps=1e-6):
    """Layer norm over the last dim without affine (DiT), statistics in fp32."""
    xp = x.p if isinstance(x, Dual) else x
    xf = _fp32_stats(xp)
    if _in_func_transform():  # written out (a Dual never gets here: the fused path runs outside torch.func)
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xf - mean).square().mean(-1, keepdim=True) + eps)
        return ((xf - mean) * rstd).to(xp.dtype)
    with _fp32(xf):  # F.layer_norm's kernel, which also returns the mean and rstd the tangent needs
        out, mean, rstd = torch.native_layer_norm(xf, xf.shape[-1:], None, None, eps)
    out = out.to(xp.dtype)
    return Dual(out, _norm_tangent(xp, x.d, mean, rstd)) if isinstance(x, Dual) else out


def pixel_norm(x, dim=1, eps=1e-4):
    """EDM2's normalize(x, dim): x / (eps + rms over `dim`), in fp32, for activations (pixel norm, cosine attention)."""
    xp = x.p if isinstance(x, Dual) else x
    xf = xp.to(torch.promote_types(xp.dtype, torch.float32))
    n = math.sqrt(xf.shape[dim])
    norm = torch.linalg.vector_norm(xf, dim=dim, keepdim=True)
    s = eps + norm / n
    out = (xf / s).to(xp.dtype)
    if not isinstance(x, Dual):
        return out
    xf, norm, s, d = _tan(xf), norm.detach(), s.detach(), x.d
    ds = (xf * d).sum(dim, keepdim=True) / (norm * n)  # d rms = <x, dx> / (|x| sqrt(N))
    return Dual(out, d / s - xf * ds / (s * s))


def clamp(x, c):
    """Activation clipping (EDM2); zero derivative where clipped."""
    if not isinstance(x, Dual):
        return x.clamp(-c, c)
    return Dual(x.p.clamp(-c, c), x.d * ((x.p >= -c) & (x.p <= c)).to(x.d.dtype))


class SiLU(nn.Module):
    """SiLU as a module, for nn.Sequential key layouts (DiT's `adaLN_modulation.1`, `t_embedder.mlp.2`)."""

    def forward(self, x):
        return silu(x)


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
    """Group norm with statistics in fp32. The primal runs F.group_norm's kernel (torch.native_group_norm), which
    saves only x and two (B, G) statistics for backward and returns them; the fused tangent is computed from those
    statistics without a graph. Inside torch.func
    transforms it runs written out (see `_in_func_transform`)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def _written_out(self, x):
        xg = _fp32_stats(x).reshape(x.shape[0], self.num_groups, math.prod(x.shape[1:]) // self.num_groups)
        mean = xg.mean(dim=2, keepdim=True)
        var = (xg - mean).square().mean(dim=2, keepdim=True)
        x_hat = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = [1, -1] + [1] * (x.ndim - 2)
        return (x_hat * self.weight.reshape(shape) + self.bias.reshape(shape)).to(x.dtype)

    def _native(self, x):
        """(out, mean, rstd): F.group_norm's kernel, which also returns the (B, G) statistics the tangent needs."""
        xf = _fp32_stats(x)
        (B, C), G = xf.shape[:2], self.num_groups
        with _fp32(xf):
            out, mean, rstd = torch.native_group_norm(xf, self.weight.to(xf.dtype), self.bias.to(xf.dtype), B, C,
                                                      math.prod(xf.shape[2:]), G, self.eps)
        return out.to(x.dtype), mean, rstd

    def forward(self, x):
        if not isinstance(x, Dual):
            return self._written_out(x) if _in_func_transform() else self._native(x)[0]
        out, mean, rstd = self._native(x.p)
        (B, G), n = (x.d.shape[0], self.num_groups), math.prod(x.d.shape[1:]) // self.num_groups  # B may be 0
        d_hat = _norm_tangent(x.p.reshape(B, G, n), x.d.reshape(B, G, n), mean[..., None], rstd[..., None])
        shape = [1, -1] + [1] * (x.d.ndim - 2)
        return Dual(out, d_hat.reshape(x.d.shape) * _tan(self.weight).reshape(shape))


def attention(q, k, v):
    """Softmax attention per head. q, k, v: (B, heads, L, C) -> (B, heads, L, C), logits scaled by 1/sqrt(C).
    The primal runs F.scaled_dot_product_attention (flash / memory-efficient kernels: no (L, L) weights saved for
    backward). The fused tangent recomputes the weights without a graph; inside torch.func transforms, where the
    fused kernels have no forward-mode rule (tests/test_nets.py, test_fused_attention_has_no_forward_mode_rule), the
    attention runs written out."""
    scale = 1 / math.sqrt(q.shape[-1])
    if not isinstance(q, Dual):
        if _in_func_transform():
            w = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, heads, Lq, Lk)
            return w @ v
        return F.scaled_dot_product_attention(q, k, v)
    a = F.scaled_dot_product_attention(q.p, k.p, v.p)
    with torch.no_grad(), _fp32(q.d):
        qp, kp, vp = _tan(q.p), _tan(k.p), _tan(v.p)
        w = (qp @ kp.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, heads, Lq, Lk), no graph
        d_logits = (q.d @ kp.transpose(-1, -2) + qp @ k.d.transpose(-1, -2)) * scale
        d_w = w * (d_logits - (w * d_logits).sum(dim=-1, keepdim=True))  # softmax JVP
        d_a = d_w @ vp + w @ v.d
    return Dual(a, d_a)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(f t), sin(f t)], f_i = (1/max_positions)^(i / (n/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, t):
        tp = t.p if isinstance(t, Dual) else t
        half = self.num_channels // 2
        dtype = torch.promote_types(tp.dtype, torch.float32)  # fp32 at least, never cast down (EDM2's MPFourier: fp32)
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
    return emb.reshape(emb.shape[0], 2, emb.shape[1] // 2).flip(1).reshape(emb.shape)


# --- DDPM++ (EDM SongUNet) -------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=1, channels_per_head=None, dropout=0.0, skip_scale=math.sqrt(0.5), eps=1e-6,
                 resample_filter=(1, 1), resample_proj=True, adaptive_scale=False, init=None, init_zero=None,
                 init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        heads = out_channels // channels_per_head if channels_per_head else num_heads
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
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
        params = self.affine(emb).reshape(-1, self.affine.out_features, 1, 1)
        if self.adaptive_scale:  # ADM: scale-and-shift modulation; the scale depends on t (a Dual product)
            scale, shift = params.chunk(2, dim=1)
            x = silu(self.norm1(x) * (scale + 1) + shift)
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(dropout(x, self.dropout, self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            H = x.shape[2]
            # EDM's qkv channel layout is (heads, C / heads, 3)
            qkv = lin(lambda a: rearrange(a, "b (h c s) x y -> s b h (x y) c", h=self.num_heads, s=3),
                      self.qkv(self.norm2(x)))
            a = attention(*qkv.unbind(0))  # (B, heads, H * W, C / heads)
            a = lin(lambda a: rearrange(a, "b h (x y) c -> b (h c) x y", x=H), a)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def edm_unet_levels(in_channels, img_resolution, conv_channels, model_channels, channel_mult, num_blocks,
                    attn_resolutions, init, block_kwargs, attn_all_dec):
    """EDM's encoder/decoder layout with its key names, shared by SongUNet and DhariwalUNet: (enc, dec, channels out).
    Per level: a 3x3 input conv (level 0) or a down block, num_blocks blocks; decoder: two input blocks at the lowest
    resolution or an up block, num_blocks + 1 blocks taking the encoder skips. Attention at attn_resolutions in
    encoder blocks, and in every decoder block there (ADM, attn_all_dec) or only the last one (DDPM++)."""
    enc = nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = Conv2d(cout, conv_channels, 3, **init)
            cout = conv_channels
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
    skips = [block.out_channels for block in enc.values()]

    dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attn = res in attn_resolutions and (attn_all_dec or idx == num_blocks)
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
    return enc, dec, cout


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
        self.logvar_linear = Linear(cond_channels, 1, init_mode="kaiming_normal") if logvar else None  # of t (and r)

        self.enc, self.dec, cout = edm_unet_levels(in_channels, img_resolution, model_channels, model_channels, channel_mult,
                                                   num_blocks, attn_resolutions, init, block_kwargs, attn_all_dec=False)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    @_takes_rows
    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        _check_r(self, r)
        x, t, r = _with_tangents(x, t, r, tangents)
        noise_emb = self.map_noise(t)
        emb = _swap_halves(noise_emb)
        if self.use_r:
            r_emb = self.map_noise(r)
            emb = cat([emb, _swap_halves(r_emb)], dim=1)
            noise_emb = cat([noise_emb, r_emb], dim=1)  # the log-variance head's input: both times
        if self.map_label is not None:  # y=None: the zero label, whose map_label term is the bias
            y = _null_label(self, x) if y is None else y
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


def _null_label(net, x):
    """The all-zero label batch that y=None stands for."""
    xp = x.p if isinstance(x, Dual) else x
    return xp.new_zeros(xp.shape[0], net.label_dim)


def _logvar(head, noise_emb):
    """Log-variance head for learned adaptive loss weights (sCM; flow maps, one per (t, r)). A function of the time
    embeddings only: t's, and r's in nets built with use_r."""
    if head is None:
        raise ValueError("return_logvar=True needs a net built with logvar=True")
    out = head(noise_emb)
    return (out.p if isinstance(out, Dual) else out).reshape(-1)  # (B,); no tangent needed


# --- ADM (EDM DhariwalUNet) -------------------------------------------------------------------------------

class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol, arXiv:2105.05233v4) as re-implemented in EDM (NVlabs/edm `training/networks.py`,
    DhariwalUNet). Defaults are EDM's ImageNet-64
    configuration: 295,899,267 parameters with label_dim=1000 (augment_dim=0; EDM trained it without augmentation).
    Scale-and-shift modulation, GroupNorm eps 1e-5, skip scale 1, heads = C/64, resampling skips without projection.
    use_r: a second positional embedding of r is concatenated to that of t (as in SongUNet), so map_augment and
    map_layer0 see 2 x model_channels. channels_per_head is not an EDM argument (fixed to 64 there); tiny test
    nets lower it to keep several heads. y=None is the null label (map_label has no bias)."""

    def __init__(self, img_resolution=64, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, channels_per_head=64, use_r=False, logvar=False):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        cond_channels = model_channels * (2 if use_r else 1)
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                            skip_scale=1, eps=1e-5, resample_proj=False, adaptive_scale=True, init=init,
                            init_zero=init_zero, init_attn=init)
        self.img_resolution, self.img_channels, self.label_dim, self.use_r = img_resolution, in_channels, label_dim, use_r

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, cond_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(cond_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None
        self.logvar_linear = Linear(cond_channels, 1, init_mode="kaiming_normal") if logvar else None  # of t (and r)

        self.enc, self.dec, cout = edm_unet_levels(in_channels, img_resolution, model_channels * channel_mult[0],
                                                   model_channels, channel_mult, num_blocks, attn_resolutions, init,
                                                   block_kwargs, attn_all_dec=True)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    @_takes_rows
    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        _check_r(self, r)
        x, t, r = _with_tangents(x, t, r, tangents)
        noise_emb = self.map_noise(t)  # [cos, sin], no swap in ADM
        time_emb = cat([noise_emb, self.map_noise(r)], dim=1) if self.use_r else noise_emb
        emb = time_emb
        if self.map_augment is not None and aug is not None:
            emb = emb + self.map_augment(aug)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None and y is not None:
            emb = emb + self.map_label(y)  # ADM: the label enters after the MLP, unscaled
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(silu(self.out_norm(x)))
        if not return_logvar:
            return x
        return x, _logvar(self.logvar_linear, time_emb)


def _check_r(net, r):
    if (r is not None) != net.use_r:
        raise ValueError(f"this net was built with use_r={net.use_r} but got r={'None' if r is None else 'a tensor'}")


# --- MLP for point data ------------------------------------------------------------------------------------

class MLPBlock(nn.Module):
    def __init__(self, width, emb_channels, dropout):
        super().__init__()
        self.dropout = dropout
        self.affine = Linear(emb_channels, width, init_mode="xavier_uniform")
        self.fc0 = Linear(width, width, init_mode="xavier_uniform")
        self.fc1 = Linear(width, width, init_mode="xavier_uniform")  # not near zero: see MLP.fc_out

    def forward(self, x, emb):
        h = silu(self.fc0(silu(x + self.affine(emb))))
        return x + self.fc1(dropout(h, self.dropout, self.training))


class FourierFeatures(nn.Module):
    """[x, sin(2 pi x B), cos(2 pi x B)] with a fixed Gaussian B (dim, n), std `scale`: random Fourier features of the
    input (Tancik et al. 2020, arXiv:2006.10739, Sec. 6), so that a small MLP can fit thin, curved structure in a
    low-dimensional input. B is drawn from its own seeded generator: the other weights' init is unchanged."""

    def __init__(self, dim, num_freqs, scale):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * scale * torch.randn(dim, num_freqs, generator=g))

    def project(self, v, dtype):
        """v B as a broadcast product and a sum: elementwise ops, which autocast leaves in dtype."""
        return (v.to(dtype)[:, :, None] * self.freqs.to(dtype)).sum(1)

    def forward(self, x):
        xp = x.p if isinstance(x, Dual) else x
        dtype = torch.promote_types(xp.dtype, torch.float32)  # fp32 at least: bf16 phases of |arg| ~ 20 are off by ~0.1
        arg = self.project(xp, dtype)
        out = torch.cat([xp.to(dtype), arg.sin(), arg.cos()], dim=1)
        if not isinstance(x, Dual):
            return out
        d_arg, a = self.project(x.d, dtype), _tan(arg)
        return Dual(out, torch.cat([x.d.to(dtype), a.cos() * d_arg, -a.sin() * d_arg], dim=1))


class MLP(nn.Module):
    """Residual MLP with the same time/label conditioning as SongUNet, for N-D point data; with fourier > 0 its input
    is x and `fourier` random Fourier features of x (FourierFeatures)."""

    def __init__(self, dim=2, width=256, depth=4, time_channels=64, label_dim=0, dropout=0.0, use_r=False, logvar=False,
                 fourier=0, fourier_scale=1.0):
        super().__init__()
        self.dim, self.label_dim, self.use_r = dim, label_dim, use_r
        cond_channels = time_channels * (2 if use_r else 1)
        self.map_noise = PositionalEmbedding(time_channels, endpoint=True)
        self.map_label = Linear(label_dim, cond_channels, init_mode="xavier_uniform") if label_dim else None
        self.map_layer0 = Linear(cond_channels, width, init_mode="xavier_uniform")
        self.map_layer1 = Linear(width, width, init_mode="xavier_uniform")
        self.logvar_linear = Linear(cond_channels, 1) if logvar else None  # of t (and r)
        self.fourier = FourierFeatures(dim, fourier, fourier_scale) if fourier else None
        self.fc_in = Linear(dim + 2 * fourier, width, init_mode="xavier_uniform")
        self.blocks = nn.ModuleList([MLPBlock(width, width, dropout) for _ in range(depth)])
        # Not the image nets' near-zero inits of the residual branches' outputs (fc1) and of the output layer: on data
        # whose covariance is sigma_data^2 I (an isotropic cloud standardised to unit variance, sigma_data 1) c_skip x
        # is already the best linear denoiser, F = 0 is a saddle, and toy diffusion runs stayed there (loss 2.00, the
        # F = 0 value, for 4000 steps on 8 Gaussians, circles and arms_ring). Output init 0.1: circles still stuck;
        # output 1: 8 Gaussians 0.27; fc1 at plain Xavier and output 0.1: 0.10 / 0.24 / 0.23 (toy_suite.py ratios).
        self.fc_out = Linear(width, dim, init_mode="xavier_uniform", init_weight=0.1)

    @_takes_rows
    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        _check_r(self, r)
        x, t, r = _with_tangents(x, t, r, tangents)
        noise_emb = self.map_noise(t)
        time_emb = cat([noise_emb, self.map_noise(r)], dim=1) if self.use_r else noise_emb
        emb = time_emb
        if self.map_label is not None:  # y=None: the zero label, whose map_label term is the bias
            y = _null_label(self, x) if y is None else y
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        x = self.fc_in(x if self.fourier is None else self.fourier(x))
        for block in self.blocks:
            x = block(x, emb)
        x = self.fc_out(silu(x))
        if not return_logvar:
            return x
        return x, _logvar(self.logvar_linear, time_emb)


# --- EDM2 (magnitude-preserving UNet) ----------------------------------------------------------------------
# Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696v2, and its
# code, NVlabs/edm2 `training/networks_edm2.py` (MPFourier, MPConv, Block, UNet, Precond).
# Every layer preserves activation magnitudes in expectation: weights are used as normalize(w)/sqrt(fan_in) and
# sums/concatenations/SiLU are rescaled (mp_sum, mp_cat, mp_silu). No biases, no normalisation layers.

def mp_normalize(w, eps=1e-4):
    """EDM2's weight normalisation: each output row divided by eps + its RMS over the fan-in, in fp32."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    fan_in = w[0].numel()
    return w / (eps + torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True) / math.sqrt(fan_in))


def mp_silu(x):
    return silu(x) / 0.596  # EDM2 Eq. 81: unit magnitude for unit-variance inputs


def mp_sum(a, b, t=0.5):
    """EDM2 Eq. 88: lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    s = math.sqrt((1 - t) ** 2 + t ** 2)
    return add(a * ((1 - t) / s), b * (t / s))


def mp_cat(a, b, t=0.5):
    """EDM2 Eq. 103: channel concatenation that keeps the balance t between a and b and unit magnitude."""
    Na, Nb = a.shape[1], b.shape[1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=1)


class MPFourier(nn.Module):
    """sqrt(2) cos(freqs t + phases) with random frozen buffers (bandwidth 1), in fp32."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, t):
        tp = t.p if isinstance(t, Dual) else t
        dtype = torch.promote_types(tp.dtype, torch.float32)
        freqs = self.freqs.to(dtype)
        arg = tp.to(dtype).outer(freqs) + self.phases.to(dtype)  # (B, C)
        emb = arg.cos() * math.sqrt(2)
        if not isinstance(t, Dual):
            return emb
        return Dual(emb, -math.sqrt(2) * _tan(arg).sin() * t.d.to(dtype).outer(_tan(freqs)))


class MPConv(nn.Module):
    """Magnitude-preserving linear (kernel=()) or conv layer: weight used as normalize(w) * gain / sqrt(fan_in),
    computed in fp32 on every call. Deviation: EDM2 also writes normalize(w) into the weight in every training
    forward ("forced weight normalisation"); here that in-place write is EDM2UNet.normalize_weights_(), called by
    the training loop outside forward, so forward stays functional for torch.func.jvp and compile
    (tests/test_nets_imagenet.py: test_edm2_forward_writes_nothing_in_place,
    test_edm2_normalize_weights_keeps_the_function)."""

    def __init__(self, in_channels, out_channels, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def _apply_weight(self, x, w):
        w = w.to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

    def forward(self, x, gain=1):
        w = mp_normalize(self.weight) * (gain / math.sqrt(self.weight[0].numel()))
        if not isinstance(x, Dual):
            return self._apply_weight(x, w)
        out = self._apply_weight(x.p, w)
        with _fp32(x.d):
            return Dual(out, self._apply_weight(x.d, _tan(w)))


class EDM2Block(nn.Module):
    """EDM2 encoder/decoder block (EDM2 Fig. 21): optional 2x resampling, (enc) 1x1 skip conv + pixel norm,
    residual branch with scale-only modulation (1 + emb_gain Linear(emb)), mp_sum, optional cosine attention,
    clipping. Key names as EDM2 (conv_res0, emb_linear, conv_res1, conv_skip, attn_qkv, attn_proj, emb_gain)."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep", attention=False,
                 channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x, emb):
        # EDM2's [1, 1] resampling filter is 2x2 average pooling down and nearest-neighbour up (both linear).
        if self.resample_mode == "down":
            x = lin(lambda a: F.avg_pool2d(a, 2), x)
        elif self.resample_mode == "up":
            x = lin(lambda a: F.interpolate(a, scale_factor=2.0, mode="nearest"), x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C), depends on t
        y = mp_silu(y * c.reshape(-1, self.out_channels, 1, 1))
        y = self.conv_res1(dropout(y, self.dropout, self.training))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            H = x.shape[2]
            # EDM2's qkv channel layout is (heads, C / heads, 3)
            qkv = lin(lambda a: rearrange(a, "b (h c s) x y -> s b h (x y) c", h=self.num_heads, s=3), self.attn_qkv(x))
            q, k, v = pixel_norm(qkv, dim=-1).unbind(0)  # cosine attention: q, k, v normalised per head
            a = lin(lambda a: rearrange(a, "b h (x y) c -> b (h c) x y", x=H), attention(q, k, v))
            x = mp_sum(x, self.attn_proj(a), self.attn_balance)
        return clamp(x, self.clip_act) if self.clip_act is not None else x


class EDM2UNet(nn.Module):
    """EDM2's UNet with the log-variance head of its Precond (`logvar_fourier`, `logvar_linear`; NVlabs/edm2
    `training/networks_edm2.py`, UNet and Precond).
    Keys are the official `unet.*` keys without the `unet.` prefix. Defaults: EDM2-S (model_channels 192);
    XS/S/M/L/XL = 128/192/256/320/384. in_channels excludes the constant ones channel the net appends.
    y=None is the null label (a zero one-hot, as EDM2's Precond feeds). Dropout applies in blocks at the
    resolutions `dropout_res`: all of them by default, as in EDM2's own training; the consistency recipes pass
    (16, 8). logvar=False drops the head (EDM2 always has it).
    use_r (our decision; FastGen 34f30e8's fails: `EMD2UNet.forward` in `fastgen/networks/EDM2/network.py` reads
    `self.r_timestep`, which its `__init__` never sets): r gets its own MPFourier embedding and MPConv
    (`emb_fourier_r`, `emb_noise_r`), mp_sum-ed with the t embedding before the label; with logvar, the head reads
    mp_sum(logvar_fourier(t), logvar_fourier_r(r)) (a weight per (t, r), as the flow-map code's calc_weight).
    Training must call `normalize_weights_()` once after init and after every optimizer step (see MPConv)."""

    def __init__(self, img_resolution=64, in_channels=3, out_channels=3, label_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
                 attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5, dropout=0.0, dropout_res=None,
                 channels_per_head=64, logvar_channels=128, use_r=False, logvar=False):
        super().__init__()
        block_channels = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else block_channels[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(block_channels)
        self.img_resolution, self.img_channels, self.label_dim, self.use_r = img_resolution, in_channels, label_dim, use_r
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels)
        self.emb_label = MPConv(label_dim, emb_channels) if label_dim else None
        self.emb_fourier_r = MPFourier(noise_channels) if use_r else None
        self.emb_noise_r = MPConv(noise_channels, emb_channels) if use_r else None
        self.logvar_fourier = MPFourier(logvar_channels) if logvar else None
        self.logvar_fourier_r = MPFourier(logvar_channels) if logvar and use_r else None  # mp_sum-ed with t's
        self.logvar_linear = MPConv(logvar_channels, 1) if logvar else None

        def block(cin, cout, res, **kwargs):
            drop = dropout if dropout_res is None or res in dropout_res else 0.0
            return EDM2Block(cin, cout, emb_channels, channels_per_head=channels_per_head, dropout=drop, **kwargs)

        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # + the constant ones channel
        for level, channels in enumerate(block_channels):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="enc", attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(block_channels))):
            res = img_resolution >> level
            if level == len(block_channels) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="dec", attention=res in attn_resolutions)
        self.out_conv = MPConv(cout, out_channels, (3, 3))

    @torch.no_grad()
    def normalize_weights_(self):
        """Forced weight normalisation (EDM2 Eq. 66), in place: every MPConv weight w <- normalize(w). Call once after
        init and after every optimizer step (train.py: `getattr(net, "normalize_weights_", None)`). Forward
        normalises anyway, so the function changes only through normalize's eps, by a relative ~eps |1/rms(w) - 1|
        per layer: tiny after an optimizer step, ~1e-4 of the previous change on repeated calls."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.weight.copy_(mp_normalize(m.weight))

    @_takes_rows
    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        _check_r(self, r)
        x, t, r = _with_tangents(x, t, r, tangents)
        emb = self.emb_noise(self.emb_fourier(t))
        if self.use_r:
            emb = mp_sum(emb, self.emb_noise_r(self.emb_fourier_r(r)), 0.5)
        xp = x.p if isinstance(x, Dual) else x
        if self.emb_label is not None:
            y = _null_label(self, x) if y is None else y
            emb = mp_sum(emb, self.emb_label(y * math.sqrt(self.label_dim)), self.label_balance)
        emb = mp_silu(emb)
        x = cat([x, torch.ones_like(xp[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        if not return_logvar:
            return x
        if self.logvar_fourier is None:
            return x, _logvar(None, None)
        time_emb = self.logvar_fourier(t)
        if self.use_r:
            time_emb = mp_sum(time_emb, self.logvar_fourier_r(r), 0.5)
        return x, _logvar(self.logvar_linear, time_emb)


# --- DiT (adaLN-Zero transformer) ---------------------------------------------------------------------------
# Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748v2, and its code,
# facebookresearch/DiT `models.py` (DiT, DiTBlock, TimestepEmbedder, LabelEmbedder, FinalLayer). Keys as the official
# checkpoints.

def sincos_2d(dim, grid_size):
    """DiT's fixed 2-D position embedding (L, dim): the first half encodes the column, the second the row, each as
    [sin, cos] of position * 10000^(-k / (dim/4)); tokens in row-major order. Computed in float64."""
    omega = 1 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid_size, dtype=torch.float64)
    col, row = pos.repeat(grid_size), pos.repeat_interleave(grid_size)  # token i * grid + j: row i, column j

    def emb(p):
        arg = p.outer(omega)
        return torch.cat([arg.sin(), arg.cos()], dim=1)
    return torch.cat([emb(col), emb(row)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (B, L, D) (timm's PatchEmbed.proj: a strided conv with bias)."""

    def __init__(self, in_channels, hidden_size, patch_size):
        super().__init__()
        self.patch_size = patch_size
        fan = in_channels * patch_size ** 2
        shape = [hidden_size, in_channels, patch_size, patch_size]
        self.weight = nn.Parameter(weight_init(shape, "xavier_uniform", fan, hidden_size))  # DiT: as a Linear
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        if isinstance(x, Dual):
            out = self(x.p)
            with _fp32(x.d):
                d = F.conv2d(x.d, _tan(self.weight).to(x.d.dtype), stride=self.patch_size)
            return Dual(out, rearrange(d, "b d h w -> b (h w) d"))
        x = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), stride=self.patch_size)
        return rearrange(x, "b d h w -> b (h w) d")  # (B, L, D), tokens in row-major order


def modulate(x, shift, scale):
    return x * (scale + 1) + shift  # adaLN; scale and shift depend on t (Dual products)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        init = dict(init_mode="xavier_uniform")
        self.num_heads, self.dropout = num_heads, dropout
        self.attn = nn.ModuleDict(dict(qkv=Linear(hidden_size, 3 * hidden_size, **init),
                                       proj=Linear(hidden_size, hidden_size, **init)))
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.ModuleDict(dict(fc1=Linear(hidden_size, hidden, **init), fc2=Linear(hidden, hidden_size, **init)))
        self.adaLN_modulation = nn.Sequential(SiLU(), Linear(hidden_size, 6 * hidden_size, init_weight=0))  # adaLN-Zero

    def _attention(self, x):
        # timm's qkv layout is (3, heads, head_dim) along the features
        qkv = lin(lambda a: rearrange(a, "b l (s h c) -> s b h l c", s=3, h=self.num_heads), self.attn.qkv(x))
        a = lin(lambda a: rearrange(a, "b h l c -> b l (h c)"), attention(*qkv.unbind(0)))
        return self.attn.proj(a)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
        x = x + self._attention(modulate(layer_norm(x), shift1, scale1)) * gate1
        h = gelu_tanh(self.mlp.fc1(modulate(layer_norm(x), shift2, scale2)))
        # Deviation: optional dropout on the MLP hidden layer (timm's Mlp drop position); official DiT uses none.
        return x + self.mlp.fc2(dropout(h, self.dropout, self.training)) * gate2


class DiT(nn.Module):
    """DiT with adaLN-Zero, without timm. Defaults: DiT-XL/2 on 4x32x32 latents (675,129,632 parameters with
    label_dim=1000 and learn_sigma; B/2: depth 12, hidden 768, 12 heads, 130,512,416).
    label_dim is official DiT's num_classes; the table has label_dim + 1 rows, the last the null label, and y (one-hot,
    all-zero = null, None = all null) enters without integer casts: y @ table[:L] + (1 - sum y) table[L].
    learn_sigma (None: True without use_r, as the official checkpoints; False with use_r, as MeanFlow) doubles the
    output channels; the net returns only the first in_channels (the methods here need no learned variance).
    use_r (MeanFlow, arXiv:2505.13447v1; as FastGen 34f30e8 `fastgen/networks/DiT/network.py`, DiT.forward with
    time_cond_type "diff"): `r_embedder` embeds t - r and c = t_emb(t) + r_emb(t - r) + y_emb(y).
    t is used as given (no x1000). logvar: Linear(256 -> 1) on t's frequency embedding (with use_r, 512 -> 1 on those
    of t and t - r)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, label_dim=0, learn_sigma=None, dropout=0.0, freq_channels=256, use_r=False, logvar=False):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_r = input_size, in_channels, label_dim, use_r
        self.learn_sigma = (not use_r) if learn_sigma is None else learn_sigma
        self.patch_size = patch_size
        out_channels = in_channels * (2 if self.learn_sigma else 1)

        def embedder():  # DiT's TimestepEmbedder: 256-d [cos, sin] -> Linear -> SiLU -> Linear, weights N(0, 0.02)
            mlp = nn.Sequential(Linear(freq_channels, hidden_size), SiLU(), Linear(hidden_size, hidden_size))
            for i in (0, 2):
                nn.init.normal_(mlp[i].weight, std=0.02)
                nn.init.zeros_(mlp[i].bias)
            return nn.ModuleDict(dict(mlp=mlp))

        self.x_embedder = nn.ModuleDict(dict(proj=PatchEmbed(in_channels, hidden_size, patch_size)))
        self.time_freq = PositionalEmbedding(freq_channels)  # no parameters: exp(-ln(1e4) i / 128) = (1/1e4)^(i/128)
        self.t_embedder = embedder()
        self.r_embedder = embedder() if use_r else None
        self.y_embedder = None
        if label_dim:  # label_dim + 1 rows: the last is the null label
            self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(label_dim + 1, hidden_size)))
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid).float()[None], requires_grad=False)  # in the state dict
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final_layer = nn.ModuleDict(dict(
            linear=Linear(hidden_size, patch_size ** 2 * out_channels, init_weight=0),
            adaLN_modulation=nn.Sequential(SiLU(), Linear(hidden_size, 2 * hidden_size, init_weight=0))))
        head_in = freq_channels * (2 if use_r else 1)  # t's frequencies (and those of t - r)
        self.logvar_linear = Linear(head_in, 1, init_mode="kaiming_normal") if logvar else None

    def label_embedding(self, y, batch):
        """(B, D); y one-hot (B, L) or None, an all-zero row (or None) gives the null row table[L]."""
        table = self.y_embedder.embedding_table.weight
        if y is None:
            return table[self.label_dim].expand(batch, -1)
        y = y.to(table.dtype)
        return y @ table[:self.label_dim] + (1 - y.sum(1, keepdim=True)) * table[self.label_dim]

    @_takes_rows
    def forward(self, x, t, r=None, y=None, aug=None, return_logvar=False, tangents=None):
        _check_r(self, r)
        x, t, r = _with_tangents(x, t, r, tangents)
        B, C, H, W = x.shape
        x = self.x_embedder.proj(x) + self.pos_embed.to(x.p.dtype if isinstance(x, Dual) else x.dtype)  # (B, L, D)
        t_freq = self.time_freq(t)
        c = self.t_embedder.mlp(t_freq)
        if self.use_r:
            d_freq = self.time_freq(add(t, r * -1))  # embeds t - r
            c = add(c, self.r_embedder.mlp(d_freq))
            t_freq = cat([t_freq, d_freq], dim=1)  # the log-variance head's input: both times
        if self.y_embedder is not None:
            c = c + self.label_embedding(y, B)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=2)
        x = self.final_layer.linear(modulate(layer_norm(x), shift, scale))  # (B, L, p * p * C_out)
        p = self.patch_size
        x = lin(lambda a: rearrange(a, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)[:, :C], x)
        if not return_logvar:
            return x
        return x, _logvar(self.logvar_linear, t_freq)


# --- Registry ------------------------------------------------------------------------------------------------
# name -> (class, default kwargs). train.py adds resolution/channels/dim, label_dim, use_r, dropout. The "-tiny"
# variants are few-MB nets for CPU tests and smoke runs that take the same code paths (multi-head attention included).

NETS = {
    "ddpmpp": (SongUNet, dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))),
    "ddpmpp-tiny": (SongUNet, dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))),
    "adm": (DhariwalUNet, dict()),  # EDM's ImageNet-64 ADM
    "adm-tiny": (DhariwalUNet, dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                                    channels_per_head=8)),
    # EDM2 ImageNet-64 sizes (XXL, 448, is EDM2's ImageNet-512 latent preset); dropout at every resolution unless
    # dropout_res says otherwise (the CM/TCM presets: 16x16 and 8x8)
    **{f"edm2-{size}": (EDM2UNet, dict(model_channels=c))
       for size, c in dict(xs=128, s=192, m=256, l=320, xl=384, xxl=448).items()},
    "edm2-tiny": (EDM2UNet, dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                                 channels_per_head=8, dropout_res=(8,))),
    "dit-b2": (DiT, dict(hidden_size=768, depth=12, num_heads=12, patch_size=2)),
    "dit-l2": (DiT, dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2)),
    "dit-xl2": (DiT, dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)),
    "dit-tiny": (DiT, dict(hidden_size=32, depth=2, num_heads=4, patch_size=2)),
    "mlp": (MLP, dict(width=256, depth=4)),
    "mlp-small": (MLP, dict(width=128, depth=4)),  # ~1/4 of mlp's FLOPs per point: 4x the batch in the same time
    # with 64 random Fourier features of the input (FourierFeatures): the toy presets' nets
    "mlp-fourier": (MLP, dict(width=256, depth=4, fourier=64, fourier_scale=1.0)),
    "mlp-small-fourier": (MLP, dict(width=128, depth=4, fourier=64, fourier_scale=1.0)),
}


def build_net(name, shape, label_dim=0, use_r=False, logvar=False, **overrides):
    """Build a registered net for data of `shape` (C, H, W) or (D,). UNets need H = W divisible by 2^(levels - 1);
    DiT needs H = W divisible by the patch size (latents 4x32x32 -> input_size 32, in_channels 4)."""
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
    C, H = shape[0], shape[1]
    if cls is DiT:
        if H % kwargs["patch_size"]:
            raise ValueError(f"net {name!r} needs H divisible by its patch size {kwargs['patch_size']}; got H = {H}")
        return cls(input_size=H, in_channels=C, **kwargs)
    levels = len(kwargs.get("channel_mult", inspect.signature(cls).parameters["channel_mult"].default))
    if H % 2 ** (levels - 1):
        raise ValueError(f"net {name!r} halves the resolution {levels - 1} times: H must be divisible by "
                         f"{2 ** (levels - 1)}; got H = {H}")
    return cls(img_resolution=H, in_channels=C, out_channels=C, **kwargs)
