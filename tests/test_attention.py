"""--mem_eff_attn: the plain-PyTorch chunked attention gives SDPA's outputs and gradients, in the bare function
and as the processor of a tiny U-Net; the trainer and the generator install it."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from library import train_args
from library.attention import ChunkedAttnProcessor, chunked_attention
from library.train_setup import set_attention
from tests.conftest import tiny_models


def test_chunked_attention_equals_sdpa_with_and_without_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.rand(2, 1, 37, 29 + 8, generator=g) > 0.2
    keep[..., 0] = True  # every query sees at least one key
    float_mask = torch.randn(2, 3, 1, 37, generator=g)
    for mask in (None, keep, float_mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = chunked_attention(q, k, v, mask, chunk_size=10)  # 4 chunks, the last one short
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unet_with_chunked_processor_matches_sdpa_outputs_and_gradients():
    from diffusers.models.attention_processor import AttnProcessor2_0

    m = tiny_models("sd1")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, m.unet.config.cross_attention_dim, generator=g)
    results = []
    for processor in (AttnProcessor2_0(), ChunkedAttnProcessor(chunk_size=16)):  # 64 tokens: 4 chunks
        m.unet.set_attn_processor(processor)
        m.unet.zero_grad()
        out = m.unet(latents, torch.tensor([10, 500]), context).sample
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.unet.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.abs().max() > 0.1
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-4)
    assert len(grads_a) == len(grads_b) > 10
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_mem_eff_attn_installs_the_chunked_processor_on_any_device():
    m = tiny_models("sd1")
    set_attention(m.unet, argparse.Namespace(xformers=False, mem_eff_attn=True))
    processors = m.unet.attn_processors
    assert processors and all(isinstance(p, ChunkedAttnProcessor) for p in processors.values())
    assert train_args.attention_problem(argparse.Namespace(xformers=False, mem_eff_attn=True)) is None
    set_attention(m.unet, argparse.Namespace(xformers=False, mem_eff_attn=False))
    assert not any(isinstance(p, ChunkedAttnProcessor) for p in m.unet.attn_processors.values())
