"""Focal losses at the extremes against mpmath: logits 0, +-1e-8 ... +-1e4, gamma in
{0, 0.5, 1, 2, 5}, hard and soft targets, float32 and float64 (see extremes_focal.py)."""

from __future__ import annotations

import pytest
import torch

from _helpers import ULP
from extremes_focal import measure_sigmoid_focal, measure_softmax_focal

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("t", (1.0, 0.0, 0.3))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_sigmoid_focal_is_exact_at_the_extremes(dtype, t, gamma):
    m = measure_sigmoid_focal(dtype, t, gamma)
    w = m.worst()
    assert w["value_ulp_ours"] <= ULP["focal"], w
    assert w["grad_ulp_ours"] <= ULP["focal"], w
    if t in (0.0, 1.0) and gamma > 0:
        # the 1 - sigmoid formula loses the confident elements (thousands of ulp up to a
        # relative error of 1): the grid really reaches the region where it matters
        assert w["value_ulp_torch"] > 1000


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("target_is_max", (True, False))
def test_softmax_focal_is_exact_at_the_extremes(dtype, gamma, target_is_max):
    m = measure_softmax_focal(dtype, gamma, target_is_max)
    w = m.worst()
    assert w["value_ulp_ours"] <= ULP["focal"], w
    assert w["grad_ulp_ours"] <= ULP["focal"], w


@pytest.mark.backends("reference", "chunked-torch")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("t", (1.0, 0.3))
@pytest.mark.parametrize("gamma", (0.5, 2.0))
def test_every_backend_is_exact_at_the_extremes(backend, dtype, t, gamma):
    for m in (
        measure_sigmoid_focal(dtype, t, gamma, backend=backend),
        measure_softmax_focal(dtype, gamma, t == 1.0, backend=backend),
    ):
        w = m.worst()
        assert w["value_ulp_ours"] <= ULP["focal"], (m.name, w)
        assert w["grad_ulp_ours"] <= ULP["focal" if backend != "reference" else "focal_reference_grad"], (m.name, w)
