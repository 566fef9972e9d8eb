"""shortcut.py against the official JAX code (kvfrans/shortcut-models at 6010043) through the checks of
benchmarks/shortcut_official.py: batch layout, bootstrap and flow targets, per-row loss, sampler. Slow, and skipped
unless SHORTCUT_OFFICIAL names a checkout of that repository and jax is installed:

    SHORTCUT_OFFICIAL=path/to/shortcut-models python -m pytest tests/test_shortcut_official.py -m slow
"""
import os

import pytest

from conftest import benchmark

bench = benchmark("shortcut_official")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def get_targets():
    folder = os.environ.get("SHORTCUT_OFFICIAL")
    if not folder:
        pytest.skip("SHORTCUT_OFFICIAL is unset: point it at a checkout of kvfrans/shortcut-models (6010043)")
    pytest.importorskip("jax", reason="jax is not installed: pip install jax")
    return bench.load_official(folder)


def assert_within(rows):
    failed = [f"{name}: {diff:.2e} > {tol:.0e}" for name, diff, tol in rows if not diff <= tol]
    assert not failed, failed


@pytest.mark.parametrize("cond, every, M, bias", bench.CASES)
def test_layout_targets_and_loss_match_the_official_code(get_targets, cond, every, M, bias):
    assert_within(bench.check_layout(get_targets, cond, every, M, bias))
    assert_within(bench.check_targets_and_loss(get_targets, cond, every, M, bias))


@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("M", [128, 8])
def test_sampler_matches_the_official_euler_loop(get_targets, cond, M):
    assert_within(bench.check_sampler(cond, M))
