"""flowmap.py against the loss terms of the flow-map code (nmboffi/flow-maps, py/common/losses.py) through the checks
of benchmarks/flowmap_official.py: each row's loss for LSD, ESD and PSD (uniform, midpoint), every tangent, with and
without the learned weight, and the gradient where both differentiate the same expression. Slow, and skipped unless
FLOWMAP_OFFICIAL names a checkout of that repository and jax is installed:

    FLOWMAP_OFFICIAL=path/to/flow-maps python -m pytest tests/test_flowmap_official.py -m slow
"""
import os

import pytest

from conftest import benchmark

bench = benchmark("flowmap_official")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def losses():
    folder = os.environ.get("FLOWMAP_OFFICIAL")
    if not folder:
        pytest.skip("FLOWMAP_OFFICIAL is unset: point it at a checkout of nmboffi/flow-maps")
    pytest.importorskip("jax", reason="jax is not installed: pip install jax flax ml_collections")
    return bench.load_official(folder)


@pytest.mark.parametrize("kind, psd_type, tangent, weight", bench.CASES)
def test_rows_and_gradient_match_the_official_loss_terms(losses, kind, psd_type, tangent, weight):
    rows = bench.check(losses, kind, psd_type, tangent, weight)
    failed = [f"{name}: {diff:.2e} > {tol:.0e}" for name, diff, tol in rows if not diff <= tol]
    assert not failed, failed
