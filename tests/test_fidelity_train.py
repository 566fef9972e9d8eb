"""train.py's share of fidelity: separate --teacher and --init whitelists (a consistency model is no PF-ODE teacher),
and --tf32 (off in every preset, as the reference runs)."""
import pytest
import torch

import recipe
import train
from test_train import run


def test_a_consistency_model_is_no_teacher(tmp_path):
    """An sCM run is refused as an sCD / CD teacher (one-line error); scm.INIT still lists it (test_fidelity_scm)."""
    scm_run = run(tmp_path, "--method", "scm", "--data", "toy", "--steps", "1", "--batch", "8", out="scm")
    for method in ("scm", "cm"):
        with pytest.raises(SystemExit, match="cannot use a scm checkpoint as --teacher"):
            train.cli(["--method", method, "--data", "toy", "--teacher", scm_run, "--out", str(tmp_path / f"student-{method}"),
                       "--steps", "1"])


class Stop(Exception):
    pass


@pytest.mark.parametrize("flag, on", [([], False), (["--tf32", "on"], True), (["--tf32", "off"], False)])
def test_tf32_flag_sets_both_backends(tmp_path, monkeypatch, flag, on):
    """Set before anything runs (the run is stopped at data loading)."""
    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(train.data, "load", stop)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not on
        with pytest.raises(Stop):
            train.main(["--method", "diffusion", "--data", "toy", "--out", str(tmp_path / "x"), *flag])
        assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_tf32_off_in_every_preset():
    import importlib
    for name in recipe.METHODS:
        method = importlib.import_module(name)
        for preset, values in method.PRESETS.items():
            assert values.get("tf32", recipe.TRAIN_DEFAULTS["tf32"]) == "off", f"{name} {preset}"
