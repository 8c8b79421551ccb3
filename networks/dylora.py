"""DyLoRA (`--network_module=networks.dylora`): one training run yields LoRAs of every rank unit, 2*unit, ..., dim.

As in the DyLoRA paper (arXiv 2210.07558), each training step draws a rank b = k * unit (k uniform in
1..dim/unit) for the whole network; every module then computes `alpha / b * up[:, :b] @ down[:b]` (exactly what
the rank-b LoRA cut from the file computes) and only the newest rank chunk `[b - unit, b)` is trained; the lower
chunks are frozen for that step (each chunk is its own parameter, so the optimizer leaves them alone).
Outside training the full rank is used, and the saved file has ordinary LoRA keys (`lora_down.weight`,
`lora_up.weight`, `alpha`): it loads as a plain LoRA, and `networks/extract_lora_from_dylora.py` cuts it into
one LoRA per rank. DyLoRA-C3Lier needs `conv_dim` equal to `network_dim`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import torch

from library.file_io import load_state_dict
from networks import lora
from networks.lora_blocks import to_float, to_int
from networks.lora_names import LoRANameResolver

logger = logging.getLogger(__name__)

UNSUPPORTED_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                    "mid_lr_weight", "up_lr_weight", "rank_dropout", "module_dropout")


class _RankState:
    """The rank chunk count drawn for the current step, shared by all modules of one network (None: per call)."""

    def __init__(self):
        self.chunks: int | None = None


class DyLoRAModule(lora.LoRAModule):
    """A LoRA module whose rank is split into `dim / unit` chunks, each a separate parameter pair."""

    fused_linear = False  # the trained rank changes per step (lora_hidden)

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: Any = 1, unit: int = 1, rank_state: _RankState | None = None, **kwargs):
        if unit < 1 or lora_dim % unit:
            raise ValueError(f"network_args unit={unit}: the rank of {lora_name} ({lora_dim}) must be a multiple of unit")
        self.unit = unit
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, **kwargs)
        self.rank_state = rank_state or _RankState()

    @property
    def n_chunks(self) -> int:
        return self.lora_dim // self.unit

    def _create_layers(self, org: torch.nn.Module) -> None:
        if self.is_conv:
            in_dim, out_dim = org.in_channels, org.out_channels
            down_shape, up_tail = (self.lora_dim, in_dim, *org.kernel_size), (1, 1)
            self.stride, self.padding = org.stride, org.padding
        else:
            in_dim, out_dim = org.in_features, org.out_features
            down_shape, up_tail = (self.lora_dim, in_dim), ()
        down = torch.empty(down_shape)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        for i, chunk in enumerate(down.split(self.unit, dim=0)):
            self.register_parameter(f"lora_A_{i}", torch.nn.Parameter(chunk.clone()))
            self.register_parameter(f"lora_B_{i}", torch.nn.Parameter(torch.zeros(out_dim, self.unit, *up_tail)))

    def _chunks(self, name: str) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_{name}_{i}") for i in range(self.n_chunks)]

    def down_weight(self, chunks: int | None = None) -> torch.Tensor:
        return torch.cat(self._chunks("A")[:chunks], dim=0)

    def up_weight(self, chunks: int | None = None) -> torch.Tensor:
        return torch.cat(self._chunks("B")[:chunks], dim=1)

    def _trained_prefix(self, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Down / up weights of the first `chunks` chunks, with all but the newest detached (frozen this step)."""
        a, b = self._chunks("A")[:chunks], self._chunks("B")[:chunks]
        down = torch.cat([p.detach() for p in a[:-1]] + [a[-1]], dim=0)
        up = torch.cat([p.detach() for p in b[:-1]] + [b[-1]], dim=1)
        return down, up

    def lora_hidden(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            chunks = self.rank_state.chunks
            if chunks is None:  # no step hook from the trainer: draw per call (torch RNG, so checkpointing replays it)
                chunks = int(torch.randint(1, self.n_chunks + 1, (1,)).item())
            chunks = min(chunks, self.n_chunks)
            down, up = self._trained_prefix(chunks)
            scale = scale * self.lora_dim / (chunks * self.unit)  # alpha / b instead of alpha / dim
        else:
            down, up = self.down_weight(), self.up_weight()
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.is_conv:
            hidden = torch.nn.functional.conv2d(x, down, stride=self.stride, padding=self.padding)
        else:
            hidden = torch.nn.functional.linear(x, down)
        if self.training and self.dropout:
            hidden = torch.nn.functional.dropout(hidden, p=self.dropout)
        return hidden * scale, up

    # ---- files hold ordinary LoRA keys ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        cat = (lambda t: t) if keep_vars else (lambda t: t.detach())
        destination[prefix + "lora_down.weight"] = cat(self.down_weight())
        destination[prefix + "lora_up.weight"] = cat(self.up_weight())
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, name, dim in (("lora_down.weight", "A", 0), ("lora_up.weight", "B", 1)):
            full = state_dict.get(prefix + key)
            if full is None:
                missing_keys.append(prefix + key)
                continue
            expected = self.down_weight() if name == "A" else self.up_weight()
            if full.shape != expected.shape:
                error_msgs.append(f"size mismatch for {prefix + key}: file {tuple(full.shape)}, "
                                  f"module {tuple(expected.shape)}")
                continue
            with torch.no_grad():
                for param, chunk in zip(self._chunks(name), full.split(self.unit, dim=dim)):
                    param.copy_(chunk)
        if prefix + "alpha" in state_dict:
            with torch.no_grad():
                self.alpha.copy_(state_dict[prefix + "alpha"])
            self.scale = float(self.alpha.float().item()) / self.lora_dim
        elif strict:
            missing_keys.append(prefix + "alpha")
        if strict:
            known = {prefix + k for k in ("lora_down.weight", "lora_up.weight", "alpha")}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)


class DyLoRANetwork(lora.LoRANetwork):
    """A LoRA network of DyLoRA modules; `on_step_start` draws the rank of the next step."""

    def __init__(self, text_encoder, unet, unit: int = 1, **kwargs):
        self.rank_state = _RankState()
        self.unit = unit
        super().__init__(text_encoder, unet, module_class=DyLoRAModule, unit=unit, rank_state=self.rank_state,
                         **kwargs)
        dims = {m.lora_dim for m in self.text_encoder_loras + self.unet_loras}
        self.max_chunks = max(dims) // unit if dims else 1

    def on_step_start(self, *args, **kwargs) -> None:
        """Draw the rank b = k * unit for this step (k uniform in 1..dim/unit), the same for every module."""
        self.rank_state.chunks = int(torch.randint(1, self.max_chunks + 1, (1,)).item())

    def set_rank(self, rank: int | None) -> None:
        """Fix the training rank (a multiple of unit), or None to draw per call when no step hook runs."""
        self.rank_state.chunks = None if rank is None else max(1, rank // self.unit)


def _parse(kwargs: Mapping[str, Any], network_dim: Any, network_alpha: Any) -> dict:
    unknown = sorted(set(kwargs) - set(UNSUPPORTED_ARGS) - {"unit", "conv_dim", "conv_alpha"})
    if unknown:
        logger.warning("network_args not used by networks.dylora: %s", ", ".join(unknown))
    used = [name for name in UNSUPPORTED_ARGS if kwargs.get(name) is not None]
    if used:
        raise ValueError(f"network_args {', '.join(used)}: not supported by networks.dylora (use networks.lora)")
    dim = to_int("network_dim", network_dim) or 4
    alpha = to_float("network_alpha", network_alpha)
    unit = to_int("unit", kwargs.get("unit")) or 1
    if dim % unit:
        raise ValueError(f"network_args unit={unit}: network_dim {dim} must be a multiple of unit")
    conv_dim = to_int("conv_dim", kwargs.get("conv_dim"))
    if conv_dim and conv_dim != dim:
        raise ValueError(f"network_args conv_dim={conv_dim}: DyLoRA-C3Lier needs conv_dim equal to network_dim ({dim})")
    conv_alpha = to_float("conv_alpha", kwargs.get("conv_alpha")) if conv_dim else None
    return {"lora_dim": dim, "alpha": 1.0 if alpha is None else alpha, "unit": unit, "conv_lora_dim": conv_dim or None,
            "conv_alpha": (1.0 if conv_alpha is None else conv_alpha) if conv_dim else None}


def create_network(multiplier: float, network_dim: Any, network_alpha: Any, vae, text_encoder, unet,
                   neuron_dropout: Any = None, **kwargs) -> DyLoRANetwork:
    """A DyLoRA network: `--network_dim` (a multiple of `unit`), `--network_args unit=N [conv_dim=dim conv_alpha=A]`."""
    args = _parse(kwargs, network_dim, network_alpha)
    logger.info("DyLoRA: dim %d, unit %d (ranks %s)", args["lora_dim"], args["unit"],
                ", ".join(str(r) for r in range(args["unit"], args["lora_dim"] + 1, args["unit"])))
    return DyLoRANetwork(text_encoder, unet, multiplier=multiplier,
                         dropout=to_float("neuron_dropout", neuron_dropout), **args)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[lora.LoRANetwork, dict]:
    """A network matching a (Dy)LoRA file. For inference a plain LoRA network (a DyLoRA file is an ordinary
    LoRA); otherwise a DyLoRA network to continue training, with `unit` from kwargs (default 1)."""
    if for_inference:
        return lora.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd, True, **kwargs)
    if weights_sd is None:
        weights_sd = load_state_dict(file)
    resolver = LoRANameResolver(text_encoder, unet)
    sd = lora.normalize_weights(weights_sd, resolver=resolver, source=str(file or "<weights_sd>"))
    dims, alphas = lora.infer_modules_dim_alpha(sd)
    for name, dim in dims.items():
        sd.setdefault(f"{name}.alpha", torch.tensor(float(dim)))
    unit = to_int("unit", kwargs.get("unit")) or 1
    network = DyLoRANetwork(text_encoder, unet, unit=unit, multiplier=multiplier, modules_dim=dims,
                            modules_alpha=alphas)
    return network, sd


__all__ = ["DyLoRAModule", "DyLoRANetwork", "create_network", "create_network_from_weights"]
