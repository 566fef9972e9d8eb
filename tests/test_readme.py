"""The README's first screen stays true: the commands it shows are the ones CI runs."""
import os

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = "pip install -r requirements.txt pytest && python -m pytest"
    assert command in readme and command in ci
    assert "pip install -r requirements.txt && python train.py --method meanflow --data toy" in readme
