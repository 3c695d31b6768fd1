"""The tanh GELU (StarCoder's and StarCoder2's MLP activation) and its derivative as Triton device functions, for the
kernels that fuse them into the passes next to them (finetune/fp8_kernels.py, finetune/lora_kernels.py).

gelu(x) = x/2 (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3) (Hendrycks and Gimpel 2016, eq. 3, PyTorch's
approximate="tanh"), and its derivative, in fp32. Both are written with 1 + tanh u and 1 - tanh u taken from
exp(-2|u|) directly (Triton's CPU interpreter has exp but no tanh): within 4e-6 of the exact values where aten's fp32
kernels, taking 1 + tanhf(u) where tanh u is near -1 (x below about -3), lose all their precision there (give 0
where tanhf rounds to -1).
"""

import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
KAPPA = tl.constexpr(0.044715)


@triton.jit
def _one_plus_and_minus_tanh(x):
    """(1 + tanh u, 1 - tanh u) at x's u, each to fp32's relative precision."""
    u = SQRT_2_OVER_PI * (x + KAPPA * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow
    near_zero, near_two = 2.0 * e / (1.0 + e), 2.0 / (1.0 + e)
    return tl.where(u >= 0, near_two, near_zero), tl.where(u >= 0, near_zero, near_two)


@triton.jit
def tanh_gelu(x):
    """The tanh GELU of fp32 `x`."""
    plus, _ = _one_plus_and_minus_tanh(x)
    return 0.5 * x * plus


@triton.jit
def tanh_gelu_derivative(x):
    """d gelu(x) / dx of fp32 `x`: (1 + t)/2 + x/2 (1 - t^2) du/dx, t = tanh u, as (1 + t)/2 (1 + x (1 - t) du/dx)."""
    plus, minus = _one_plus_and_minus_tanh(x)
    return 0.5 * plus * (1.0 + x * minus * SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * x * x))
