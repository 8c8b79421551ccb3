"""A frozen Linear layer and its LoRA in one autograd node: `x W^T + b + (s x D^T) U^T`.

Hooking the layer and adding the LoRA branch with separate ops costs, per adapted Linear and per pass, a few extra
passes over activation-sized tensors: the branch's own gradient with respect to `x` is a new tensor that autograd
then adds to the layer's, and small broadcast / transpose helpers copy. On a CPU that is memory-bound for these
skinny products, that is 10-17% of a transformer block's forward + backward at SDXL sizes. Here the branch writes
into the layer's output (forward) and into the layer's input gradient (backward) with in-place `addmm_`, and
every product is a plain 2-D `mm` on contiguous data. Same numbers as the unfused path (tests compare both).

Only for what it can do exactly: a plain `nn.Linear` whose weight and bias are frozen, input in the layer's dtype.
The caller (`LoRAModule.forward`) falls back to the general path otherwise (dropouts, conv layers, stacked hooks).
"""
from __future__ import annotations

import torch


class FusedLoRALinear(torch.autograd.Function):
    """out = x @ weight.T + bias + (scale * x @ down.T) @ up.T, with weight and bias frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        down_c, up_c = down.to(x.dtype), up.to(x.dtype)  # mixed precision: compute in the layer's dtype
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # returned as is: a view could not be changed in place
        out2 = out.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=out2)
        else:
            torch.mm(x2, weight.t(), out=out2)
        hidden = (x2 @ down_c.t()).mul_(scale)
        out2.addmm_(hidden, up_c.t())
        ctx.save_for_backward(x2, weight, down_c, up_c, hidden)  # x2: a view of x unless x was not contiguous
        ctx.x_shape = x.shape
        ctx.scale = scale
        ctx.param_dtypes = (down.dtype, up.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight, down, up, hidden = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        # gradient of x @ down.T, the scale folded in; up as the transpose of a (rank, out) copy: CPU BLAS is
        # several times faster with the skinny operand in that layout, and the copy is tiny
        grad_hidden = (g @ up.t().contiguous().t()).mul_(ctx.scale)
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(grad_hidden, down).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_down = (grad_hidden.t() @ x2).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[4]:
            # (hidden.T @ g).T, not g.T @ hidden: the same product, 3-4x faster on CPU BLAS for these shapes
            grad_up = (hidden.t() @ g).t().to(ctx.param_dtypes[1])
        return grad_x, None, None, grad_down, grad_up, None


def can_fuse(org_module: torch.nn.Module, org_forward, x: torch.Tensor) -> bool:
    """True when `org_forward` is a plain frozen `nn.Linear` call that `FusedLoRALinear` reproduces exactly."""
    if getattr(org_forward, "__func__", None) is not torch.nn.Linear.forward or x.dtype != org_module.weight.dtype:
        return False
    bias = org_module.bias
    if org_module.weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    # under autocast a plain Linear would compute in the autocast dtype: fuse only when that changes nothing
    device = x.device.type
    return not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == x.dtype


def fused_lora_linear(x: torch.Tensor, org_module: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor,
                      scale: float) -> torch.Tensor:
    return FusedLoRALinear.apply(x, org_module.weight, org_module.bias, down, up, scale)
