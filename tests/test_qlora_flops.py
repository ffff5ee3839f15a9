"""Compiled cost of a QLoRA step: a quantised base through `wrap` forms no full-size gradient.

Three compiled gradient steps of one plain-JAX model, from XLA's cost and
memory analysis (deterministic, nothing runs):

* (a) ``grad`` w.r.t. the adapters of ``wrap`` on the float32 frozen base;
* (b) the same on ``lora_jax.quantize(frozen, "nf4", min_size=1)``;
* (c) full fine-tuning: ``grad`` w.r.t. every weight of the plain model.

(b) − (a) must be only the dequantisation, a few elementwise operations per
weight value, never a weight-gradient matmul; so (b)/(c) stays at (a)/(c).

Two models: two ``[512, 512]`` weights (``relu(x @ w1) @ w2``), and a
residual stack of such layers scanned with ``jax.lax.scan`` over
``[L, 512, 512]`` weights. XLA's cost analysis counts a loop body once,
not once per iteration; all three steps share the loop, so their
differences and ratios compare like with like, and the bounds below are
stated against (c) − (a), the weight-gradient work, which is counted the
same way.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lora
from lora_jax._quantize import is_quantized

D, TOKENS, LAYERS, RANK = 512, 256, 4, 8
MODELS = ("mlp", "scan")
FLOAT32_BYTES = 4
NF4_BYTES_PER_VALUE = 0.5 + 4 / 64  # two codes per byte, one float32 absmax per block of 64


def mlp(params, x):
    return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def scanned(params, x):
    def layer(x, w):
        w1, w2 = w
        return x + jax.nn.relu(x @ w1) @ w2, None

    return jax.lax.scan(layer, x, (params["w1"], params["w2"]))[0]


def _loss(y):
    return jnp.mean(y**2)


@functools.cache
def _steps(model):
    """The three compiled steps of ``model``, with its frozen and quantised trees."""
    fn, shape = (mlp, (D, D)) if model == "mlp" else (scanned, (LAYERS, D, D))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, shape) / D**0.5, "w2": jax.random.normal(k2, shape) / D**0.5}
    x = jax.random.normal(k3, (TOKENS, D))
    spec = lora.LoraSpec(rank=RANK, targets="w1|w2")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(1), trace=lambda p: fn(p, x))
    quantized = lora.quantize(frozen, "nf4", min_size=1)
    assert all(is_quantized(quantized[name]) for name in ("w1", "w2"))

    wrapped = lora.wrap(fn, strict=True)  # strict: dequantising is allowed, forming W + s·A@B is not
    lora_step = jax.jit(jax.grad(lambda ad, base, x: _loss(wrapped(base, ad, x))))
    full_step = jax.jit(jax.grad(lambda p, x: _loss(fn(p, x))))
    return {
        "float": lora_step.lower(adapters, frozen, x).compile(),
        "nf4": lora_step.lower(adapters, quantized, x).compile(),
        "full": full_step.lower(params, x).compile(),
        "frozen": frozen,
        "quantized": quantized,
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("model", MODELS)
def test_nf4_base_adds_only_dequantisation_flops(model):
    steps = _steps(model)
    on_float, on_nf4, full = (_flops(steps[k]) for k in ("float", "nf4", "full"))
    dequant = on_nf4 - on_float
    weight_grads = full - on_float  # what full fine-tuning adds: the weight-gradient matmuls of w1 and w2
    matmul = 2 * TOKENS * D * D  # one weight-gradient matmul, dL/dW = x^T g
    n_weights = 2
    print(
        f"{model}: float {on_float:.4e}  nf4 {on_nf4:.4e}  full {full:.4e}  "
        f"float/full {on_float / full:.4f}  nf4/full {on_nf4 / full:.4f}  "
        f"dequant {dequant:.3e} = {dequant / (n_weights * D * D):.2f} flop/value = "
        f"{dequant / matmul:.4f} x one weight-gradient matmul"
    )
    assert dequant > 0  # the nf4 step really dequantises
    # Elementwise work on each weight value, orders of magnitude below a matmul's 2·tokens per value.
    assert dequant < 0.1 * weight_grads / n_weights
    assert dequant < 0.1 * matmul
    assert on_nf4 < full
    assert abs(on_nf4 / full - on_float / full) < 0.01


def _weight_shaped_dots(compiled) -> list[str]:
    """Dot instructions whose result has a weight's shape ([512, 512], or a stack of them)."""
    pattern = rf"f32\[(?:\d+,)?{D},{D}\]\{{[^}}]*\}} dot\("
    return re.findall(pattern, compiled.as_text())


@pytest.mark.parametrize("model", MODELS)
def test_no_step_through_wrap_has_a_weight_gradient_matmul(model):
    steps = _steps(model)
    assert _weight_shaped_dots(steps["float"]) == []
    assert _weight_shaped_dots(steps["nf4"]) == []
    # The search finds them where they are: full fine-tuning forms dL/dw1 and dL/dw2.
    assert len(_weight_shaped_dots(steps["full"])) == 2


@pytest.mark.parametrize("model", MODELS)
def test_nf4_base_shrinks_the_step_arguments_by_the_nf4_saving(model):
    steps = _steps(model)
    on_float = steps["float"].memory_analysis().argument_size_in_bytes
    on_nf4 = steps["nf4"].memory_analysis().argument_size_in_bytes
    weights = [steps["frozen"][name] for name in ("w1", "w2")]
    codes = [steps["quantized"][name] for name in ("w1", "w2")]
    float_bytes = sum(w.size * FLOAT32_BYTES for w in weights)
    expected = float_bytes - sum(q.nbytes for q in codes)
    saved = on_float - on_nf4
    print(f"{model}: arguments float {on_float}  nf4 {on_nf4}  saved {saved} of {float_bytes} weight bytes")
    assert expected == pytest.approx(float_bytes * (1 - NF4_BYTES_PER_VALUE / FLOAT32_BYTES))
    assert saved == pytest.approx(expected, rel=0.01)


def test_nf4_scan_step_does_not_keep_a_float_copy_of_the_stack():
    steps = _steps("scan")
    on_float = steps["float"].memory_analysis().temp_size_in_bytes
    on_nf4 = steps["nf4"].memory_analysis().temp_size_in_bytes
    one_layer = 2 * D * D * FLOAT32_BYTES  # w1 and w2 of one layer, dequantised
    print(f"scan: temporaries float {on_float}  nf4 {on_nf4}  one layer's float weights {one_layer}")
    # Dequantising where each weight is used needs a layer or two in float at a time, not all of them.
    assert on_nf4 <= on_float + 2 * one_layer
