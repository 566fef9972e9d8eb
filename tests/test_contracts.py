"""Contracts of the method files: Config.from_preset, every Config field's range refused
through train.py's CLI before anything is created, and the net's return shapes and tangent support checked where
each loss receives them."""
import dataclasses
import importlib
import inspect
import math
import re

import pytest
import torch

import recipe
import train

METHODS = ("diffusion", "meanflow", "scm", "cm", "tcm", "shortcut", "flowmap")


# --- Config.from_preset ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_from_preset_equals_what_train_py_resolves(name):
    method = importlib.import_module(name)
    for preset in method.PRESETS:
        _, cfg, _, _ = recipe.resolve_config(["--method", name, "--preset", preset])
        assert method.Config.from_preset(preset) == recipe.method_config(method, cfg), preset


def test_from_preset_overrides_win_and_a_wrong_key_raises():
    import cm
    assert cm.Config.from_preset("toy", q=3.0).q == 3.0
    assert cm.Config.from_preset("toy", q=3.0).kimg_per_stage == cm.PRESETS["toy"]["kimg_per_stage"]
    with pytest.raises(TypeError, match="lr"):
        cm.Config.from_preset("toy", lr=1e-3)  # a recipe key is not a Config field
    with pytest.raises(KeyError):
        cm.Config.from_preset("no-such-preset")


@pytest.mark.parametrize("name", METHODS[1:])
def test_from_preset_copies_stay_identical(name):
    import diffusion
    method = importlib.import_module(name)
    assert inspect.getsource(method.Config.from_preset) == inspect.getsource(diffusion.Config.from_preset)
    assert "    # Copied from diffusion.py: Config.from_preset\n    @classmethod\n" in inspect.getsource(method)


@pytest.mark.parametrize("name", ["cm", "scm", "meanflow", "shortcut", "flowmap"])
def test_check_helper_copies_stay_identical(name):
    import diffusion
    method = importlib.import_module(name)
    for helper in ("check_ranges", "check_shape"):
        assert inspect.getsource(getattr(method, helper)) == inspect.getsource(getattr(diffusion, helper)), helper
        assert f"# Copied from diffusion.py: {helper}\ndef {helper}(" in inspect.getsource(method)


@pytest.mark.parametrize("name", ["scm", "flowmap"])
def test_tangent_helper_copies_stay_identical(name):
    import meanflow
    method = importlib.import_module(name)
    for helper in ("fused_call", "jvp_explained"):
        assert inspect.getsource(getattr(method, helper)) == inspect.getsource(getattr(meanflow, helper)), helper
        assert f"# Copied from meanflow.py: {helper}\ndef {helper}(" in inspect.getsource(method)


# --- Config ranges -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--method", "cm", "--sigma-data", "0"], "sigma_data must be > 0, got 0.0"),
    (["--method", "cm", "--sigma-data", "-1"], "sigma_data must be > 0, got -1.0"),
    (["--method", "cm", "--sigma-data", "nan"], "sigma_data must be > 0, got nan"),
    (["--method", "cm", "--huber-c", "-1"], "huber_c must be >= 0, got -1.0"),
    (["--method", "cm", "--P-std", "0"], "P_std must be > 0, got 0.0"),
    (["--method", "cm", "--q", "0"], "q must be > 1, got 0.0"),
    (["--method", "cm", "--kimg-per-stage", "0"], "kimg_per_stage must be > 0, got 0.0"),
    (["--method", "cm", "--P-mean", "inf"], "P_mean must be finite, got inf"),
    (["--method", "cm", "--sample-sigmas", "80,nan,0"], "sample_sigmas must decrease to 0"),
    (["--method", "cm", "--r-min", "80"], "r_min must be < sigma_max"),
    (["--method", "meanflow", "--P-std-t", "-1"], "P_std_t must be >= 0, got -1.0"),
    (["--method", "meanflow", "--tangent-warmup", "-5"], "tangent_warmup must be >= 0, got -5"),
    (["--method", "meanflow", "--fd-step", "0"], "fd_step must be in (0, 1), got 0.0"),
    (["--method", "meanflow", "--norm-c", "nan"], "norm_c must be > 0, got nan"),
    (["--method", "meanflow", "--cfg-t-min", "0.8", "--cfg-t-max", "0.5"], "cfg_t_min must be <= cfg_t_max"),
    (["--method", "meanflow", "--sample-ts", "0.999,nan,0"], "sample_ts must decrease"),
    (["--method", "scm", "--fd-rel-step", "0"], "fd_rel_step must be in (0, 1), got 0.0"),
    (["--method", "scm", "--tangent-norm-c", "0"], "tangent_norm_c must be > 0, got 0.0"),
    (["--method", "scm", "--sample-sigmas", "80,nan,0"], "sample_sigmas must decrease to 0"),
    (["--method", "diffusion", "--rho", "0"], "rho must be > 0, got 0.0"),
    (["--method", "diffusion", "--sample-steps", "0"], "sample_steps must be >= 1, got 0"),
])
def test_out_of_range_flag_is_one_line_error_before_anything_is_created(tmp_path, args, message):
    import train
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.cli([*args, "--data", "toy", "--steps", "1", "--out", str(out)])
    assert isinstance(e.value.code, str) and e.value.code.startswith("train.py: error:")
    assert message in e.value.code and "\n" not in e.value.code, e.value.code
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--boundary-prob", "1"], "boundary_prob must be in [0, 1), got 1.0"),
    (["--student-t-scale", "-0.2"], "student_t_scale must be > 0, got -0.2"),
    (["--transition-sigma", "nan"], "transition_sigma must be > 0, got nan"),
])
def test_out_of_range_tcm_flag_is_a_usage_error(tmp_path, args, message):
    """tcm's --stage1 run is opened before its Config is built, so through recipe.method_config (train.py's path)."""
    import re

    import cli
    argv = ["--method", "tcm", "--data", "toy", "--stage1", "nowhere", "--out", str(tmp_path / "run"), *args]
    _, cfg, method, _ = recipe.resolve_config(argv)
    with pytest.raises(cli.UsageError, match=f"^tcm config: {re.escape(message)}$"):
        recipe.method_config(method, cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", METHODS)
def test_every_config_field_has_a_checked_range_stated_in_its_comment(name):
    """Each numeric or bool field is in RANGES with the range its comment states; the rest are choices or lists,
    checked by their own lines in __post_init__."""
    method = importlib.import_module(name)
    source = inspect.getsource(method.Config)
    for f in dataclasses.fields(method.Config):
        line = next(x for x in source.splitlines() if x.strip().startswith(f"{f.name}: "))
        if isinstance(f.default, (str, tuple)):
            continue
        assert f.name in method.RANGES, f.name
        assert f"# {method.RANGES[f.name]}" in line, (f.name, line)


@pytest.mark.parametrize("name", METHODS)
def test_every_range_refuses_nan_and_the_value_past_its_bound(name):
    method = importlib.import_module(name)
    for field, rule in method.RANGES.items():
        bad = [1.5, "yes"] if rule == "bool" else [math.nan, math.inf]
        if rule.startswith(">"):
            bad.append(float(rule.lstrip(">= ")) - (1 if rule.startswith(">=") else 0))
        elif rule.startswith("in "):
            lo, hi = (float(b) for b in rule[4:-1].split(","))
            bad += [lo - 1e-9 if rule[3] == "[" else lo, hi + 1e-9 if rule[-1] == "]" else hi]
        for value in bad:
            with pytest.raises(ValueError, match=f"^{field} must be "):
                method.Config(**{field: value})


# --- The images-seen counter -----------------------------------------------------------------------------------------


def test_cm_loss_requires_the_images_seen():
    import cm
    net = torch.nn.Identity()
    net.forward = lambda x, c_noise, y=None: x
    with pytest.raises(ValueError, match=r"^cm.loss needs images=, .* \(step - 1\) \* batch"):
        cm.loss(net, torch.randn(4, 2), None, cm.Config(), 1, torch.Generator())
    cm.loss(net, torch.randn(4, 2), None, cm.Config(), 1, torch.Generator(), images=0)


@pytest.mark.parametrize("name", METHODS)
def test_the_loss_signature_is_the_same_in_every_method(name):
    import diffusion
    method = importlib.import_module(name)
    assert inspect.signature(method.loss) == inspect.signature(diffusion.loss)
    assert inspect.signature(method.loss).parameters["images"].default is None


# --- The net's outputs -------------------------------------------------------------------------------------------


class EDMNet(torch.nn.Module):
    """An EDM-style raw net F(x_in, c_noise, y) that can return a wrong shape ("F"), a (B, 1) log-variance ("logvar")
    or a wrong tangent output ("dF"); with tangents it propagates them (F is linear in x_in)."""
    def __init__(self, wrong=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.wrong = wrong

    def forward(self, x, c_noise, y=None, return_logvar=False, tangents=None):
        F = self.w * x * c_noise.reshape(-1, *[1] * (x.ndim - 1))
        F = F[:, :1] if self.wrong == "F" else F
        logvar = torch.zeros(x.shape[0], 1) if self.wrong == "logvar" else torch.zeros(x.shape[0])
        if tangents is not None:
            dF = self.w * tangents[0]
            F = (F, dF[:, :1] if self.wrong == "dF" else dF)
        return (F, logvar) if return_logvar else F


@pytest.mark.parametrize("name, kw", [("diffusion", {}), ("cm", {}), ("cm", dict(boundary=True)), ("tcm", {})])
def test_a_wrong_raw_output_shape_is_refused(name, kw):
    method = importlib.import_module(name)
    extra = dict(teacher=EDMNet()) if name == "tcm" else {}
    with pytest.raises(ValueError, match=r"the net's output F must have its input's shape \(B, \*D\) = \(8, 2\), "
                                         r"got \(8, 1\): one per entry$"):
        method.loss(EDMNet("F"), torch.randn(8, 2), None, method.Config(**kw), 1, torch.Generator(), images=0, **extra)


@pytest.mark.parametrize("tangent", ["jvp", "fused", "fd"])
@pytest.mark.parametrize("wrong, message", [
    ("logvar", r"scm.loss: the net's logvar must have shape \(B,\) = \(8,\), got \(8, 1\): return one log-variance "
               r"per sample$"),
    ("F", r"the net's (F|output F) must have .* = \(8, 2\), got \(8, 1\)"),
])
def test_scm_refuses_a_wrong_logvar_or_F_shape(tangent, wrong, message):
    import scm
    with pytest.raises(ValueError, match=message):
        scm.loss(EDMNet(wrong), torch.randn(8, 2), None, scm.Config(tangent=tangent), 1, torch.Generator())


def test_scm_refuses_a_wrong_fused_tangent_shape():
    import scm
    with pytest.raises(ValueError, match=r"scm.loss: the net's dF must have the shape of x_t \(B, \*D\) = \(8, 2\)"):
        scm.loss(EDMNet("dF"), torch.randn(8, 2), None, scm.Config(tangent="fused"), 1, torch.Generator())


class FlowNet(torch.nn.Module):
    """A MeanFlow-style net u(z, t, r, y), linear in z, optionally returning u or du of the wrong shape."""
    def __init__(self, wrong=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.wrong = wrong

    def forward(self, z, t, r, y=None, tangents=None):
        u = self.w * z * (t - r + 1)[:, None]
        u = u[:, :1] if self.wrong == "u" else u
        if tangents is None:
            return u
        du = self.w * tangents[0] * (t - r + 1)[:, None] + self.w * z * (tangents[1] - tangents[2])[:, None]
        return u, du[:, :1] if self.wrong == "du" else du


@pytest.mark.parametrize("tangent", ["jvp", "fused", "fd"])
def test_meanflow_refuses_a_wrong_u_shape(tangent):
    import meanflow
    with pytest.raises(ValueError, match=r"meanflow.loss: the net's u must have the shape of z \(B, \*D\) = \(8, 2\), "
                                         r"got \(8, 1\): one per entry$"):
        meanflow.loss(FlowNet("u"), torch.randn(8, 2), None, meanflow.Config(tangent=tangent), 1, torch.Generator())
    meanflow.loss(FlowNet(), torch.randn(8, 2), None, meanflow.Config(tangent=tangent), 1, torch.Generator())


def test_meanflow_refuses_a_wrong_fused_tangent_shape():
    import meanflow
    with pytest.raises(ValueError, match=r"meanflow.loss: the net's du must have the shape of z"):
        meanflow.loss(FlowNet("du"), torch.randn(8, 2), None, meanflow.Config(tangent="fused"), 1, torch.Generator())


# --- Tangents the net cannot give ----------------------------------------------------------------------------------


class PlainFlowNet(torch.nn.Module):
    def forward(self, z, t, r, y=None):
        return z * (t - r)[:, None]


class PlainEDMNet(torch.nn.Module):
    def forward(self, x, c_noise, y=None, return_logvar=False):
        return (x, torch.zeros(x.shape[0])) if return_logvar else x


FUSED = r"^tangent='fused' needs a net that propagates tangents \(nets.py's nets do\); use tangent='jvp' or 'fd'$"


def test_fused_with_a_plain_net_is_a_one_line_error():
    import meanflow
    import scm
    with pytest.raises(TypeError, match=FUSED):
        meanflow.loss(PlainFlowNet(), torch.randn(8, 2), None, meanflow.Config(tangent="fused"), 1, torch.Generator())
    with pytest.raises(TypeError, match=FUSED):
        scm.loss(PlainEDMNet(), torch.randn(8, 2), None, scm.Config(tangent="fused"), 1, torch.Generator())


class BatchNormFlowNet(torch.nn.Module):
    """Train-mode BatchNorm: functorch refuses its in-place running-statistics update under jvp."""
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, z, t, r, y=None):
        return self.bn(z) * (t - r)[:, None]


class AttentionEDMNet(torch.nn.Module):
    """F.scaled_dot_product_attention: its fused CPU kernel has no forward-AD rule."""
    def forward(self, x, c_noise, y=None, return_logvar=False):
        q = x.reshape(1, 1, *x.shape)
        F = torch.nn.functional.scaled_dot_product_attention(q, q, q).reshape(x.shape)
        return (F, torch.zeros(x.shape[0])) if return_logvar else F


def test_jvp_failures_name_their_known_causes_and_keep_the_original_error():
    import meanflow
    import scm
    jvp_msg = r"^tangent='jvp': torch.func.jvp failed \(%s\)\. Known causes: a train-mode BatchNorm .* use tangent='fd'"
    with pytest.raises(RuntimeError, match=jvp_msg % "RuntimeError") as e:
        meanflow.loss(BatchNormFlowNet(), torch.randn(8, 2), None, meanflow.Config(), 1, torch.Generator())
    assert "in-place operation" in str(e.value.__cause__)
    with pytest.raises(RuntimeError, match=jvp_msg % "NotImplementedError") as e:
        scm.loss(AttentionEDMNet(), torch.randn(8, 4), None, scm.Config(), 1, torch.Generator())
    assert "forward AD" in str(e.value.__cause__)
    meanflow.loss(BatchNormFlowNet(), torch.randn(8, 2), None, meanflow.Config(tangent="fd"), 1, torch.Generator())


@pytest.mark.parametrize("name", ["meanflow", "scm", "cm", "tcm", "diffusion", "shortcut", "flowmap"])
def test_help_shows_every_range(name, capsys):
    """`train.py --method M --help` prints each method flag's valid range (method.RANGES) beside its value."""
    method = importlib.import_module(name)
    with pytest.raises(SystemExit):
        train.main(["--method", name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field, valid in method.RANGES.items():
        flag = "--" + field.replace("_", "-")
        assert re.search(re.escape(flag) + r" \S+ " + re.escape(valid) + r" \[", text), (flag, valid)
