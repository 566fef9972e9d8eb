"""The README's first screen stays true: its file table's line counts and the commands CI runs."""
import os
import re

from conftest import ROOT


def test_file_table_line_counts_are_current():
    """Every `| [`path`](...) | N |` row is within 10 % of the file (or folder of .py files) it names."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| \[`([^`]+)`\]\([^)]*\) \| (\d+) \|", readme, flags=re.M)
    assert len(rows) >= 5
    for path, claimed in rows:
        full = os.path.join(ROOT, path)
        files = [os.path.join(full, f) for f in os.listdir(full) if f.endswith(".py")] if os.path.isdir(full) else [full]
        actual = sum(open(f).read().count("\n") for f in files)
        assert abs(actual - int(claimed)) <= 0.1 * actual, f"README says {path} has {claimed} lines; it has {actual}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = "pip install -r requirements.txt pytest && python -m pytest"
    assert command in readme and command in ci
    assert "pip install -r requirements.txt && python train.py --method meanflow --data toy" in readme
