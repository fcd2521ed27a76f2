"""analysis.finite.all_finite against the naive answer, torch.isfinite(t).all()."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.finite import all_finite

SPECIAL = [float("nan"), float("inf"), float("-inf")]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=40),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_agrees_with_isfinite(values, dtype):
    t = torch.tensor(values, dtype=torch.float32).to(dtype)  # float16 overflow makes Inf too: same answer expected
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("bad", SPECIAL)
@pytest.mark.parametrize("where", [0, 1234, -1])
def test_one_bad_value_anywhere_in_a_large_tensor(bad, where):
    t = torch.randn(3000)
    t[where] = bad
    assert not all_finite(t)
    assert all_finite(torch.randn(3000))


def test_nan_beside_inf_and_both_signs():
    assert not all_finite(torch.tensor([float("inf"), float("nan"), 1.0]))
    assert not all_finite(torch.tensor([float("-inf"), float("inf")]))


def test_integer_bool_empty_and_complex():
    assert all_finite(torch.arange(5))
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor([1 + 2j]))
    assert not all_finite(torch.tensor([complex(1, float("nan"))]))
    assert not all_finite(torch.tensor([complex(float("inf"), 0)]))


def test_works_on_a_tensor_that_requires_grad():
    w = torch.nn.Parameter(torch.randn(4, 4))
    assert all_finite(w)
    with torch.no_grad():
        w[1, 1] = float("nan")
    assert not all_finite(w)
