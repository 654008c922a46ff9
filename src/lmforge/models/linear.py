"""`Linear`: `nn.Linear` whose training-time matrix products on the CPU go through oneDNN.

PyTorch's CPU `F.linear`/`mm` call the BLAS it was built with (MKL on x86). On some CPUs — AMD's
among them — MKL's fp32 GEMM runs well below what oneDNN's own kernels (which PyTorch also ships,
for its fused inference ops) reach on the same shapes: measured here 1.3-2x faster for transformer
training shapes, in all three products of a linear layer:

    forward        y  = x @ W.T + b        (M, K) x (K, N)
    grad input     gx = gy @ W             (M, N) x (N, K)
    grad weight    gW = gy.T @ x           (N, M) x (M, K)      gb = gy.sum(0)

`linear()` routes the three through `torch.ops.mkldnn._linear_pointwise` (oneDNN's matmul; it takes
strided operands, so transposes cost nothing) when it pays and is possible: on the CPU, in fp32, while
autograd records (training). Everything else — inference, other devices and dtypes, autocast — is
plain `F.linear`, so evaluation numerics are PyTorch's own. The results equal `F.linear`'s up to
floating-point summation order.

Where it pays depends on the CPU, so the default follows PyTorch's CPU capability: on with AVX-512
(AMD Zen 4: oneDNN's GEMM 395 GFLOP/s vs MKL's 175; the GPT-2 benchmark step 3.0 s -> 2.0 s), off with
AVX2 only (AMD Zen 3: MKL's 170 GFLOP/s vs oneDNN's 156; the step 3.4 s with MKL, 4.2 s with oneDNN).
The choice is made once per process from the hardware, so reruns and resumed runs take the same path.
LMFORGE_ONEDNN=1 or 0 forces it on or off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

AVAILABLE = torch.backends.mkldnn.is_available()


def _wanted(setting: str | None) -> bool:
    """LMFORGE_ONEDNN's value ("1", "0", unset) -> whether training GEMMs go through oneDNN."""
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"LMFORGE_ONEDNN={setting!r}: use 1 (on), 0 (off), or leave it unset (on with AVX-512)")
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


ENABLED = AVAILABLE and _wanted(os.environ.get("LMFORGE_ONEDNN"))


def _matmul_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) by oneDNN; a (M, K), b (N, K), both 2-D, any strides."""
    return torch.ops.mkldnn._linear_pointwise(_blas_layout(a), _blas_layout(b), bias, "none", [], "")


def _blas_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` as it is when row-major (any row stride) or densely column-major (a plain transpose), else
    a contiguous copy. oneDNN falls back to a reference kernel ~1000x slower on a column-major
    view with padded columns, e.g. the transposed first-token rows `hidden[:, 0].t()` in the pooler's
    weight gradient (130 ms instead of 0.1 ms for a 384 x 32 x 384 product)."""
    row_major, col_major = t.stride(1) == 1, t.stride(0) == 1
    if row_major or (col_major and t.stride(1) == t.shape[0]):
        return t
    return t.contiguous()


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a (M, K), b (N, K): oneDNN on the CPU in fp32 (module docstring), else torch.mm."""
    if ENABLED and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.numel() and b.numel():
        return _matmul_t(a, b)
    return a @ b.t()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        return _matmul_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])  # (M, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _matmul_t(gy2, weight.t()).view(ctx.shape)  # gy @ W: (M, K)
        if ctx.needs_input_grad[1]:
            gw = _matmul_t(gy2.t(), x2.t())  # gy.T @ x: (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; through oneDNN when training on the CPU in fp32 (module docstring)."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) computing through `linear()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
