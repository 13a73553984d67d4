"""Mixed-precision matrix products: bf16 operands, f32 accumulation, f32 master-weight gradients.

The policy (``model.dtype = "bfloat16"``; Micikevicius et al. 2018, "Mixed Precision Training", §3):

* parameters and optimiser state stay f32 (``model.param_dtype``): the optimiser updates f32 masters;
* every projection multiplies **bf16 activations by a bf16 copy of the f32 weight, accumulating in
  f32** (:func:`matmul`); its weight gradient is computed from bf16 operands and returned **in f32**, so
  no gradient is ever rounded to bf16 before it reaches the master weight;
* the decoders' residual stream is **f32** (llama, gpt2): each norm's output is cast to bf16 for the
  projections, and the attention-output and down projections return their f32 accumulator straight into
  the stream (``out_dtype``), so the sum of 30 layers' updates is not rounded to bf16 after every layer
  (this halves the bf16 log-prob error on SmolLM2 against a bf16 stream); the projections' inputs and
  outputs, MLP hidden states and attention outputs are bf16;
* norms compute their statistics in f32 (``layers.rms_norm``/``layer_norm``), RoPE rotates in f32, the
  attention softmax runs in f32, and the LM head returns **f32 logits** (``out_dtype``), so that
  log-softmax over the vocabulary, log-probs, KL and every loss see the f32 accumulator rather than a
  bf16 rounding of it (a bf16 logit of magnitude 20 is off by up to 0.06 nats);
* the sampler keeps its KV cache in bf16.

Why a custom VJP. XLA:CPU runs a dot through its fast bf16 kernel (YNNPACK) only when the operands are
bf16, the **result is f32**, both operands are row-major and the left operand contracts its last axis
(``xla/backends/cpu/ynn_support.cc``, ``IsDotSupportedByYnn``). Every other bf16 dot is *upcast*: XLA
converts both operands to f32 and runs the f32 kernel, so a plain ``x_bf16 @ w_bf16`` costs the f32
matmul plus three conversions, slower than f32 alone. That was why jaxrlhf's bf16 step was slower than
its f32 step. Autodiff of ``x @ w`` gives (i) an f32 cotangent when the forward result was f32 and
(ii) a weight gradient ``x^T @ dy`` whose left operand contracts its first axis; both are upcast. The
VJP below casts the cotangent to bf16 and feeds the weight gradient a physically transposed ``x``
(:func:`_transposed_copy`), so all three products of a projection (forward, input gradient, weight
gradient) take the bf16 kernel. On GPU/TPU the same code is simply a bf16 x bf16 -> f32 matmul, which
is what cuBLAS and the MXU do natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["matmul", "is_low_precision"]

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(dtype) -> bool:
    """True for bf16/f16: the dtypes whose products go through :func:`matmul`."""
    return jnp.dtype(dtype) in _LOW


def _transposed_copy(x_MK: Array) -> Array:
    """``x.T`` as a row-major ``[K, M]`` array in memory, not a transposed view of ``x``.

    XLA folds a transpose into the consuming dot (or gives it a column-major layout), which makes the
    dot non-canonical for the CPU bf16 kernel. Routing the transpose through an optimization barrier
    with a unit axis forces a real row-major copy (``K·M`` bf16 elements, a few percent of the dot's
    time). Elsewhere (GPU/TPU) the copy is cheap and harmless.
    """
    K, M = x_MK.shape[1], x_MK.shape[0]
    return jax.lax.optimization_barrier(x_MK.T[:, None, :]).reshape(K, M)


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


# rhs contracting axis: 0 for a [K, N] weight, 1 for a [N, K] weight used transposed (a tied LM head).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mp_matmul(x_MK: Array, w: Array, out_dtype, w_transposed: bool) -> Array:
    return _dot(x_MK, w.astype(x_MK.dtype), ((1,), (1 if w_transposed else 0,))).astype(out_dtype)


def _mp_matmul_fwd(x_MK, w, out_dtype, w_transposed):
    w_low = w.astype(x_MK.dtype)
    y = _dot(x_MK, w_low, ((1,), (1 if w_transposed else 0,))).astype(out_dtype)
    # The master's dtype rides along as a zero-size array (residuals must be arrays).
    return y, (x_MK, w_low, jnp.zeros((0,), w.dtype))


def _mp_matmul_bwd(out_dtype, w_transposed, res, dy_MN):
    x_MK, w_low, w_dtype_tag = res
    dy = dy_MN.astype(x_MK.dtype)
    if w_transposed:                                                    # w_low: [N, K]
        dx = _dot(dy, w_low, ((1,), (0,)))                              # [M, N] . [N, K]
        dw = _dot(_transposed_copy(dy), x_MK, ((1,), (0,)))            # [N, M] . [M, K]
    else:                                                               # w_low: [K, N]
        dx = _dot(dy, w_low, ((1,), (1,)))                              # [M, N] . [K, N]^T
        dw = _dot(_transposed_copy(x_MK), dy, ((1,), (0,)))            # [K, M] . [M, N]
    return dx.astype(x_MK.dtype), dw.astype(w_dtype_tag.dtype)


_mp_matmul.defvjp(_mp_matmul_fwd, _mp_matmul_bwd)


def matmul(x_MK: Array, w: Array, out_dtype=None, *, w_transposed: bool = False) -> Array:
    """``x @ w`` (or ``x @ w.T`` with ``w_transposed``) under the mixed-precision policy above.

    Args:
      x_MK: ``[M, K]`` activations; their dtype is the compute dtype.
      w: ``[K, N]`` weight, or ``[N, K]`` with ``w_transposed=True`` (a tied LM head multiplies by the
        ``[V, D]`` embedding this way, with no transposed copy of it), in any float dtype (normally the
        f32 master); cast to ``x``'s dtype for the product.
      out_dtype: result dtype; default ``x``'s dtype. Pass ``jnp.float32`` to keep the f32 accumulator
        (the LM head's logits).

    Returns:
      ``[M, N]`` in ``out_dtype``. Accumulation is f32 when ``x`` is bf16/f16. Gradients: ``d x`` in
      ``x``'s dtype, ``d w`` in ``w``'s dtype (f32 for f32 masters), both from low-precision operands
      with f32 accumulation.

    For f32 ``x`` this is a plain f32 product (XLA's own autodiff; nothing to gain from the custom VJP).
    """
    out_dtype = jnp.dtype(out_dtype or x_MK.dtype)
    if not is_low_precision(x_MK.dtype):
        w = w.astype(x_MK.dtype)
        return (x_MK @ (w.T if w_transposed else w)).astype(out_dtype)
    return _mp_matmul(x_MK, w, out_dtype, w_transposed)
