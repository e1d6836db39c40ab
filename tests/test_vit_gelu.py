"""The ViT's exact GELU with a lean backward pass: same values as jax.nn.gelu, same derivative to rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslvit.models.ops import gelu

X = np.concatenate([np.linspace(-12, 12, 2001), [-40.0, -8.5, -1e-4, 0.0, 1e-4, 3.3, 40.0]]).astype(np.float32)


def test_values_are_jax_exact_gelu_bit_for_bit():
    x = jnp.asarray(X)
    np.testing.assert_array_equal(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_derivative_matches_autodiff_of_jax_gelu(dtype, tol):
    x = jnp.asarray(X, dtype)
    ours = jax.vmap(jax.grad(gelu))(x)
    ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    # and the closed form Φ(x) + x φ(x) in float64
    x64 = X.astype(np.float64)
    from math import erf, exp, pi, sqrt

    exact = np.array([0.5 * (1 + erf(v / sqrt(2))) + v * exp(-0.5 * v * v) / sqrt(2 * pi) for v in x64])
    np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=tol, atol=tol)


def test_backward_keeps_only_the_input():
    """One residual of the input's size (JAX's own rule for jax.nn.gelu keeps several)."""
    x = jnp.ones((64, 32))
    _, vjp = jax.vjp(gelu, x)
    _, vjp_ref = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), x)
    big = lambda f: sum(1 for leaf in jax.tree.leaves(f) if getattr(leaf, "shape", ()) == x.shape)  # noqa: E731
    assert big(vjp) == 1 and big(vjp_ref) > 1
