"""Integration rules: where along the straight path from baseline to input the model is evaluated.

Each rule maps a number of points ``n`` to the interpolation coefficients ``alphas`` in
``[0, 1]`` (ascending). Layer conductance evaluates the layer at ``n_steps + 1`` of these
points and takes finite differences between neighbours, so it needs the points only, not the
quadrature weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import scipy.special

from explainer.errors import AttributionError

__all__ = ["METHODS", "alphas", "check_method", "quadrature"]


def _riemann_left(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / n


def _riemann_right(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float64) / n


def _riemann_middle(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def _riemann_trapezoid(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n, dtype=np.float64)


# Up to this many points the rule comes from numpy's ``leggauss``, as in the reference; beyond
# it numpy's eigenvalue method grows as n**3 (about 3 s at 4096 points, minutes at 16384) and
# scipy's ``roots_legendre`` gives the same rule (1e-14 apart at 1024 points) in seconds.
_NUMPY_LEGENDRE_MAX = 1024


@functools.lru_cache(maxsize=32)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-1, 1], computed once per ``n``."""
    if n <= _NUMPY_LEGENDRE_MAX:
        nodes, weights = np.polynomial.legendre.leggauss(n)
    else:
        nodes, weights = scipy.special.roots_legendre(n)
    nodes.flags.writeable = weights.flags.writeable = False
    return nodes, weights


def _gauss_legendre(n: int) -> np.ndarray:
    return 0.5 * (_legendre(n)[0] + 1.0)


_ALPHAS: dict[str, Callable[[int], np.ndarray]] = {
    "riemann_right": _riemann_right,
    "riemann_left": _riemann_left,
    "riemann_middle": _riemann_middle,
    "riemann_trapezoid": _riemann_trapezoid,
    "gausslegendre": _gauss_legendre,
}

METHODS: tuple[str, ...] = tuple(_ALPHAS)


def check_method(method: str) -> None:
    """Raise :class:`AttributionError` unless ``method`` names a known rule."""
    if method not in _ALPHAS:
        raise AttributionError(
            f"Unknown integration method {method!r}. Choose one of: {', '.join(METHODS)}."
        )


def _check_points(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise AttributionError(
            f"An integration rule needs at least 2 points, got {n!r}; use n_steps >= 1."
        )


def alphas(method: str, n: int) -> list[float]:
    """The ``n`` interpolation coefficients of ``method``, ascending, as Python floats."""
    check_method(method)
    _check_points(n)
    return _ALPHAS[method](int(n)).tolist()


def _weights(method: str, n: int) -> np.ndarray:
    if method == "gausslegendre":
        return 0.5 * _legendre(n)[1]
    step = np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":  # the reference halves the end steps of 1/n
        step[0] /= 2
        step[-1] /= 2
    return step


def quadrature(method: str, n: int) -> tuple[list[float], list[float]]:
    """The ``n`` points of ``method`` and their weights (step sizes), as the reference defines
    them for methods that integrate gradients at the points (neuron conductance). The
    Gauss-Legendre rule works from one point, the Riemann rules from two."""
    check_method(method)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise AttributionError(f"n_steps must be a positive integer, got {n!r}.")
    if n < 2 and method != "gausslegendre":
        raise AttributionError(
            f"The {method} rule needs n_steps >= 2 (got {n}); use more steps or gausslegendre."
        )
    return _ALPHAS[method](int(n)).tolist(), _weights(method, int(n)).tolist()
