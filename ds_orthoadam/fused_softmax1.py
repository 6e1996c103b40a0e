"""Causal softmax-1 attention from a fused softmax kernel's output and log-sum-exp, with the kernel's own backward.

With L_i the log-sum-exp of row i's (scaled, causal) logits, softmax-1 attention is ordinary attention scaled per row:

    y_i = out_i * s_i,   s_i = sigmoid(L_i)   (= Z_i / (1 + Z_i), Z_i = sum_j exp(x_ij))

so the fused kernels (flash / memory-efficient), which return L, compute it at the cost of plain causal attention —
no extra sink position, no mask tensor. For the backward pass the kernels recompute the probabilities P from L and
form dS = P * (dO V^T - rowsum(dO * out)). Handing them dO = s * g and out = y gives

    dS_ij = s_i P_ij (g_i . v_j - g_i . y_i) = P1_ij (g_i . v_j - g_i . y_i),   P1 = s * P = softmax-1 probabilities,

which is exactly softmax-1's gradient (and dV = P^T (s g) = P1^T g). The identity is checked in float64 in
``tests/test_attention.py``.

The kernels are private aten ops, so each (device, dtype, kernel) is checked once per process against the
zero-sink SDPA path on a small random problem; a kernel that fails or disagrees is not used (with a warning) and the
caller falls back to the zero-sink path.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class _Kernel:
    """A fused causal attention kernel: forward -> (out, lse, extras), backward(grad, q, k, v, out, lse, extras)."""

    name: str
    forward: Callable
    backward: Callable


def _cpu_forward(q, k, v, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _cpu_backward(grad, q, k, v, out, lse, extras, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True, scale=scale)


def _cuda_flash_forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, philox_seed, philox_offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, philox_seed, philox_offset)


def _cuda_flash_backward(grad, q, k, v, out, lse, extras, scale):
    cum_q, cum_k, max_q, max_k, philox_seed, philox_offset = extras
    return aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, philox_seed, philox_offset, scale=scale
    )


def _cuda_efficient_forward(q, k, v, scale):
    out, lse, philox_seed, philox_offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, True, scale=scale
    )
    return out, lse, (philox_seed, philox_offset)


def _cuda_efficient_backward(grad, q, k, v, out, lse, extras, scale):
    philox_seed, philox_offset = extras
    grad_q, grad_k, grad_v, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, philox_seed, philox_offset, 0.0, [True, True, True, False], True, scale=scale
    )
    return grad_q, grad_k, grad_v


CPU_FLASH = _Kernel("cpu_flash", _cpu_forward, _cpu_backward)
CUDA_FLASH = _Kernel("cuda_flash", _cuda_flash_forward, _cuda_flash_backward)
CUDA_EFFICIENT = _Kernel("cuda_efficient", _cuda_efficient_forward, _cuda_efficient_backward)


def _select_kernel(query: torch.Tensor) -> _Kernel | None:
    if query.device.type == "cpu":
        return CPU_FLASH
    if query.device.type != "cuda":
        return None
    flash_ok = (
        query.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(query.device) >= (8, 0)
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= 256
    )
    return CUDA_FLASH if flash_ok else CUDA_EFFICIENT


class _FusedCausalSoftmax1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale: float, kernel: _Kernel):
        out, lse, extras = kernel.forward(query, key, value, scale)
        compute_dtype = torch.promote_types(out.dtype, torch.float32)
        # The memory-efficient kernel pads the log-sum-exp along T to a multiple of 32.
        gate = torch.sigmoid(lse[..., : query.shape[2]].to(compute_dtype)).unsqueeze(-1)
        result = (out.to(compute_dtype) * gate).to(out.dtype)
        ctx.save_for_backward(query, key, value, result, lse, gate)
        ctx.scale, ctx.kernel, ctx.extras = scale, kernel, extras
        return result

    @staticmethod
    def backward(ctx, grad):
        query, key, value, result, lse, gate = ctx.saved_tensors
        gated_grad = (grad.to(gate.dtype) * gate).to(grad.dtype).contiguous()
        grad_q, grad_k, grad_v = ctx.kernel.backward(gated_grad, query, key, value, result, lse, ctx.extras, ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def _run(query, key, value, scale: float, kernel: _Kernel) -> torch.Tensor:
    return _FusedCausalSoftmax1.apply(query.contiguous(), key.contiguous(), value.contiguous(), scale, kernel)


_VERIFIED: dict[tuple, bool] = {}


def _agrees_with_reference(kernel: _Kernel, like: torch.Tensor, reference: Callable) -> bool:
    """Forward and backward of ``kernel`` on a small random problem versus ``reference`` (the zero-sink path)."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    shape = (2, 2, 37, like.shape[-1])
    tensors = [torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype).requires_grad_() for _ in "qkv"]
    grad = torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
    scale = like.shape[-1] ** -0.5
    tol = 1e-4 if like.dtype == torch.float32 or like.dtype == torch.float64 else 3e-2
    try:
        fused = _run(*tensors, scale, kernel)
        fused_grads = torch.autograd.grad(fused, tensors, grad)
        expected = reference(*tensors, scale)
        expected_grads = torch.autograd.grad(expected, tensors, grad)
    except RuntimeError as error:
        warnings.warn(f"fused softmax-1 kernel {kernel.name} unavailable ({error}); using the zero-sink SDPA path")
        return False
    pairs = [(fused, expected), *zip(fused_grads, expected_grads)]
    if all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in pairs):
        return True
    warnings.warn(f"fused softmax-1 kernel {kernel.name} disagrees with the reference; using the zero-sink SDPA path")
    return False


def fused_causal_softmax1(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, reference: Callable
) -> torch.Tensor | None:
    """Causal softmax-1 attention [B, H, T, D] through a fused kernel, or None where none is usable.

    ``reference(q, k, v, scale)`` is the trusted path the kernel is checked against once per (device, dtype, head
    dimension, kernel) in this process.
    """
    kernel = _select_kernel(query)
    if kernel is None:
        return None
    key_ = (query.device.type, query.dtype, query.shape[-1], kernel.name)
    if key_ not in _VERIFIED:
        if torch.is_inference_mode_enabled():  # the check needs autograd; verify on the next ordinary call
            return None
        with torch.enable_grad():
            _VERIFIED[key_] = _agrees_with_reference(kernel, query, reference)
    return _run(query, key, value, scale, kernel) if _VERIFIED[key_] else None
