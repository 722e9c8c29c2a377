"""The report's objective-vs-parameter plots use a log x axis exactly when the values span decades."""

import pytest

from dsv4_train.report import x_scale


@pytest.mark.parametrize("values,scale", [
    ([1e-4, 3e-3, 1e-2], "log"),     # a learning-rate search: two decades
    ([2, 6, 10, 18], "linear"),      # warm-up steps: under one decade
    ([7.2e-4, 2.4e-2], "log"),       # tiny_lr_sweep's learning rates: 1.5 decades
    ([1e-4, 9.9e-4], "linear"),      # just under one decade
    ([0.0, 1e-3, 1.0], "linear"),    # zero has no logarithm
])
def test_log_scale_when_values_span_a_decade(values, scale):
    assert x_scale(values) == scale
