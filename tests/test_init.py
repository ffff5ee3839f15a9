"""PiSSA / OLoRA initialisation against NumPy's SVD and QR, and against PEFT itself."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import _init
from lora_jax._init import init_factors
from lora_jax._tree import LoraFactors

# (shape, stack, a_axes, b_axes): a Dense kernel, an nn.scan stack, DenseGeneral's
# [D, H, hd], an output projection [H, hd, D], and a stack axis in the middle.
LAYOUTS = {
    "dense": ((12, 10), (), (0,), (1,)),
    "stacked": ((3, 12, 10), (0,), (1,), (2,)),
    "dense-general": ((10, 3, 4), (), (0,), (1, 2)),
    "out-proj": ((3, 4, 10), (), (0, 1), (2,)),
    "stack-in-middle": ((12, 2, 10), (1,), (0,), (2,)),
}
RANK = 3
SCALE = 0.5


def _weight(shape, stack, a_axes, b_axes, seed=0, decay=None):
    """A float32 weight whose every stacked matrix has well-separated singular values."""
    rng = np.random.default_rng(seed)
    p = math.prod(shape[i] for i in stack)
    m, n = math.prod(shape[i] for i in a_axes), math.prod(shape[i] for i in b_axes)
    k = min(m, n)
    mats = []
    for _ in range(p):
        u, _ = np.linalg.qr(rng.standard_normal((m, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)))
        s = decay ** np.arange(k) if decay is not None else np.linspace(2.0, 0.2, k) * rng.uniform(0.8, 1.2)
        mats.append((u * s) @ v.T)
    perm = (*stack, *a_axes, *b_axes)
    w = np.stack(mats).reshape(*(shape[i] for i in perm))
    return np.transpose(w, np.argsort(perm)).astype(np.float32)


def _as_matrices(x, stack, a_axes, b_axes):
    """A weight-layout array as NumPy float64 [P, in, out]."""
    x = np.asarray(x, np.float64)
    x = np.transpose(x, (*stack, *a_axes, *b_axes))
    p = math.prod(x.shape[: len(stack)])
    m = math.prod(x.shape[len(stack) : len(stack) + len(a_axes)])
    return x.reshape(p, m, -1)


def _factor_matrices(a, b, stack):
    """``A`` as [P, in, r] and ``B`` as [P, r, out], NumPy float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    p = math.prod(a.shape[: len(stack)])
    r = a.shape[-1]
    return a.reshape(p, -1, r), b.reshape(p, r, -1)


def _init_case(name, method, **kw):
    shape, stack, a_axes, b_axes = LAYOUTS[name]
    w = _weight(shape, stack, a_axes, b_axes)
    a, b, residual = init_factors(
        jnp.asarray(w), stack=stack, a_axes=a_axes, b_axes=b_axes, rank=RANK, scale=SCALE, method=method, **kw
    )
    return w, (stack, a_axes, b_axes), a, b, residual


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_residual_plus_delta_is_the_weight(name, method):
    w, (stack, a_axes, b_axes), a, b, residual = _init_case(name, method)
    shape = w.shape
    assert a.shape == (*(shape[i] for i in stack), *(shape[i] for i in a_axes), RANK)
    assert b.shape == (*(shape[i] for i in stack), RANK, *(shape[i] for i in b_axes))
    assert residual.shape == shape and residual.dtype == w.dtype
    # The library's own layout code (LoraFactors.delta) puts the product back in W's layout.
    delta = LoraFactors(a, b, SCALE, stack, a_axes, b_axes).delta()
    np.testing.assert_allclose(np.asarray(residual) + np.asarray(delta), w, atol=2e-6)
    # ... and NumPy's, independently, on [P, in, out] matrices.
    a_m, b_m = _factor_matrices(a, b, stack)
    np.testing.assert_allclose(
        _as_matrices(residual, stack, a_axes, b_axes) + SCALE * a_m @ b_m,
        _as_matrices(w, stack, a_axes, b_axes),
        atol=2e-6,
    )
    # The adapter carries a real part of W, not nothing.
    assert np.abs(SCALE * a_m @ b_m).max() > 0.1


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pissa_is_the_truncated_svd_of_each_matrix(name):
    w, (stack, a_axes, b_axes), a, b, residual = _init_case(name, "pissa")
    mats = _as_matrices(w, stack, a_axes, b_axes)
    a_m, b_m = _factor_matrices(a, b, stack)
    res = _as_matrices(residual, stack, a_axes, b_axes)
    for i, m in enumerate(mats):  # every stacked entry on its own
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        best = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
        np.testing.assert_allclose(SCALE * a_m[i] @ b_m[i], best, atol=5e-6)
        # PiSSA's property: A^T A = B B^T = diag(S_r) / scale.
        np.testing.assert_allclose(a_m[i].T @ a_m[i], np.diag(s[:RANK] / SCALE), atol=1e-5)
        np.testing.assert_allclose(b_m[i] @ b_m[i].T, np.diag(s[:RANK] / SCALE), atol=1e-5)
        # What stays frozen is the rest of the spectrum.
        np.testing.assert_allclose(np.linalg.norm(res[i], 2), s[RANK], rtol=1e-5)
        np.testing.assert_allclose(np.linalg.svd(res[i], compute_uv=False)[: len(s) - RANK], s[RANK:], atol=1e-5)


def _positive_diagonal(a, b):
    """Flips the sign of each rank component so that ``A[i, i] > 0`` (QR is unique up to these signs)."""
    d = np.sign(np.diagonal(a[: a.shape[1]]))
    return a * d, b * d[:, None]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_olora_matches_numpy_qr_of_the_torch_layout(name):
    w, (stack, a_axes, b_axes), a, b, residual = _init_case(name, "olora")
    mats = _as_matrices(w, stack, a_axes, b_axes)
    a_m, b_m = _factor_matrices(a, b, stack)
    for i, m in enumerate(mats):
        # PEFT: Q, R = qr(weight) with weight = M^T ([out, in]); lora_B = Q[:, :r], lora_A = R[:r].
        q, r = np.linalg.qr(m.T)
        want_a, want_b = _positive_diagonal(r[:RANK].T, q[:, :RANK].T)
        got_a, got_b = _positive_diagonal(a_m[i], b_m[i])
        np.testing.assert_allclose(got_a, want_a, atol=1e-5)
        np.testing.assert_allclose(got_b, want_b, atol=1e-5)
        # B has orthonormal rows: in PEFT's layout, lora_B's columns are Q's.
        np.testing.assert_allclose(b_m[i] @ b_m[i].T, np.eye(RANK), atol=1e-6)
        # A^T is upper triangular (R's first rows).
        assert np.abs(np.tril(a_m[i].T, -1)).max() < 1e-6


def _peft_linear(init, in_features, out_features, rank, alpha, seed=0):
    """A torch Linear with PEFT's adapter initialised by ``init``, and its original weight."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    weight = model[0].weight.detach().numpy().copy()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init)
    layer = peft.inject_adapter_in_model(config, model)[0]
    return (
        weight,
        layer.lora_A["default"].weight.detach().numpy(),
        layer.lora_B["default"].weight.detach().numpy(),
        layer.base_layer.weight.detach().numpy(),
        layer.scaling["default"],
    )


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_matches_peft(method):
    rank, alpha = 3, 12  # scale 4: PEFT's OLoRA does not divide the scale out, PiSSA does
    weight, peft_a, peft_b, peft_base, scale = _peft_linear(method, 9, 7, rank, alpha)
    assert scale == 4.0
    a, b, residual = init_factors(
        jnp.asarray(weight.T), stack=(), a_axes=(0,), b_axes=(1,), rank=rank, scale=scale, method=method
    )
    a, b = np.asarray(a), np.asarray(b)
    want_a, want_b = peft_a.T, peft_b.T  # torch's lora_A [r, in], lora_B [out, r]
    if method == "olora":
        a, b = _positive_diagonal(a, b)
        want_a, want_b = _positive_diagonal(want_a, want_b)
    else:  # singular vectors are unique up to sign: align on each column's largest entry
        flip = lambda x: np.sign(x[np.abs(x).argmax(0), np.arange(x.shape[1])])
        d, dw = flip(a), flip(want_a)
        a, b, want_a, want_b = a * d, b * d[:, None], want_a * dw, want_b * dw[:, None]
    np.testing.assert_allclose(a, want_a, atol=1e-5)
    np.testing.assert_allclose(b, want_b, atol=1e-5)
    np.testing.assert_allclose(np.asarray(residual), peft_base.T, atol=1e-5)


@pytest.mark.parametrize("name", ["stacked", "dense-general"])  # tall [12, 10] and wide [10, 12] matrices
def test_randomised_svd_approximates_the_exact_one(name):
    # Singular values 1, 0.1, 0.01, ...: the subspace iterations converge like (s_4 / s_3)^(2·niter + 1).
    shape, stack, a_axes, b_axes = LAYOUTS[name]
    w = jnp.asarray(_weight(shape, stack, a_axes, b_axes, seed=3, decay=0.1))
    kw = dict(stack=stack, a_axes=a_axes, b_axes=b_axes, rank=RANK, scale=SCALE, method="pissa")
    exact = LoraFactors(*init_factors(w, **kw)[:2], SCALE, stack, a_axes, b_axes).delta()

    def rel_error(niter):
        a, b, residual = init_factors(w, niter=niter, key=jax.random.key(1), **kw)
        approx = LoraFactors(a, b, SCALE, stack, a_axes, b_axes).delta()
        # Whatever the approximation, the residual makes up the difference.
        np.testing.assert_allclose(np.asarray(residual + approx), np.asarray(w), atol=2e-6)
        return float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))

    close, rough = rel_error(2), rel_error(0)
    assert close < 1e-5, close  # measured 6e-7 (tall) and 5e-7 (wide)
    assert rough > 100 * close, (rough, close)  # measured 0.057 and 0.002: the iterations do the work


def test_dtype_and_jit():
    w32 = jnp.asarray(_weight((16, 8), (), (0,), (1,), seed=4))
    w = w32.astype(jnp.bfloat16)
    kw = dict(stack=(), a_axes=(0,), b_axes=(1,), rank=2, scale=2.0, method="pissa")
    a, b, residual = init_factors(w, **kw)
    assert a.dtype == b.dtype == residual.dtype == jnp.bfloat16
    # Merged in float32 and cast back (as lora_jax.merge does), the residual gives W back up to bf16 rounding.
    merged = (residual.astype(jnp.float32) + 2.0 * a.astype(jnp.float32) @ b.astype(jnp.float32)).astype(w.dtype)
    np.testing.assert_allclose(np.asarray(merged, np.float32), np.asarray(w, np.float32), atol=2e-2)
    a32, _, _ = init_factors(w, dtype=jnp.float32, **kw)
    assert a32.dtype == jnp.float32
    jitted = jax.jit(lambda x: init_factors(x, **kw))(w32)
    for x, y in zip(jitted, init_factors(w32, **kw)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="svd"), ValueError, r"`method` must be one of \('pissa', 'olora'\); got 'svd'"),
        (dict(method="pissa_niter_4"), ValueError, r"method='pissa', niter=4"),
        (dict(rank=9), ValueError, r"`rank` must be an integer in \[1, min\(in, out\)\] = \[1, 8\].*got 9"),
        (dict(rank=0), ValueError, r"`rank` must be an integer"),
        (dict(scale=0.0), ValueError, r"`scale` must be a positive finite number"),
        (dict(scale="2"), TypeError, r"`scale` must be a positive number"),
        (dict(niter=2), TypeError, r"needs `key`.*key=jax.random.key\(0\)"),
        (dict(niter=-1, key=jax.random.key(0)), ValueError, r"`niter` must be None"),
        (dict(method="olora", niter=2), ValueError, r"`niter` \(2\) only applies to method='pissa'"),
        (dict(a_axes=(0, 1)), ValueError, r"must together name each axis of `w` \(shape \(8, 12\)"),
        (dict(b_axes=()), ValueError, r"a_axes and b_axes non-empty"),
        (dict(stack=None), TypeError, r"must be tuples of axis indices"),
        (dict(dtype=jnp.int32), TypeError, r"`dtype` must be a float dtype"),
    ],
)
def test_errors(kwargs, error, match):
    args = dict(stack=(), a_axes=(0,), b_axes=(1,), rank=2, scale=1.0, method="pissa") | kwargs
    with pytest.raises(error, match=match):
        init_factors(jnp.ones((8, 12)), **args)


@pytest.mark.parametrize(
    "w, match",
    [
        (jnp.ones((8, 12), jnp.int32), r"`w` has dtype int32; PiSSA and OLoRA decompose float weights only"),
        ([[1.0, 2.0]], r"`w` must be a float array"),
    ],
)
def test_weight_errors(w, match):
    with pytest.raises(TypeError, match=match):
        init_factors(w, stack=(), a_axes=(0,), b_axes=(1,), rank=1, scale=1.0, method="olora")


def test_docstring_examples():
    result = doctest.testmod(_init, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- through `split`: LoraSpec(init=...) ----------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_split_with_a_weight_init_starts_at_the_base_model_and_freezes_the_residual(init):
    import lora_jax as lora

    k = jax.random.split(jax.random.key(11), 3)
    params = {"w": jax.random.normal(k[0], (16, 12)), "stack": jax.random.normal(k[1], (3, 8, 6)), "b": jnp.ones(6)}
    x = jax.random.normal(k[2], (5, 16))

    def fn(p, x):
        h = x @ p["w"]  # [5, 12]
        return jnp.einsum("bi,lio->lbo", h[:, :8], p["stack"]) + p["b"]

    spec = lora.LoraSpec(rank=3, targets=["w", "stack"], init=init)
    frozen, adapters = lora.split(params, spec, key=jax.random.key(0), trace=lambda p: fn(p, x))
    # The frozen tree holds W - s·A@B, not W: its own outputs differ from the base model's.
    assert not np.allclose(frozen["w"], params["w"], atol=1e-2)
    assert not np.allclose(fn(frozen, x), fn(params, x), atol=1e-2)
    np.testing.assert_array_equal(frozen["b"], params["b"])
    # ... and base + adapter gives the pretrained weight back, so the wrapped model starts at the base.
    merged = lora.merge(frozen, adapters)
    for name in ("w", "stack"):
        np.testing.assert_allclose(merged[name], params[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.wrap(fn, strict=True)(frozen, adapters, x), fn(params, x), rtol=1e-4, atol=1e-4)
    # B is not zero, so gradients reach both factors from step 0.
    assert float(jnp.abs(adapters["w"].lora_b).max()) > 0


def test_split_rejects_an_unknown_init():
    import lora_jax as lora

    with pytest.raises(ValueError, match=r"LoraSpec.init must be .*'pissa_niter_<k>'.*got 'pisa'"):
        lora.LoraSpec(init="pisa")
