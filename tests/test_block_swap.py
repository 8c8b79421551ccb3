"""--blocks_to_swap: weights visit the compute device layer by layer (also in checkpointed backward), same results."""
from __future__ import annotations

import logging

import pytest
import torch

from library.block_swap import SDXL_BLOCKS, BlockSwap, apply_block_swap, swappable_blocks
from tests.conftest import tiny_models
from tests.train_helpers import base_args, parse, solid_dataset, tiny_model_dir


def _lora_steps(unet, swap_last: int, steps: int = 2):
    import networks.lora as lora

    torch.manual_seed(0)
    net = lora.create_network(1.0, 4, 4, None, [None, None], unet)
    net.apply_to([None, None], unet, False, True)
    unet.enable_gradient_checkpointing()
    unet.train()
    swap = None
    if swap_last:
        blocks = swappable_blocks(unet)[-swap_last:]
        swap = BlockSwap([m for _, modules in blocks for m in modules], torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        context = torch.randn(2, 77, 72, generator=gen)
        added = {"text_embeds": torch.randn(2, 24, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
        out = unet(x, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, swap


def test_blocks_are_the_original_layout_in_forward_order():
    unet = tiny_models("sdxl").unet
    names = [name for name, _ in swappable_blocks(unet)]
    assert len(names) == SDXL_BLOCKS == 18
    assert names[:2] == ["input_blocks.1", "input_blocks.2"] and names[8] == "middle_block"
    assert names[9] == "output_blocks.0" and names[-1] == "output_blocks.8"


def test_swapped_weights_move_in_before_each_layer_and_back_after():
    unet = tiny_models("sdxl").unet
    blocks = swappable_blocks(unet)[-3:]
    swap = BlockSwap([m for _, modules in blocks for m in modules], torch.device("cpu"))
    stored = {id(t): host for pairs in swap.stored.values() for t, host in pairs}
    layer = swap.layers[0]
    seen = []

    def during(module, inputs):  # registered after the swap's hook: runs once the weights are in
        seen.append(all(t.data_ptr() != host.data_ptr() for t, host in swap.stored[module]))
    layer.register_forward_pre_hook(during)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, 72)
    added = {"text_embeds": torch.randn(1, 24), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        swapped_out = unet(x, torch.tensor([10]), ctx, added_cond_kwargs=added).sample
    assert seen == [True]  # a fresh device copy while the layer ran
    params = [p for _, modules in blocks for m in modules for p in m.parameters()]
    assert params and all(p.data_ptr() == stored[id(p)].data_ptr() for p in params)  # back on the stored copy
    assert swap.fetches == len(swap.layers)
    swap.remove()
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor([10]), ctx, added_cond_kwargs=added).sample, swapped_out)


def test_training_with_swapped_blocks_gives_the_plain_weights():
    plain, _ = _lora_steps(tiny_models("sdxl").unet, 0)
    swapped, swap = _lora_steps(tiny_models("sdxl").unet, 5)
    # each step: every layer once in forward, the checkpointed ones (all but a few projections) again in backward
    assert 2 * 1.5 * len(swap.layers) < swap.fetches < 2 * 2 * len(swap.layers)
    assert plain.keys() == swapped.keys()
    for k in plain:
        torch.testing.assert_close(swapped[k], plain[k], rtol=1e-6, atol=1e-7)


def test_cpu_training_ignores_it_with_a_warning(caplog):
    unet = tiny_models("sdxl").unet
    with caplog.at_level(logging.WARNING):
        assert apply_block_swap(unet, 4, torch.device("cpu")) is None
    assert "--blocks_to_swap 4: training on the CPU" in caplog.text


@pytest.mark.parametrize("extra, sdxl, message", [
    (["--blocks_to_swap", "19", "--gradient_checkpointing"], True, "has 18 swappable blocks .*use 1 to 18"),
    (["--blocks_to_swap", "0", "--gradient_checkpointing"], True, "use 1 to 18"),
    (["--blocks_to_swap", "4"], True, "needs --gradient_checkpointing"),
    (["--blocks_to_swap", "4", "--gradient_checkpointing", "--torch_compile"], True, "cannot be combined"),
    (["--blocks_to_swap", "4", "--gradient_checkpointing"], False, "is for SDXL"),
])
def test_bad_values_are_refused_before_loading(tmp_path, extra, sdxl, message):
    from library import train_args

    args = parse(base_args(tiny_model_dir(), solid_dataset(tmp_path), tmp_path / "o", *extra), sdxl)
    with pytest.raises(ValueError, match=message):
        train_args.validate_args(args, sdxl=sdxl)
