"""The paper's Muon update written out for tests (Algorithm 1; fp64 in, no helpers of the package)."""

import math


def paper_orthogonal_update(x):
    """HybridNS(x) * sqrt(max(rows, cols)) * 0.18, without the module's transpose trick: the
    polynomial is applied from the right for tall matrices, X (a + b XᵀX + c (XᵀX)²)."""
    x = x / x.norm()
    for i in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if i < 8 else (2.0, -1.5, 0.5)
        if x.shape[0] <= x.shape[1]:
            s = x @ x.T
            x = a * x + b * s @ x + c * s @ s @ x
        else:
            s = x.T @ x
            x = a * x + b * x @ s + c * x @ s @ s
    return x * math.sqrt(max(x.shape)) * 0.18
