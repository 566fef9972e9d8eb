"""tcm.py: the truncated log-Student-t distribution, the exact boundary set, routing between the frozen stage-1 net
and the student (with shared dropout masks), the loss mix, and 2-D quality on top of a CM run."""
import math

import pytest
import torch

import cm
import nets
import tcm
from conftest import posterior_mean_by_definition, randomize_, sliced_wasserstein, train_toy


def test_log_student_t_quantiles_match_the_reference():
    """For nu = 0.01, mu = 0, s = 0.2 on [1, 80] the 10/25/50/75/90 % quantiles are 1.013 / 1.043 / 1.22 / 2.53 /
    10.5 (scipy.stats.t, which FastGen's sampler inverts, gives 1.0127 / 1.0430 / 1.2211 / 2.5235 / 10.444). Tolerance
    2 %."""
    s = tcm.sample_sigma_student_t(200_000, tcm.Config(), torch.Generator().manual_seed(0), "cpu")
    assert s.dtype == torch.float64 and s.min() >= 1 and s.max() <= 80
    q = torch.quantile(s[:100_000], torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    for got, want in zip(q, [1.013, 1.043, 1.22, 2.53, 10.5]):
        assert abs(got - want) / want < 0.02, (got, want)


@pytest.mark.parametrize("n, exact", [(16, 4), (128, 32), (7, 1)])
def test_boundary_set_size_is_exact(n, exact):
    for seed in range(5):
        mask = tcm.boundary_mask(n, tcm.Config(), torch.Generator().manual_seed(seed), "cpu")
        assert int(mask.sum()) == exact == math.floor(0.25 * n)


def test_boundary_set_falls_back_to_bernoulli_for_tiny_batches():
    g = torch.Generator().manual_seed(0)
    counts = [int(tcm.boundary_mask(3, tcm.Config(), g, "cpu").sum()) for _ in range(2000)]
    assert abs(sum(counts) / (3 * 2000) - 0.25) < 0.02


def two_nets(dropout=0.5):
    torch.manual_seed(0)
    student = randomize_(nets.build_net("mlp", (3,), dropout=dropout).double(), seed=1).train()
    stage1 = randomize_(nets.build_net("mlp", (3,), dropout=dropout).double(), seed=2).train()
    return student, stage1


def test_routing_below_and_above_the_transition():
    """Rows with sigma < transition_sigma come from the frozen stage-1 net, the others from the student; both passes
    use the masks the next (gradient) pass will draw."""
    student, stage1 = two_nets()
    cfg = tcm.Config()
    x = torch.randn(8, 3, dtype=torch.float64)
    sigma = torch.tensor([0.5, 0.99, 1.0, 1.5, 0.2, 3.0, 80.0, 0.999999], dtype=torch.float64)
    torch.manual_seed(7)
    routed = tcm.route(student, stage1, x, sigma, None, cfg)
    torch.manual_seed(7)
    with torch.random.fork_rng():
        low = cm.consistency_fn(stage1, x, sigma, None, cfg)
    high = cm.consistency_fn(student, x, sigma, None, cfg)  # consumes the RNG like the gradient pass would
    is_student = sigma >= 1.0
    assert torch.equal(routed[is_student], high[is_student]) and torch.equal(routed[~is_student], low[~is_student])
    assert not torch.equal(low, high)
    torch.manual_seed(7)
    all_low = tcm.route(student, stage1, x, sigma * 0 + 0.5, None, cfg)  # nothing above: the student is not run
    torch.manual_seed(7)
    assert torch.equal(all_low, cm.consistency_fn(stage1, x, sigma * 0 + 0.5, None, cfg))


def record_passes(**named_nets):
    """name -> list of (rows the pass sees or None for all, grad enabled) per forward of that net."""
    passes = {name: [] for name in named_nets}
    for name, net in named_nets.items():
        def hook(module, args, kwargs, name=name):
            rows = kwargs.get("rows")
            passes[name].append((None if rows is None else rows[0].tolist(), torch.is_grad_enabled()))
        net.register_forward_pre_hook(hook, with_kwargs=True)
    return passes


def whole_batch_route(student, stage1, x, sigma, y, cfg):
    """FastGen TCM.py, TCMPrecond.forward: both nets on the whole batch from one RNG state, merged per sample."""
    with torch.random.fork_rng():
        low = cm.consistency_fn(stage1, x, sigma, y, cfg)
    with torch.random.fork_rng():
        high = cm.consistency_fn(student, x, sigma, y, cfg)
    return torch.where((sigma >= cfg.transition_sigma)[:, None], high, low)


def test_each_net_runs_on_its_own_rows():
    """route runs the stage-1 net only on the rows below the transition and the student only on the others, one pass
    each (none for the stage-1 net when it owns no row, a pass over no rows for the student), with the labels and
    dropout masks of the whole-batch routing (drawn once):
    equal to it in float64 (dropout 0.5; a smaller batch is a different computation, hence 1e-12 relative), and it
    leaves the RNG where the gradient pass starts."""
    torch.manual_seed(0)
    student, stage1 = (randomize_(nets.build_net("mlp", (3,), label_dim=4, dropout=0.5).double(), seed=s).train()
                       for s in (1, 2))
    passes = record_passes(student=student, stage1=stage1)
    masks_before = []  # how many of the batch's masks exist when each routed pass starts

    def count_masks(module, args, kwargs):
        if "rows" in kwargs:
            masks_before.append(len(kwargs["rows"][2]))
    for net in (stage1, student):
        net.register_forward_pre_hook(count_masks, with_kwargs=True)
    cfg = tcm.Config()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).double()
    sigma = torch.tensor([0.5, 1.5, 1.0, 0.99, 0.2, 3.0, 80.0, 0.999999], dtype=torch.float64)
    torch.manual_seed(7)
    with torch.no_grad():
        routed = tcm.route(student, stage1, x, sigma, y, cfg)
    after = torch.rand(3)
    assert passes == dict(stage1=[([0, 3, 4, 7], False)], student=[([1, 2, 5, 6], False)])
    assert masks_before == [0, 4]  # the second pass reads the 4 masks (one per MLP block) the first one drew
    torch.manual_seed(7)
    want = whole_batch_route(student, stage1, x, sigma, y, cfg)
    assert torch.equal(torch.rand(3), after)
    torch.testing.assert_close(routed, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
    for sigma_all, ran, idle in ((sigma * 0 + 2, "student", "stage1"), (sigma * 0 + 0.5, "stage1", "student")):
        for p in passes.values():
            p.clear()
        torch.manual_seed(7)
        with torch.no_grad():
            routed = tcm.route(student, stage1, x, sigma_all, y, cfg)
        # the student runs even on no rows: under FSDP its forward is collective (every rank must call it)
        assert passes[ran] == [(list(range(8)), False)] and passes[idle] == ([([], False)] if idle == "student" else [])
        torch.manual_seed(7)
        assert torch.equal(routed, whole_batch_route(student, stage1, x, sigma_all, y, cfg))


def test_loss_and_gradient_equal_the_whole_batch_routing(monkeypatch):
    """tcm.loss with dropout 0.5 (float64): per-example loss and gradient as with FastGen's whole-batch routing, from one
    no-grad pass over each row and one gradient pass over the batch. Tolerance 1e-12 relative (smaller batches)."""
    student, stage1 = two_nets()
    passes = record_passes(student=student, stage1=stage1)
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for route in (tcm.route, whole_batch_route):
        monkeypatch.setattr(tcm, "route", route)
        torch.manual_seed(5)
        gen = torch.Generator().manual_seed(3)
        per_example, logs = tcm.loss(student, x, None, tcm.Config(), 1, gen, teacher=stage1)
        results.append((per_example, torch.autograd.grad(per_example.mean(), list(student.parameters()))))
        if len(results) == 1:
            r = logs["t"] - logs["gap"]
            low, high = (r < 1).nonzero()[:, 0].tolist(), (r >= 1).nonzero()[:, 0].tolist()
            assert low and high and passes == dict(stage1=[(low, False)], student=[(high, False), (None, True)])
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())


def test_loss_mixes_boundary_and_interior_means():
    """mean(per_example) = mean over interior samples of w l + boundary_weight * mean over boundary samples; boundary
    samples sit at transition_sigma and take their target from the stage-1 net."""
    student, stage1 = two_nets(dropout=0.0)
    x = torch.randn(64, 3, dtype=torch.float64)
    losses = {}
    for w_b in (0.0, 0.1, 1.0):
        per_example, logs = tcm.loss(student, x, None, tcm.Config(boundary_weight=w_b), 1, torch.Generator().manual_seed(3),
                                     teacher=stage1)
        losses[w_b] = per_example.mean().item()
    on_boundary = logs["boundary"] > 0
    assert int(on_boundary.sum()) == 16
    assert torch.allclose(logs["t"][on_boundary], torch.tensor(1.0 + 1e-8, dtype=torch.float64))
    assert (logs["t"][~on_boundary] >= 1.0).all() and ((logs["t"] - logs["gap"])[on_boundary] < 1.0).all()
    interior, boundary = losses[0.0], losses[1.0] - losses[0.0]
    assert abs(losses[0.1] - (interior + 0.1 * boundary)) < 1e-9 * losses[1.0]


def test_loss_with_the_batch_target():
    """tcm.loss with batch_target, replayed by hand (the same generator draws): x_r is the Euler step from x_sigma to r
    with the batch's E[x | x_sigma] written out, and the target routes from x_r."""
    student, stage1 = two_nets(dropout=0.0)
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cfg = tcm.Config(batch_target=True, ratio_limit=0.9)
    per_example, _ = tcm.loss(student, x, None, cfg, 1, torch.Generator().manual_seed(3), teacher=stage1)
    g = torch.Generator().manual_seed(3)
    sigma = tcm.sample_sigma_student_t(64, cfg, g, x.device)
    on_boundary = tcm.boundary_mask(64, cfg, g, x.device)
    sigma, r = cm.partner_sigma(torch.where(on_boundary, cfg.transition_sigma + 1e-8, sigma), cfg.ratio_limit, cfg)
    x_sigma = x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    D = posterior_mean_by_definition(x, x_sigma, torch.ones_like(sigma), sigma)
    x_r = x_sigma + ((r - sigma) / sigma)[:, None] * (x_sigma - D)
    d = (cm.consistency_fn(student, x_sigma, sigma, None, cfg) - tcm.route(student, stage1, x_r, r, None, cfg)).norm(dim=1)
    n_boundary, n_interior = on_boundary.sum().double(), (~on_boundary).sum().double()
    scale = torch.where(on_boundary, cfg.boundary_weight * 64 / n_boundary, 64 / n_interior)
    expected = scale * cm.loss_weight(sigma, r, cfg) * ((d**2 + cfg.huber_c**2).sqrt() - cfg.huber_c)
    assert (D - x).abs().max() > 0.5  # the batch's estimate is not the sample's own x
    torch.testing.assert_close(per_example, expected, rtol=1e-9, atol=1e-12)


def test_needs_the_stage1_net():
    student, _ = two_nets()
    with pytest.raises(ValueError, match="stage-1"):
        tcm.loss(student, torch.randn(4, 3, dtype=torch.float64), None, tcm.Config(), 1, torch.Generator())


def test_toy_tcm_is_at_least_as_good_as_its_stage1(toy_teacher, toy_ct):
    """Stage 1: CM from scratch (the conftest run shared with test_cm). Stage 2: TCM from its weights (300 steps,
    lr 1.5e-4, ratio limit 0.99 as the toy preset). Measured (sliced W2, 4096 held-out points): CM 0.087, TCM 0.080.
    Tolerance 0.01."""
    _, _, _, held_out, eps = toy_teacher
    stage1, ccfg = toy_ct
    d_cm = sliced_wasserstein(cm.sample(stage1, eps, ccfg), held_out)
    tcfg = tcm.Config(ratio_limit=0.99)
    student = nets.build_net("mlp", (2,), width=128, depth=3)
    student.load_state_dict(stage1.state_dict())
    frozen = nets.build_net("mlp", (2,), width=128, depth=3)
    frozen.load_state_dict(stage1.state_dict())
    frozen.requires_grad_(False).train()
    d_tcm = sliced_wasserstein(tcm.sample(train_toy(tcm, tcfg, student, 300, 1.5e-4, teacher=frozen), eps, tcfg), held_out)
    print(f"SW2: cm {d_cm:.3f}, tcm {d_tcm:.3f}")
    assert d_tcm <= d_cm + 0.01
