"""LoKr's delta applied to a layer input without forming `kron(w1, w2)`, and a frozen Linear + its LoKr as one node.

A LoKr module adds `scale * kron(w1, w2)` to a weight of shape (a*b, c*d[, kh, kw]), w1 (a, c), w2 (b, d[, kh, kw])
or `w2 = w2_a (b, r) @ w2_b (r, d*kh*kw)`. For an input x viewed as (tokens, c, d), `kron(w1, w2) x = w1 X w2^T` per
token. With a decomposed w2 the cheapest order is LoRA's: `down` (w2_b over d: one (tokens*c, d) x (d, r) GEMM on a
contiguous view of x), `mix` (w1 over c on the rank-sized hidden: a (tokens*r, c) x (c, a) GEMM on a small
transposed copy), `up` (w2_a: one (tokens*a, r) x (r, b) GEMM whose (tokens*a, b) result is a contiguous view of the
layer output). That costs about a LoRA of rank r, where forming the delta costs one extra full weight-gradient
product per layer in backward and applying w2 first costs b/r times more.

- `lokr_delta(x, ...)`: the delta for a Linear or a Conv2d as composed torch ops (autograd differentiates it); a conv
  runs `down` as a convolution of x viewed as (N*c, d, H, W) with w2 (or w2_b) as the kernel, `up` as a 1x1 one.
- `FusedLoKrLinear`: a frozen `nn.Linear` and its LoKr (decomposed w2) in one autograd node, as
  `networks.lora_fused` does for LoRA: the delta is added into the layer's output (forward) and input gradient
  (backward) with in-place `addmm_`, every product a 2-D GEMM. Same numbers as `lokr_delta` (tests compare both).

The caller (`networks.lokr.LoKrModule`) uses the node for a plain frozen Linear without rank dropout and `lokr_delta`
otherwise; Tucker modules and `dora_wd` go through the updated weight (`networks.adapters`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mix(hidden: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """(T, c, k) -> (T, a, k): `w1 @ hidden[t]` for every t as one GEMM over a transposed copy."""
    tokens, c, k = hidden.shape
    mixed = hidden.transpose(1, 2).reshape(tokens * k, c) @ w1.t()  # (T*k, a)
    return mixed.view(tokens, k, w1.shape[0]).transpose(1, 2)


def lokr_delta(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, w2_a: torch.Tensor | None,
               w2_b: torch.Tensor | None, scale: float, conv: dict | None = None) -> torch.Tensor:
    """`scale * kron(w1, w2)` applied to x: a Linear's (..., c*d) input, or with `conv` (stride, padding, dilation)
    a Conv2d's (N, c*d, H, W) one. Give `w2` (b, d[, kh, kw]) or `w2_a` (b, r) and `w2_b` (r, d*kh*kw)."""
    a, c = w1.shape
    w1 = w1 * scale
    if conv is None:
        lead, (in_dim,) = x.shape[:-1], x.shape[-1:]
        tokens = x.reshape(-1, c, in_dim // c)  # (T, c, d)
        if w2 is not None:
            return _mix(tokens @ w2.t(), w1).reshape(*lead, a * w2.shape[0])
        hidden = _mix(tokens @ w2_b.t(), w1)  # (T, a, r)
        return (hidden @ w2_a.t()).reshape(*lead, a * w2_a.shape[0])
    n, channels, height, width = x.shape
    d = channels // c
    kernel = w2 if w2 is not None else w2_b.reshape(w2_b.shape[0], d, *conv["kernel_size"])
    hidden = F.conv2d(x.reshape(n * c, d, height, width), kernel, None, conv["stride"], conv["padding"],
                      conv["dilation"])  # (N*c, k, H', W')
    k, out_h, out_w = hidden.shape[1:]
    mixed = w1 @ hidden.reshape(n, c, k * out_h * out_w)  # (N, a, k*H'*W')
    if w2 is not None:
        return mixed.reshape(n, a * k, out_h, out_w)
    out = F.conv2d(mixed.reshape(n * a, k, out_h, out_w), w2_a.reshape(*w2_a.shape, 1, 1))
    return out.reshape(n, a * w2_a.shape[0], out_h, out_w)


class FusedLoKrLinear(torch.autograd.Function):
    """out = x @ weight.T + bias + scale * kron(w1, w2_a @ w2_b) x, with weight and bias frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: torch.Tensor,
                w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float) -> torch.Tensor:
        (a, c), (b, rank) = w1.shape, w2_a.shape
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # viewed as (T*c, d) below
        tokens = x2.shape[0]
        w1_s, w2_a_c, w2_b_c = (w1 * scale).to(x.dtype), w2_a.to(x.dtype), w2_b.to(x.dtype)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        out2 = out.view(tokens, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=out2)
        else:
            torch.mm(x2, weight.t(), out=out2)
        down = x2.view(tokens * c, -1) @ w2_b_c.t()  # (T*c, r)
        down_t = down.view(tokens, c, rank).transpose(1, 2).reshape(tokens * rank, c)  # (T*r, c), small copy
        mixed = (down_t @ w1_s.t()).view(tokens, rank, a).transpose(1, 2).reshape(tokens * a, rank)  # (T*a, r)
        out2.view(tokens * a, b).addmm_(mixed, w2_a_c.t())
        ctx.save_for_backward(x2, weight, w1_s, w2_a_c, w2_b_c, down_t, mixed)
        ctx.x_shape, ctx.scale = x.shape, scale
        ctx.param_dtypes = (w1.dtype, w2_a.dtype, w2_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight, w1_s, w2_a, w2_b, down_t, mixed = ctx.saved_tensors
        (a, c), (b, rank) = w1_s.shape, w2_a.shape
        tokens = x2.shape[0]
        g = grad.reshape(tokens, -1).to(x2.dtype).contiguous()  # viewed as (T*a, b) below
        g_up = g.view(tokens * a, b)
        grad_mixed = g_up @ w2_a  # (T*a, r)
        grad_mixed_t = grad_mixed.view(tokens, a, rank).transpose(1, 2).reshape(tokens * rank, a)  # (T*r, a)
        grad_down = (grad_mixed_t @ w1_s).view(tokens, rank, c).transpose(1, 2).reshape(tokens * c, rank)
        grad_x = grad_w1 = grad_w2_a = grad_w2_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_x.view(tokens * c, -1).addmm_(grad_down, w2_b)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_w1 = ((grad_mixed_t.t() @ down_t) * ctx.scale).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_w2_a = (mixed.t() @ g_up).t().to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[5]:
            grad_w2_b = (grad_down.t() @ x2.view(tokens * c, -1)).to(ctx.param_dtypes[2])
        return grad_x, None, None, grad_w1, grad_w2_a, grad_w2_b, None


def fused_lokr_linear(x: torch.Tensor, org_module: torch.nn.Linear, w1: torch.Tensor, w2_a: torch.Tensor,
                      w2_b: torch.Tensor, scale: float) -> torch.Tensor:
    return FusedLoKrLinear.apply(x, org_module.weight, org_module.bias, w1, w2_a, w2_b, scale)
