"""nets.py: official configurations and key names, JVP == finite difference (float64) for torch.func.jvp and
for the fused tangent path, and the fused path's contract (same primal, same gradient, no graph, fp32)."""
import pytest
import torch
from torch.func import jvp

import nets
from conftest import randomize_

TINY = dict(ddpmpp=("ddpmpp-tiny", (3, 16, 16)), mlp=("mlp", (3,)), adm=("adm-tiny", (3, 16, 16)),
            edm2=("edm2-tiny", (3, 16, 16)), dit=("dit-tiny", (4, 8, 8)), mlp_fourier=("mlp-small-fourier", (3,)))


def tiny_net(kind, seed=0, dropout=0.2, label_dim=4):
    name, shape = TINY[kind]
    torch.manual_seed(seed)
    net = nets.build_net(name, shape, label_dim=label_dim, use_r=True, dropout=dropout)
    return randomize_(net.double(), seed), shape


def inputs(shape, B=3, seed=1, label_dim=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(B, generator=g, dtype=torch.float64)
    r = t * torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(B) % label_dim, label_dim).double()
    y[0] = 0  # one null label
    return x, t, r, y


def central_difference(f, primals, tangents, h=1e-6):
    """(f(p + h d) - f(p - h d)) / 2h with the same dropout masks for both evaluations."""
    with torch.random.fork_rng():
        plus = f(*[p + h * d for p, d in zip(primals, tangents)])
    with torch.random.fork_rng():
        minus = f(*[p - h * d for p, d in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


# --- Official configurations ----------------------------------------------------------------------------------

def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_ddpmpp_cifar10_parameter_counts_and_keys():
    """EDM's DDPM++ CIFAR-10 checkpoint layout (edm-cifar10-32x32-uncond-vp.pkl; NVlabs/edm `training/networks.py`,
    SongUNet): the parameter count follows from the shapes."""
    with torch.device("meta"):  # shapes only, nothing allocated
        net = nets.SongUNet(augment_dim=9)
    sd = net.state_dict()
    assert n_params(net) == 55_733_891
    assert len(sd) == 425  # 417 parameter tensors + 8 resample filters
    assert sum("resample_filter" in k for k in sd) == 8
    expected_shapes = {
        "map_augment.weight": (128, 9), "map_layer0.weight": (512, 128), "map_layer1.weight": (512, 512),
        "enc.32x32_conv.weight": (128, 3, 3, 3), "enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "enc.32x32_block0.skip.weight": (256, 128, 1, 1), "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.16x16_block0.qkv.weight": (768, 256, 1, 1), "dec.8x8_in0.proj.weight": (256, 256, 1, 1),
        "dec.16x16_block4.norm2.weight": (256,), "dec.32x32_aux_norm.weight": (256,),
        "dec.32x32_aux_conv.weight": (3, 256, 3, 3), "dec.32x32_up.skip.resample_filter": (1, 1, 2, 2),
    }
    for k, shape in expected_shapes.items():
        assert tuple(sd[k].shape) == shape, k
    attention_blocks = [n for n, m in net.named_modules() if isinstance(m, nets.UNetBlock) and m.num_heads]
    assert sorted(attention_blocks) == sorted(
        ["enc.16x16_block0", "enc.16x16_block1", "enc.16x16_block2", "enc.16x16_block3", "dec.16x16_block4", "dec.8x8_in0"])


@pytest.mark.parametrize("kwargs, count", [
    (dict(augment_dim=9, logvar=True), 55_734_020),      # CM/sCM/TCM student with log-variance head
    (dict(augment_dim=9, label_dim=10), 55_735_299),     # conditional
    (dict(augment_dim=0), 55_732_739),                   # no augment mapping
    (dict(augment_dim=6, use_r=True), 55_799_811),       # MeanFlow CIFAR-10
])
def test_ddpmpp_variant_parameter_counts(kwargs, count):
    with torch.device("meta"):
        assert n_params(nets.SongUNet(**kwargs)) == count


# --- JVP correctness -------------------------------------------------------------------------------------------

DIRECTIONS = dict(x=(1, 0, 0), t=(0, 1, 0), r=(0, 0, 1), all=(1, 1, 1))


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_jvp_matches_central_difference(kind, direction):
    """torch.func.jvp and the fused tangent path both equal a float64 central difference, in train mode with
    dropout (masks replayed), along tangents in x, t, r and all three."""
    net, shape = tiny_net(kind)
    net.train()
    x, t, r, y = inputs(shape)
    g = torch.Generator().manual_seed(2)
    cx, ct, cr = DIRECTIONS[direction]
    dx = cx * torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = ct * (0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
    dr = cr * (0.5 + torch.rand(r.shape, generator=g, dtype=torch.float64))

    def f(x_, t_, r_):
        return net(x_, t_, r_, y)

    fd = central_difference(f, (x, t, r), (dx, dt, dr))
    with torch.random.fork_rng():
        out_func, d_func = jvp(f, (x, t, r), (dx, dt, dr))
    with torch.random.fork_rng():
        out_fused, d_fused = net(x, t, r, y, tangents=(dx, dt, dr))
    scale = fd.abs().max().item()
    assert scale > 1e-3, "derivative too small for a meaningful test"
    torch.testing.assert_close(d_func, fd, rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(d_fused, d_func, rtol=0, atol=1e-10 * scale)
    # Two code paths (functorch's decompositions vs ours): equal up to float64 rounding, not bitwise on every CPU
    # (BLAS blocking differs by ISA; 1.8e-13 relative seen on AVX-512). 1e-12 x scale leaves ~10x margin.
    out_scale = out_func.abs().max().item()
    torch.testing.assert_close(out_fused, out_func, rtol=0, atol=1e-12 * out_scale)


@pytest.mark.parametrize("kind", list(TINY))
def test_fused_path_contract(kind):
    """Fused pass: primal identical to a plain forward (same masks), its gradient identical to the plain
    forward's, and the tangent carries no autograd graph."""
    net, shape = tiny_net(kind)
    net.train()
    x, t, r, y = inputs(shape)
    with torch.random.fork_rng():
        plain = net(x, t, r, y)
    params = [p for p in net.parameters() if p.requires_grad]  # DiT's pos_embed is frozen
    grads_plain = torch.autograd.grad(plain.square().sum(), params)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    tangents = (dx, torch.ones_like(t), torch.zeros_like(r))
    with torch.random.fork_rng():
        out, d_out = net(x, t, r, y, tangents=tangents)
    assert torch.equal(out, plain)
    assert out.requires_grad and not d_out.requires_grad and d_out.grad_fn is None
    grads_fused = torch.autograd.grad(out.square().sum(), params)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", list(TINY))
def test_y_none_is_the_null_label(kind):
    """y=None on a conditional net means the all-zero label, as EDM's and EDM2's Precond feed it: for DDPM++ and the
    MLP that includes map_label's bias. Same on the fused tangent path."""
    net, shape = tiny_net(kind)
    net.eval()
    x, t, r, y = inputs(shape)
    null = torch.zeros_like(y)
    tangents = (torch.ones_like(x), torch.ones_like(t), torch.zeros_like(r))
    assert torch.equal(net(x, t, r), net(x, t, r, null))
    out, d_out = net(x, t, r, tangents=tangents)
    out_null, d_null = net(x, t, r, null, tangents=tangents)
    assert torch.equal(out, out_null) and torch.equal(d_out, d_null)
    assert not torch.allclose(net(x, t, r, y), out)  # guard: the labels do matter


def saved_for_backward(fn, *args):
    """Sizes (numel) of the tensors autograd saves while fn(*args) runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sizes


def test_norms_and_attention_run_native_kernels_outside_torch_func():
    """Outside torch.func the primal goes through the native kernels: group/layer norm save their input and per-group
    statistics, never a second full-size tensor; attention saves nothing of (L, L) size. The written-out forms
    (taken inside torch.func) would save both."""
    B, C, L, heads = 2, 16, 64, 2
    x = torch.randn(B, C, 8, 8, dtype=torch.float64, requires_grad=True)
    gn = nets.GroupNorm(C).double()
    assert sorted(saved_for_backward(gn, x))[-2] < x.numel()  # x itself, then statistics of (B, G) size
    tokens = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    assert sorted(saved_for_backward(nets.layer_norm, tokens))[-2] < tokens.numel()
    q, k, v = torch.randn(3, B, heads, L, C // heads, dtype=torch.float64, requires_grad=True).unbind(0)
    assert max(saved_for_backward(nets.attention, q, k, v)) < B * heads * L * L
    assert not nets._in_func_transform()
    assert jvp(lambda a: torch.tensor(nets._in_func_transform()), (x,), (x,))[0]


def test_fused_attention_has_no_forward_mode_rule():
    """Why nets.attention runs written out inside torch.func: the fused SDPA kernel has no forward-mode rule (torch
    2.13, CPU: its flash kernel), while the written-out form nets.attention takes there gives autograd's JVP. If torch
    gains the rule, this test fails and the written-out branch can be reconsidered."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 16, 8, generator=g).unbind(0)
    dq = torch.randn(q.shape, generator=g)
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(lambda q_: torch.nn.functional.scaled_dot_product_attention(q_, k, v), (q,), (dq,))
    out, d_out = jvp(lambda q_: nets.attention(q_, k, v), (q,), (dq,))
    ref, d_ref = torch.autograd.functional.jvp(lambda q_: (q_ @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v,
                                               (q,), (dq,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(d_out, d_ref)


def test_dropout_masks_differ_without_replay():
    """Guards the test above: without RNG replay the two passes really would differ."""
    net, shape = tiny_net("mlp", dropout=0.5)
    net.train()
    x, t, r, y = inputs(shape)
    assert not torch.allclose(net(x, t, r, y), net(x, t, r, y))


@pytest.mark.parametrize("kind", list(TINY))
def test_passes_over_some_rows_share_the_whole_batch_masks(kind):
    """net(x[rows], ..., rows=(rows, B, masks)) gives each row the dropout mask (and so the output, fused tangent
    included) that a pass over all B rows gives it. The first such pass draws the masks into `masks`, moving the RNG as
    that pass would; a second one over other rows reads them and draws nothing. Dropout 0.5; the outputs are different
    computations (smaller batches), so equal to 1e-12 x their scale in float64."""
    net, shape = tiny_net(kind, dropout=0.5)
    net.train()
    x, t, r, y = inputs(shape, B=5)
    tangents = (torch.ones_like(x), torch.ones_like(t), torch.zeros_like(r))
    torch.manual_seed(7)
    whole, d_whole = net(x, t, r, y, tangents=tangents)
    after_whole = torch.rand(4)
    masks = []
    for rows, draws in ((torch.tensor([3, 0, 4]), True), (torch.tensor([1, 2]), False)):
        torch.manual_seed(7)
        some, d_some = net(x[rows], t[rows], r[rows], y[rows], tangents=[a[rows] for a in tangents],
                           rows=(rows, 5, masks))
        assert torch.equal(torch.rand(4), after_whole) == draws
        assert nets.dropout(torch.ones(2, 3), 0.5, True).shape == (2, 3)  # rows= held for that pass only
        torch.testing.assert_close(some, whole[rows], rtol=0, atol=1e-12 * whole.abs().max().item())
        torch.testing.assert_close(d_some, d_whole[rows], rtol=0, atol=1e-12 * d_whole.abs().max().item())
    assert masks and all(m.shape[0] == 5 for m in masks)
    torch.manual_seed(7)
    assert not torch.allclose(net(x[rows], t[rows], r[rows], y[rows]), whole[rows])  # guard: without rows= they differ
    with pytest.raises(ValueError, match="one index per row"):
        net(x, t, r, y, rows=(rows, 5, []))


@pytest.mark.parametrize("kind", ["ddpmpp", "edm2", "dit"])
def test_fused_tangent_is_fp32_under_bf16_autocast(kind):
    """Under bf16 autocast the primal runs in bf16 but the tangent stays fp32 and close to an fp32 JVP."""
    torch.manual_seed(0)
    name, shape = TINY[kind]
    net = randomize_(nets.build_net(name, shape, use_r=True, dropout=0.0)).eval()
    x, t, r, _ = (a.float() for a in inputs(shape))
    dx = torch.randn_like(x)
    _, d_ref = jvp(lambda x_: net(x_, t, r), (x,), (dx,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, d_out = net(x, t, r, tangents=(dx, None, None))
    assert out.dtype == torch.bfloat16 and d_out.dtype == torch.float32
    assert (d_out - d_ref).norm() / d_ref.norm() < 0.05  # linearised around a bf16 primal


@pytest.mark.parametrize("name, shape", [("mlp", (2,)), ("ddpmpp-tiny", (3, 16, 16)), ("adm-tiny", (3, 16, 16)),
                                         ("edm2-tiny", (3, 16, 16)), ("dit-tiny", (4, 8, 8))])
def test_logvar_of_a_two_time_net_is_a_function_of_t_and_r(name, shape):
    """With use_r the log-variance head (flowmap.py's learned weight w(t, r)) sees both times: it changes with r and
    with t, not with x or the label, and the tangent pass returns the same value (to 1e-12)."""
    torch.manual_seed(0)
    net = nets.build_net(name, shape, label_dim=3, use_r=True, logvar=True).double().eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    r, y = 0.5 * t, torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    w = net(x, t, r, y, return_logvar=True)[1]
    assert w.shape == (4,)
    torch.testing.assert_close(net(2 * x + 1, t, r, y.flip(0), return_logvar=True)[1], w, rtol=1e-12, atol=1e-12)
    assert (net(x, t, 0.1 * t, y, return_logvar=True)[1] - w).abs().min() > 1e-6
    assert (net(x, 0.8 * t, r, y, return_logvar=True)[1] - w).abs().min() > 1e-6
    tangents = (torch.randn_like(x), torch.ones_like(t), torch.ones_like(r))
    torch.testing.assert_close(net(x, t, r, y, tangents=tangents, return_logvar=True)[1], w, rtol=1e-12, atol=1e-12)


def test_float64_forward_and_logvar():
    torch.manual_seed(0)
    net = nets.build_net("ddpmpp-tiny", (3, 16, 16), logvar=True).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, logvar = net(x, torch.tensor([0.1, -0.5], dtype=torch.float64), return_logvar=True)
    assert out.dtype == torch.float64 and out.shape == x.shape and logvar.shape == (2,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope", shape=(2,)), "unknown net"),
    (dict(name="mlp", shape=(3, 8, 8)), "point data"),
    (dict(name="ddpmpp-tiny", shape=(5,)), "square images"),
])
def test_build_net_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nets.build_net(**kwargs)


def test_r_input_must_match_construction():
    net = nets.build_net("mlp", (2,), use_r=False)
    with pytest.raises(ValueError, match="use_r"):
        net(torch.randn(2, 2), torch.rand(2), torch.rand(2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TINY))
def test_torch_compile_matches_eager(kind):
    """torch.compile (fullgraph, static shapes) traces the plain forward, the fused tangent path and
    torch.func.jvp, and gives the eager values (values, not only tracing: a compiled transform that dropped a rule
    would still run)."""
    torch.manual_seed(0)
    name, shape = TINY[kind]
    net = randomize_(nets.build_net(name, shape, use_r=True, dropout=0.0)).eval()
    x, t, r, _ = (a.float() for a in inputs(shape))
    v = torch.randn_like(x)

    def fused(x, t, r, v):
        return net(x, t, r, tangents=(v, torch.ones_like(t), torch.zeros_like(r)))

    def func_jvp(x, t, r, v):
        def u(x_, t_):
            return net(x_, t_, r)
        return jvp(u, (x, t), (v, torch.ones_like(t)))

    for fn in (fused, func_jvp):
        eager = fn(x, t, r, v)
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)(x, t, r, v)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("kind", TINY)
def test_a_pass_over_no_rows_runs(kind):
    """A batch of 0 rows (a routed pass with nothing to do still runs under FSDP, where forward is collective): the
    plain, rows= and fused-tangent passes return empty outputs of the right shape, and draw the masks a pass over the
    whole batch would."""
    net = tiny_net(kind)[0].train()
    x, t, r, y = (v[:0] for v in inputs(TINY[kind][1]))
    assert net(x, t, r, y).shape == x.shape
    masks = []
    assert net(x, t, r, y, rows=(torch.zeros(0, dtype=torch.long), 5, masks)).shape == x.shape
    assert all(m.shape[0] == 5 for m in masks) and len(masks) > 0
    out, d_out = net(x, t, r, y, tangents=(x, torch.ones_like(t), torch.zeros_like(r)))
    assert out.shape == d_out.shape == x.shape


def test_fourier_features_are_x_then_sines_and_cosines_of_a_fixed_projection():
    """FourierFeatures: [x, sin(x B), cos(x B)], B = 2 pi scale N(0, 1) from its own seeded generator (the same B in
    every build, whatever the global seed, and the other weights drawn as without it), phases in fp32 under bf16
    autocast; an MLP without features keeps its input layer's shape (old checkpoints load)."""
    torch.manual_seed(1)
    a = nets.build_net("mlp-fourier", (2,))
    torch.manual_seed(2)
    b = nets.build_net("mlp-small-fourier", (2,))
    torch.testing.assert_close(a.fourier.freqs, b.fourier.freqs, rtol=0, atol=0)
    freqs = a.fourier.freqs.double()
    assert freqs.shape == (2, 64) and 0.8 < freqs.std().item() / (2 * torch.pi) < 1.2
    x = torch.randn(5, 2, dtype=torch.float64)
    arg = x @ freqs
    torch.testing.assert_close(a.double().fourier(x), torch.cat([x, arg.sin(), arg.cos()], 1), rtol=1e-12, atol=1e-12)
    plain, fourier = nets.build_net("mlp", (2,)), nets.build_net("mlp-fourier", (2,), fourier_scale=2.0)
    assert plain.fc_in.weight.shape == (256, 2) and fourier.fc_in.weight.shape == (256, 2 + 128)
    torch.testing.assert_close(fourier.fourier.freqs.double(), 2 * freqs)  # scale multiplies B
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = a.float().fourier(x.float())
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats.double(), a.double().fourier(x), rtol=0, atol=1e-5)
