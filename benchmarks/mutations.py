"""Mutation check: can the default tests see the one-line mistakes a careful reader could make copying a method file?

    python benchmarks/mutations.py [--method meanflow] [--quick] [--match TEXT]

Each entry of MUTATIONS replaces one exact piece of one line (it must occur exactly once in its file; a default test
checks that). The mutations are applied one at a time to a temporary copy of the repository, and that method's default
tests run on it (tests/test_fidelity_<method>.py first, then tests/test_<method>.py, `-m "not slow"`, stopping at the
first failure; one process per method reloads the mutated module, so torch is imported once). A mutation is "killed"
when a test fails, and "SURVIVED" otherwise. --quick runs the fidelity file only (enough to show a kill; a survivor
there still has to face the full set). Prints one line per mutation and a summary; the exit status is 1 when a
mutation survives.
"""
import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> [(old, new, what a reader got wrong)]; old is replaced by new in <method>.py.
MUTATIONS = {
    "meanflow": [
        ("w = 1 / (L.detach() + cfg.norm_c)", "w = 1 / (L + cfg.norm_c)", "adaptive weight without sg(L)"),
        ("L = err.square().sum(dim=1)", "L = err.square().mean(dim=1)", "mean over dimensions instead of the sum"),
        ("u_tgt = v_tgt.double() - rho", "u_tgt = v_tgt.double() + rho", "sign of the MeanFlow identity"),
        ("with torch.no_grad(), torch.autocast(z.device.type, enabled=False):",
         "with torch.autocast(z.device.type, enabled=False):", "JVP / FD passes with grad enabled"),
        ("(v_tgt.to(z.dtype), torch.ones_like(t_in), torch.zeros_like(r_in))",
         "(v_tgt.to(z.dtype), torch.zeros_like(t_in), torch.ones_like(r_in))", "JVP tangents (v, 0, 1): t and r swapped"),
        ("tangents=(v_tgt, torch.ones_like(t_in), torch.zeros_like(r_in))",
         "tangents=(v, torch.ones_like(t_in), torch.zeros_like(r_in))", "fused tangent along v, not the target v~"),
        ("(1 - omega - kappa) * v_null", "(1 - omega + kappa) * v_null", "CFG mix: sign of kappa"),
        ("return v_null + omega * (v_c - v_null)", "return v_c + omega * (v_null - v_c)", "teacher CFG sign"),
        ("(t <= cfg.cfg_t_max)).double(), z)", "(t <= 1.0)).double(), z)", "guidance interval ignored"),
        ("return torch.where(bcast(dropped, z) > 0, v, v_tgt)", "return v_tgt", "dropped labels guided as well"),
        ("u, dudt = u_and_dudt(net, z, t, r, y_mixed, dz, cfg)", "u, dudt = u_and_dudt(net, z, t, r, y, dz, cfg)",
         "JVP / grad passes see the labels before dropout"),
        ("u, dudt = u_and_dudt(net, z, t, r, y_mixed, dz, cfg)", "u, dudt = u_and_dudt(net, z, t, r, y_mixed, v_tgt, cfg)",
         "tangent_v='net' ignored: the tangent along v~"),
        ("dz = velocity(bare, z, t.to(z.dtype), y_mixed).to(z.dtype)", "dz = velocity(bare, z, t.to(z.dtype), y).to(z.dtype)",
         "tangent_v='net': the velocity with the labels before dropout"),
        ("z = bcast(1 - t, x) * x + bcast(t, x) * eps", "z = bcast(t, x) * x + bcast(1 - t, x) * eps",
         "interpolation with data at t = 1"),
        ("P_mean_r: float = -4.0", "P_mean_r: float = -2.0", "r distribution of the paper's v0, not the reference's"),
        ("ratio_r_neq_t: float = 0.75", "ratio_r_neq_t: float = 0.25", "CIFAR-10 fraction r != t"),
        ("rho = min(1.0, step / cfg.tangent_warmup)", "rho = min(1.0, cfg.tangent_warmup / step)", "warm-up ramp inverted"),
        ("torch.clear_autocast_cache()\n", "pass\n", "autocast cache kept between the no-grad and the gradient passes"),
        ("torch.clear_autocast_cache()  # as in", "pass  # as in", "tangent_v='net': autocast cache kept after its pass"),
        ('tangent_v: str = "target"', 'tangent_v: str = "net"', "tangent along the net's velocity by default"),
        ("w = torch.where(eq, 1 /", "w = torch.where(~eq, 1 /", "norm_r_eq_t='mean' on the r != t rows"),
        ("1 / ((L.detach() * eq).sum() / eq.sum().clamp_min(1) + cfg.norm_c)", "1 / (L.detach().mean() + cfg.norm_c)",
         "norm_r_eq_t='mean': the mean over the whole batch"),
        ("    if cfg.norm_r_eq_t == \"mean\":", "    if False:", "norm_r_eq_t='mean' ignored"),
        ('norm_r_eq_t: str = "row"', 'norm_r_eq_t: str = "mean"', "one weight for the r = t rows by default"),
        ("D = batch_denoise(x, z, 1 - t, t, y)", "D = batch_denoise(x, z, t, 1 - t, y)",
         "batch target: the posterior of z = t x + (1 - t) eps"),
        ("D = batch_denoise(x, z, 1 - t, t, y)", "D = batch_denoise(x, z, 1 - t, t)", "batch target across labels"),
        ("v = (v.double() + (x.double() - D) / bcast(t, D))", "v = (v.double() + (D - x.double()) / bcast(t, D))",
         "batch target: sign of the posterior correction"),
        ("v = (v.double() + (x.double() - D) / bcast(t, D))", "v = (v.double() + (x.double() - D))",
         "batch target: correction not divided by t"),
        ("batch_target: bool = False", "batch_target: bool = True", "batch target on by default"),
        ("lr=6e-4, betas=(0.9, 0.999), lr_warmup=9765", "lr=6e-4, betas=(0.9, 0.999), lr_warmup=9766",
         "CIFAR-10 warm-up steps"),
        ("ratio_r_neq_t=0.25, norm_p=1.0, norm_c=1.0", "ratio_r_neq_t=0.25, norm_p=1.0, norm_c=1e-3",
         "DiT adaptive-weight constant of the paper"),
        ('cfg_omega=0.2, cfg_kappa=0.92, cfg_t_max=0.75', 'cfg_omega=0.2, cfg_kappa=0.92', "XL/2 guidance interval"),
    ],
    "scm": [
        ("g = tangent_g(F.detach(), dF,", "g = tangent_g(F, dF,", "sg(F) dropped inside g"),
        ("D = batch_denoise(x, x_t, t.cos(), cfg.sigma_data * t.sin(), y)", "D = batch_denoise(x, x_t, t.cos(), t.sin(), y)",
         "batch velocity: noise std without sigma_data"),
        ("return ((bcast(t.cos(), D) * x_t.double() - D)", "return ((x_t.double() - D)", "batch velocity: x_t without cos t"),
        ("scale**2 / (2 * std**2), xs", "scale**2 / std**2, xs", "the copy of batch_denoise drifts from cm.py's"),
        ("diff = (F.double() - F.detach().double() - g)", "diff = (F.double() - F.detach().double() + g)",
         "sign of g in the loss (value unchanged, gradient reversed)"),
        ("per_example = torch.exp(-logvar) * L / (sigma * D) + logvar",
         "per_example = torch.exp(-logvar) * L / sigma + logvar", "the reference's extra 1/D dropped"),
        ("per_example = torch.exp(-logvar) * L / (sigma * D) + logvar",
         "per_example = torch.exp(-logvar) * L / D + logvar", "prior weight 1/sigma dropped"),
        ("per_example = torch.exp(-logvar) * L / (sigma * D) + logvar",
         "per_example = torch.exp(logvar) * L / (sigma * D) - logvar", "paper's w_phi sign with EDM2's head"),
        ("norm = norm / math.sqrt(g[0].numel())", "norm = norm / g[0].numel()", "RMS as mean, not root-mean"),
        ("g = -cos**2 * (sd * F - dxdt) - rho", "g = -cos**2 * (sd * F - dxdt) + rho", "sign of g's second term"),
        ("g = -cos**2 * (sd * F - dxdt)", "g = -cos * (sd * F - dxdt)", "cos t instead of cos^2 t"),
        ("dc_noise_in = torch.full_like(c_noise_in, 0.25)", "dc_noise_in = torch.full_like(c_noise_in, 1.0)",
         "c_noise tangent 1 instead of 1/4"),
        ("with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):",
         "with torch.autocast(x_t.device.type, enabled=False):", "JVP with grad enabled"),
        ("dxdt = dxdt + (cfg.guidance_scale - 1) * (dxdt - dxdt_null)",
         "dxdt = dxdt + (cfg.guidance_scale - 1) * (dxdt_null - dxdt)", "teacher CFG sign"),
        ("t = torch.atan2(sigma, torch.full_like(sigma, sd))", "t = torch.atan2(torch.full_like(sigma, sd), sigma)",
         "arctan(sigma_data / sigma)"),
        ("L = diff.mean(dim=1) if", "L = diff.sum(dim=1) if", "sum over dimensions with RMS normalisation"),
        ("dx_in = bcast(cos_sin, x_t) * dxdt.to(x_t.dtype) / sd", "dx_in = bcast(cos_sin, x_t) * dxdt.to(x_t.dtype)",
         "input tangent without 1/sigma_data"),
        ("P_std: float = 1.4", "P_std: float = 1.6", "ImageNet P_std as the default"),
        ("tangent_warmup: int = 10000", "tangent_warmup: int = 1000", "warm-up length"),
        ("tangent_norm_c: float = 0.1", "tangent_norm_c: float = 0.01", "normalisation constant"),
        ("sigma_max=80.0, P_std=1.6, sample_sigmas=(79.5638, 0.0)", "sigma_max=80.0, P_std=1.4, sample_sigmas=(79.5638, 0.0)",
         "imagenet64-scd P_std"),
        ('TEACHERS = ("diffusion",)', 'TEACHERS = ("diffusion", "scm")', "an sCM checkpoint accepted as a teacher"),
    ],
    "cm": [
        ("    with torch.no_grad():\n        if teacher is None:", "    if True:\n        if teacher is None:",
         "target pass with grad enabled"),
        ("d = (f.double() - target.double()).flatten(1).norm(dim=1)",
         "d = (f.double() - target.double()).flatten(1).square().sum(dim=1)", "squared distance instead of the norm"),
        ("d = (f.double() - target.double()).flatten(1).norm(dim=1)",
         "d = (f.double() - target.double()).flatten(1).square().mean(dim=1).sqrt()", "RMS instead of the L2 norm"),
        ("(d**2 + cfg.huber_c**2).sqrt() - cfg.huber_c)", "(d**2 + cfg.huber_c**2).sqrt())", "pseudo-Huber without - c"),
        ("weights = dict(inv_gap=1 / gap,", "weights = dict(inv_gap=1 / sigma,", "1/sigma instead of 1/(sigma - r)"),
        ("inv_c_out_sq=c_out**-2", "inv_c_out_sq=c_out**-1", "1/c_out instead of 1/c_out^2"),
        ("(1 + 8 * torch.sigmoid(-sigma))", "(1 + 8 * torch.sigmoid(sigma))", "ECT gap: sigmoid(sigma)"),
        ("return x + bcast(r, x) * eps", "return x + bcast(r, x) * torch.randn_like(eps)", "fresh noise at r"),
        ("(xt * (scale / std**2))", "(xt * (scale / (2 * std**2)))", "batch target: softmax temperature 2 std^2 on the cross term"),
        ("scale**2 / (2 * std**2), xs", "scale / (2 * std**2), xs", "batch target: scale, not scale^2, on ||x_k||^2"),
        ("logits.masked_fill_(ids[:, None] != ids[None, :], -math.inf)", "pass", "batch target across labels"),
        ("return (x_sigma64 + bcast(r - sigma, x_sigma64)", "return (x_sigma64 + bcast(sigma - r, x_sigma64)",
         "batch target: Euler step away from r"),
        ("target_at_r_zero = x_r if teacher is None else x", "target_at_r_zero = x",
         "batch target: the sample's x at r = 0"),
        ("D = D + (cfg.guidance_scale - 1) * (D - denoise(", "D = D - (cfg.guidance_scale - 1) * (D - denoise(",
         "teacher CFG sign"),
        ("slope = (x_sigma - guided_D(x_sigma, sigma)) / bcast(sigma, x_sigma)",
         "slope = (x_sigma - guided_D(x_sigma, sigma)) / bcast(r, x_sigma)", "PF-ODE slope divided by r"),
        ("P_mean: float = -1.1", "P_mean: float = -1.2", "EDM's P_mean"),
        ("q: float = 2.0", "q: float = 4.0", "ImageNet q as the default"),
        ("ratio_limit: float = 0.999", "ratio_limit: float = 0.9961", "ImageNet ratio limit as the default"),
        ("torch.clear_autocast_cache()", "pass", "autocast cache kept between the no-grad and the gradient passes"),
        ("stage = math.floor(images / (1000 * cfg.kimg_per_stage))", "stage = math.floor(images / cfg.kimg_per_stage)",
         "stage counted in kimg as images"),
        ("target = torch.where(bcast(r, target_at_r_zero) > 0, target, target_at_r_zero)",
         "target = torch.where(bcast(r, target_at_r_zero) > 0, target_at_r_zero, target)", "data target where r > 0"),
        ("kimg_per_stage=3200.0,\n", "kimg_per_stage=6400.0,\n", "ImageNet stage length"),
        ('TEACHERS = ("diffusion",)', 'TEACHERS = ("diffusion", "cm", "tcm", "scm")', "consistency models as teachers"),
    ],
    "tcm": [
        ("scale = torch.where(on_boundary, cfg.boundary_weight * B / n_boundary, B / n_interior)",
         "scale = torch.where(on_boundary, cfg.boundary_weight * B / n_interior, B / n_boundary)",
         "boundary / interior counts swapped"),
        ("scale = torch.where(on_boundary, cfg.boundary_weight * B / n_boundary, B / n_interior)",
         "scale = torch.where(on_boundary, cfg.boundary_weight, 1.0)", "weights without the per-set means"),
        ("n_interior = (~on_boundary).sum()", "n_interior = on_boundary.sum()", "interior count"),
        ("boundary_weight: float = 0.1", "boundary_weight: float = 1.0", "boundary weight"),
        ("torch.full_like(sigma, cfg.transition_sigma + 1e-8)", "torch.full_like(sigma, cfg.transition_sigma - 1e-8)",
         "boundary samples below the transition"),
        ("sigma, r = partner_sigma(sigma, cfg.ratio_limit, cfg)", "sigma, r = partner_sigma(sigma, 0.999, cfg)",
         "ratio fixed at CIFAR's limit"),
        ("    with torch.no_grad():\n        x_r = ct_partner(", "    if True:\n        x_r = ct_partner(",
         "routed target with grad enabled"),
        ("x_r = ct_partner(x, x_sigma, eps, sigma, r, y, cfg)", "x_r = ct_partner(x, x_sigma, eps, sigma, sigma, y, cfg)",
         "target at sigma, not r"),
        ("x_r = ct_partner(x, x_sigma, eps, sigma, r, y, cfg)", "x_r = ct_partner(x, x, eps, sigma, r, y, cfg)",
         "batch target posterior of the clean points"),
        ("for net, rows in ((stage1, (~is_student)", "for net, rows in ((student, (~is_student)",
         "student below the transition"),
        ("(student, is_student.nonzero()[:, 0])", "(student, (~is_student).nonzero()[:, 0])",
         "student on the rows below the transition"),
        ("    with torch.random.fork_rng(devices):\n        if", "    if True:\n        if",
         "routed passes without the RNG fork: their dropout masks are not the gradient pass's"),
        ("functools.partial(net, rows=(rows, x.shape[0], masks))", "functools.partial(net)",
         "a pass over some rows draws masks for those rows alone, not the whole batch's"),
        ("functools.partial(net, rows=(rows, x.shape[0], masks))", "functools.partial(net, rows=(rows, x.shape[0], []))",
         "each routed pass draws the batch's masks again"),
        ("if not takes_rows(net):", "if True:",
         "both nets on the whole batch (FastGen's two passes)"),
        ("None if y is None else y[rows], cfg)", "y, cfg)", "labels of the whole batch on a pass over some rows"),
        ("k = math.floor(cfg.boundary_prob * n)", "k = math.ceil(cfg.boundary_prob * n)", "boundary count rounded up"),
        ("student_t_nu: float = 0.01", "student_t_nu: float = 0.1", "Student-t degrees of freedom"),
        ("student_t_scale: float = 0.2", "student_t_scale: float = 0.25", "Student-t scale"),
        ("torch.clear_autocast_cache()", "pass", "autocast cache kept between the no-grad and the gradient passes"),
        ("lr_ref_steps=8000", "lr_ref_steps=2000", "stage-1 (CM) inverse-sqrt reference steps"),
    ],
    "shortcut": [
        ("D = batch_denoise(x, z, 1 - t, t, y)", "D = batch_denoise(x, z, t, 1 - t, y)",
         "batch target: the posterior of z = t x + (1 - t) eps"),
        ("D = batch_denoise(x, z, 1 - t, t, y)", "D = batch_denoise(x, z, 1 - t, t)", "batch target across labels"),
        ("v = (v.double() + (x.double() - D) / bcast(t, D))", "v = (v.double() + (D - x.double()) / bcast(t, D))",
         "batch target: sign of the posterior correction"),
        ("batch_target: bool = False", "batch_target: bool = True", "batch target on by default"),
        ("repeat_interleave((n_boot // 2) // levels)", "repeat_interleave(n_boot // levels)",
         "bootstrap_dt_bias: the small steps get a full share"),
        ("k = torch.cat([k, torch.ones(n_boot // 4,", "k = torch.cat([k, torch.ones(n_boot // 2,",
         "bootstrap_dt_bias: half the rows on d = 1/2"),
        ("    if cfg.bootstrap_dt_bias:", "    if False:", "bootstrap_dt_bias ignored"),
        ("bootstrap_dt_bias: bool = False", "bootstrap_dt_bias: bool = True", "bootstrap_dt_bias on by default"),
        ("@torch.no_grad()\ndef bootstrap_target(", "def bootstrap_target(", "bootstrap target without stop-gradient"),
        ("    h = d / 2\n", "    h = d\n", "half steps as long as the trained step (d, not d / 2)"),
        ("z_mid = (z - bcast(h, z) * u_1)", "z_mid = (z + bcast(h, z) * u_1)", "first half step taken backwards"),
        ("return ((u_1 + u_2) / 2).clamp(-c, c)", "return (u_1 + u_2).clamp(-c, c)", "sum of the half steps, not mean"),
        (".square().mean(dim=1)  # (B,)", ".square().sum(dim=1)  # (B,)", "sum over dimensions instead of the mean"),
        ("    v = eps - x\n", "    v = x - eps\n", "flow target of the paper's time direction (x_1 - x_0) kept here"),
        ("z = bcast(1 - t, x) * x + bcast(t, x) * eps", "z = bcast(t, x) * x + bcast(1 - t, x) * eps",
         "interpolation with data at t = 1"),
        ("bootstrap_every: int = 4", "bootstrap_every: int = 8", "1/8 of the batch bootstrapped (code), not 1/4"),
        ("n_boot = B // cfg.bootstrap_every", "n_boot = B // cfg.bootstrap_every + 1", "batch split off by one row"),
        ("torch.arange(levels - 1, -1, -1, device=device)", "torch.arange(levels, device=device)",
         "step levels in reverse order (largest first)"),
        ("t_boot = 1 - j * d_boot", "t_boot = j * d_boot", "self-consistency t on {0, ..., 1 - d}: r = t - d < 0"),
        ("t_flow = 1 - j / M", "t_flow = j / M", "flow t on {0, ..., 1 - 1/M}: the paper's t' not flipped"),
        ("torch.where(d * cfg.denoise_timesteps <= 1, t, t - d)", "torch.where(d * cfg.denoise_timesteps < 1, t, t - d)",
         "base case missed: the smallest half step asks for r = t - 1/M"),
        ("u_null + w * (u[rows] - u_null)", "u[rows] + w * (u_null - u[rows])", "guidance sign"),
        ("scale = torch.where(h * cfg.denoise_timesteps <= 1, cfg.cfg_scale, 1.0)",
         "scale = torch.full_like(h, cfg.cfg_scale)", "every self-consistency row guided, not the smallest step's"),
        ("< cfg.label_dropout) & ~is_boot", "< cfg.label_dropout)", "label dropout on self-consistency rows too"),
        ("z_mid = (z - bcast(h, z) * u_1).clamp(-c, c)", "z_mid = z - bcast(h, z) * u_1", "z' not clipped"),
        ("    bare.eval()\n", "    pass\n", "bootstrap passes in train mode (dropout on)"),
        ("torch.clear_autocast_cache()", "pass", "autocast cache kept between the no-grad and the gradient passes"),
        ("z = z - (1 / N) * shortcut(", "z = z + (1 / N) * shortcut(", "sampler steps towards noise"),
        ("t = torch.full((B,), 1 - i / N,", "t = torch.full((B,), 1 - (i + 1) / N,", "sampler asks at the step's end"),
        ("weight_decay=0.1, ema=(0.999,)", "weight_decay=0.0, ema=(0.999,)", "AdamW weight decay of the reference"),
        ("label_dropout=0.1, cfg_scale=1.5)", "label_dropout=0.1, cfg_scale=4.0)",
         "ImageNet guidance: train.py's default 4.0, not the README's 1.5"),
    ],
    "flowmap": [
        ("            v_X = vel(X, r.to(z.dtype), r.to(z.dtype), y)", "            v_X = vel(X, t.to(z.dtype), t.to(z.dtype), y)",
         "LSD teacher velocity at the start time t, not at r"),
        ("        with torch.no_grad():\n            u_tm = bare(z, t_in, m_in, y)", "        if True:\n            u_tm = bare(z, t_in, m_in, y)",
         "PSD target without stop-gradient"),
        ("            with torch.no_grad():\n                X = z - bcast(t - r, z) * u",
         "            if True:\n                X = z - bcast(t - r, z) * u", "LSD teacher point X and v(X, r) not stop-gradient"),
        ("return (u - bcast(t - r, z) * du_r - v_X).double()", "return (u + bcast(t - r, z) * du_r - v_X).double()",
         "LSD: sign of (t - r) d_r u"),
        ("torch.ones_like(r.to(z.dtype)), cfg, weight)", "torch.ones_like(r.to(z.dtype)) * 0, cfg, weight)",
         "LSD without d_r u"),
        ("return (u + bcast(t - r, z) * (du_t + du_z) - v).double()", "return (u + bcast(t - r, z) * (du_t - du_z) - v).double()",
         "ESD: sign of the advective term"),
        ("            with torch.no_grad():\n                _, du_z", "            if True:\n                _, du_z",
         "ESD advective term with gradient (stopgrad 'convex', not 'full')"),
        ("u_tgt = bcast(1 - h, z) * u_tm + bcast(h, z) * u_mr", "u_tgt = bcast(h, z) * u_tm + bcast(1 - h, z) * u_mr",
         "PSD: weights of the two jumps swapped"),
        ("z_m = z - bcast(t - m, z) * u_tm", "z_m = z - bcast(m - r, z) * u_tm", "PSD: first jump of the wrong length"),
        ("    m = h * t + (1 - h) * r\n", "    m = h * r + (1 - h) * t\n", "PSD intermediate time flipped"),
        ("t = torch.cat([t_diag, torch.maximum(a, b)])", "t = torch.cat([t_diag, torch.minimum(a, b)])",
         "off-diagonal t and r swapped (r > t)"),
        ("    n_diag = max(1, int(n * cfg.diag_fraction))", "    n_diag = max(1, int(n * (1 - cfg.diag_fraction)))",
         "diagonal fraction 1 - f"),
        ("res.flatten(1).square().sum(dim=1)])", "res.flatten(1).square().mean(dim=1)])",
         "mean over dimensions instead of the sum"),
        ("err_diag = (u_diag.double() - v_diag.double())", "err_diag = (u_diag.double() + v_diag.double())",
         "diagonal target x - eps"),
        ("    vel = bare if teacher is None else teacher", "    vel = bare", "distillation: LSD / ESD use the student's velocity"),
        ("        v_diag = v[:n] if teacher is None else net_u(teacher, z[:n], t[:n], t[:n], y_d)", "        v_diag = v[:n]",
         "distillation: the diagonal regresses onto eps - x, not the teacher"),
        ("    with torch.no_grad():\n        v_diag = v[:n] if", "    if True:\n        v_diag = v[:n] if",
         "distillation: the teacher's diagonal pass under grad"),
        ("z = bcast(1 - t, x) * x + bcast(t, x) * eps", "z = bcast(t, x) * x + bcast(1 - t, x) * eps",
         "interpolation with data at t = 1 (the paper's time kept)"),
        ("for j in (i, i + 1))\n        z = z - bcast", "for j in (i, i))\n        z = z - bcast",
         "sampler jumps of length 0"),
        ("for j in (i, i + 1))\n        z = z - bcast(t - r, z)", "for j in (i + 1, i + 2))\n        z = z - bcast(t - r, z)",
         "sampler grid shifted by one step (starts below t = 1)"),
        ("diag_fraction: float = 0.75", "diag_fraction: float = 0.5", "diagonal fraction of the reference"),
        ("L = torch.exp(-w) * L + w", "L = torch.exp(w) * L + w", "learned weight: exp(w) L, not exp(-w) L"),
        ("L = torch.exp(-w) * L + w", "L = torch.exp(-w) * L", "learned weight without + w (w runs to infinity)"),
        ("w = torch.cat([w_diag, w_off]).double()", "w = torch.cat([w_diag, w_off]).double().detach()",
         "learned weight never learned (detached)"),
        ("u, w = net_uw(net, z, t, r, y, weight)\n        return (u - u_tgt)",
         "u, w = net_uw(net, z, t, t, y, weight)\n        return (u - u_tgt)", "PSD: the student asked at r = t"),
        ("w = torch.cat([w_diag, w_off])", "w = torch.cat([0 * w_diag, w_off])",
         "learned weight on the self-distillation rows only"),
        ("learned_weight: bool = False", "learned_weight: bool = True", "the learned weight on by default"),
    ],
    "diffusion": [
        ("weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2",
         "weight = (sigma**2 + cfg.sigma_data**2) / sigma**2", "lambda(sigma) without sigma_data^2"),
        ("weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2",
         "weight = 1 / (sigma * cfg.sigma_data) ** 2", "lambda(sigma) = 1/(sigma sigma_data)^2"),
        ("err = (D.double() - target).flatten(1).square().sum(dim=1)",
         "err = (D.double() - target).flatten(1).square().mean(dim=1)", "mean over dimensions"),
        ("c_noise = sigma.clamp_min(1e-6).log() / 4", "c_noise = sigma.clamp_min(1e-6).log() / 2", "c_noise ln(sigma)/2"),
        ("c_in = 1 / (sigma**2 + sigma_data**2).sqrt()", "c_in = 1 / (sigma**2 + sigma_data**2)", "c_in without sqrt"),
        ("P_mean: float = -1.2", "P_mean: float = -1.1", "CM's P_mean"),
        ("P_std: float = 1.2", "P_std: float = 1.4", "P_std"),
        ("x_sigma = x + bcast(sigma, x) * eps", "x_sigma = x + eps", "noise not scaled by sigma"),
        ("batch_target: bool = False", "batch_target: bool = True", "batch target on by default"),
        ("torch.ones_like(sigma), sigma, y) if cfg.batch_target", "sigma, torch.ones_like(sigma), y) if cfg.batch_target",
         "batch target: scale and std swapped"),
        ("torch.ones_like(sigma), sigma, y) if cfg.batch_target", "torch.ones_like(sigma), sigma, None) if cfg.batch_target",
         "batch target: labels dropped"),
        ("target = batch_denoise(x, x_sigma,", "target = batch_denoise(x, x,", "batch target: the posterior given x, not x_sigma"),
        ("u = a + (b - a) * torch.rand(", "u = a + b * torch.rand(", "truncation interval"),
        ("rho: float = 7.0", "rho: float = 5.0", "Karras rho"),
        ("x_next = x + (s_next - s_cur).to(x.dtype) * (d + d_next) / 2",
         "x_next = x + (s_next - s_cur).to(x.dtype) * d_next", "Heun without the average"),
        ("dropout=0.13", "dropout=0.1", "CIFAR-10 dropout"),
        ("return bcast((t - sd**2 * (1 - t)) / s**2, z) * z", "return bcast((t - sd**2 * (1 - t)) / s, z) * z",
         "flow velocity: A over s, not s^2"),
        ("- bcast(sd / s, z) * F.to(z.dtype)", "+ bcast(sd / s, z) * F.to(z.dtype)", "flow velocity: sign of F"),
        ("((t / (1 - t)).log() / 4)", "(t.log() / 4)", "flow velocity: c_noise of t, not of sigma = t / (1 - t)"),
        ("self.net(bcast(1 / s, z) * z,", "self.net(z,", "flow velocity: the net's input without c_in"),
        ("self.t_min, self.t_max = sigma_min / (1 + sigma_min),", "self.t_min, self.t_max = 0.0,",
         "flow velocity: t not clamped to the teacher's reach"),
    ],
}


def tests_for(method, quick):
    files = [f"tests/test_fidelity_{method}.py"] + ([] if quick else [f"tests/test_{method}.py"])
    return [f for f in files if os.path.exists(os.path.join(ROOT, f))]


def copy_repo(dst):
    """Tracked and untracked-but-not-ignored files of the repository (no run folders, caches or data)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    for rel in out:
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))


def check_lines(method):
    """Messages for mutations whose original text does not occur exactly once in <method>.py."""
    src = open(os.path.join(ROOT, f"{method}.py")).read()
    return [f"{method}.py: {old!r} occurs {src.count(old)} times" for old, _, _ in MUTATIONS[method]
            if src.count(old) != 1]


def worker(method, quick):
    """Inside the copy: one process for all of a method's mutations (torch is imported once). Each mutation rewrites
    <method>.py, reloads the module in place (the tests hold the module object, so they see the new code) and runs
    pytest in this process; then the original is restored. Prints "<status> <seconds>" per mutation."""
    import importlib
    import pytest
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    module = importlib.import_module(method)
    path = f"{method}.py"
    original = open(path).read()
    args = ["-q", "-x", "-p", "no:cacheprovider", *tests_for(method, quick)]
    for old, new, _ in MUTATIONS[method]:
        with open(path, "w") as f:
            f.write(original.replace(old, new))
        t0 = time.time()
        try:
            importlib.reload(module)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                rc = int(pytest.main(args))
        except Exception:  # the mutated module does not even import: a test would fail
            rc = 1
        with open(path, "w") as f:
            f.write(original)
        importlib.reload(module)
        print(f"{rc} {time.time() - t0:.1f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=list(MUTATIONS), action="append", help="default: all")
    p.add_argument("--quick", action="store_true", help="run only tests/test_fidelity_<method>.py")
    p.add_argument("--match", default="", help="only the mutations whose description contains this text")
    p.add_argument("--worker", choices=list(MUTATIONS), help=argparse.SUPPRESS)
    args = p.parse_args()
    for method in MUTATIONS:
        MUTATIONS[method] = [m for m in MUTATIONS[method] if args.match in m[2]]
    if args.worker:
        return worker(args.worker, args.quick)
    methods = args.method or list(MUTATIONS)
    bad = [m for method in methods for m in check_lines(method)]
    if bad:
        sys.exit("\n".join(bad))
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        copy_repo(tmp)
        for method in methods:
            cmd = [sys.executable, "benchmarks/mutations.py", "--worker", method, "--match", args.match]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, text=True)
            for (_, _, why), line in zip(MUTATIONS[method], proc.stdout):
                rc, seconds = line.split()
                status = {"1": "killed", "0": "SURVIVED"}.get(rc, f"error (pytest exit {rc})")
                if rc != "1":
                    survivors.append(f"{method}: {why}")
                print(f"{method:9s} {status:8s} {float(seconds):6.1f} s  {why}", flush=True)
            if proc.wait() != 0:
                sys.exit(f"the {method} worker failed")
    n = sum(len(MUTATIONS[m]) for m in methods)
    print(f"{n - len(survivors)} of {n} mutations killed" + (": survivors " + "; ".join(survivors) if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
