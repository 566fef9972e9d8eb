"""The "copy one file" promise (README "Copying a file into your project"): every script of examples/ runs in an empty
folder that holds only the method files it may import, with PYTHONPATH unset, and imports nothing else of the
repository. A smoke run each (--smoke: 10 steps per stage, 256 samples); the full runs' ratios are in their
docstrings."""
import ast
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, background, waited

EXAMPLES = os.path.join(ROOT, "examples")
# Each example and the repository files it may import: its method file, diffusion.py where the method needs a teacher
# or an init, cm.py for tcm (tcm.py imports it; stage 1 is a CM run).
ALLOWED = {
    "diffusion_2d.py": ("diffusion.py",),
    "meanflow_2d.py": ("meanflow.py",),
    "cm_ct_2d.py": ("cm.py", "diffusion.py"),
    "cm_cd_2d.py": ("cm.py", "diffusion.py"),
    "tcm_2d.py": ("tcm.py", "cm.py", "diffusion.py"),
    "scm_sct_2d.py": ("scm.py", "diffusion.py"),
    "scm_scd_2d.py": ("scm.py", "diffusion.py"),
    "shortcut_2d.py": ("shortcut.py",),
    "flowmap_2d.py": ("flowmap.py",),
}


def repository_modules():
    """Names a script could import from the checkout: top-level .py files and folders."""
    names = set()
    for entry in os.listdir(ROOT):
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(os.path.join(ROOT, entry)) and not entry.startswith("."):
            names.add(entry)
    return names


def imported_modules(path):
    """Top-level names of every import statement in a file (anywhere in it); relative imports as '.'."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_every_example_is_listed():
    assert sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py")) == sorted(ALLOWED)


@pytest.mark.parametrize("script", sorted(ALLOWED))
def test_example_imports_only_its_allowed_files(script):
    imported = imported_modules(os.path.join(EXAMPLES, script))
    allowed = {f[:-3] for f in ALLOWED[script]}
    assert "." not in imported
    assert imported & repository_modules() <= allowed, f"{script} imports {imported & repository_modules() - allowed}"
    # The rest is what a user's project already has: the standard library and torch.
    assert all(name in sys.stdlib_module_names or name == "torch" for name in imported - allowed), imported - allowed
    # The method itself is used: every allowed file is imported (the list stays tight).
    assert allowed <= imported


@background("smoke_runs")
def run_every_example(folder):
    """Every example's smoke run, each alone in a folder of its own: {script: CompletedProcess}."""
    runs = {}
    for script in ALLOWED:
        os.makedirs(folder / script[:-3])
        for name in (script, *ALLOWED[script]):
            shutil.copy(os.path.join(EXAMPLES if name == script else ROOT, name), folder / script[:-3] / name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        runs[script] = subprocess.run([sys.executable, script, "--smoke"], cwd=folder / script[:-3], env=env,
                                      capture_output=True, text=True, timeout=300)
    return runs


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    return waited("smoke_runs", tmp_path_factory)


@pytest.mark.parametrize("script", sorted(ALLOWED))
def test_example_runs_next_to_its_files_alone(script, smoke_runs):
    p = smoke_runs[script]
    assert p.returncode == 0, p.stderr[-3000:]
    found = re.findall(r"^ratio (\S+) ", p.stdout, flags=re.M)
    assert len(found) == (2 if script in ("shortcut_2d.py", "flowmap_2d.py") else 1), p.stdout[-2000:]  # 1 and 8 steps
    assert all(math.isfinite(float(v)) for v in found), p.stdout[-2000:]


def test_copied_pieces_stay_identical():
    """The examples repeat their network, data, score and loop on purpose (each stands alone); every piece marked
    `# Copied from <script>: <name>` equals its source, and every repeated piece is marked."""
    def pieces(path):
        text = open(path).read()
        return text, {n.name: ast.get_source_segment(text, n) for n in ast.parse(text).body
                      if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    folder = os.path.join(ROOT, "examples")
    scripts = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    marked = 0
    for script in scripts:
        text, own = pieces(os.path.join(folder, script))
        for source, name in re.findall(r"^# Copied from (\w+\.py): (\w+)$", text, flags=re.M):
            assert own[name] == pieces(os.path.join(folder, source))[1][name], f"{script}: {name} differs from {source}"
            marked += 1
        for name in ("ring_of_gaussians", "sliced_w2", "score", "train"):
            assert script == "diffusion_2d.py" or f"# Copied from diffusion_2d.py: {name}\n" in text, (script, name)
    assert marked >= 4 * (len(scripts) - 1)
