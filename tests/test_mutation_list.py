"""benchmarks/mutations.py stays runnable: every listed mutation's original text occurs exactly once in its method file,
and every mutation changes it. (Running the mutations is the script's job, not the default suite's.)"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import mutations  # noqa: E402


@pytest.mark.parametrize("method", list(mutations.MUTATIONS))
def test_every_mutation_applies_to_exactly_one_place(method):
    assert mutations.check_lines(method) == []
    assert len(mutations.MUTATIONS[method]) >= 8
    assert all(old != new for old, new, _ in mutations.MUTATIONS[method])
