"""LoRA networks for Stable Diffusion (LoRA-LierLa and LoRA-C3Lier), with kohya's `networks.lora` API.

`create_network(...)` builds a network for training (`--network_module=networks.lora`), and
`create_network_from_weights(...)` one that matches a saved file (dims, alphas and conv modules inferred).
`LoRANetwork.apply_to` hooks each target layer's forward so that it returns
`org(x) + multiplier * (alpha / dim) * up(down(x))` without touching the original weights; `merge_to` folds the
delta into the weights instead. Names of modules and keys come from `networks.lora_names`; block-wise settings
(`block_dims`, `down_lr_weight`, ...) are parsed in `networks.lora_blocks`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping

import torch

from library.file_io import load_state_dict
from networks import lora_blocks, loraplus
from networks.lora_fused import can_fuse, fused_lora_linear
from networks.lora_files import (LORA_PARTS, conform_shapes, normalize_weights, safetensors_hashes,  # noqa: F401
                                 save_lora_file)
from networks.lora_names import LoRANameResolver, LoRATarget, is_sdxl_unet, lora_targets, split_key

logger = logging.getLogger(__name__)


def add_up_projection(out: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """`out + up(hidden)`, accumulated into `out` in place when the dtypes agree.

    The layer output is a fresh tensor that no backward pass needs (Linear / Conv2d save their inputs, not
    their outputs), so adding in place is safe for autograd and saves a pass over the output. The in-place op
    works on `out` itself, never on a view of it: an in-place op on a view makes autograd clone the whole
    gradient in backward (CopySlices), which costs more than the pass saved.
    """
    up = up.to(hidden.dtype)  # under autocast the hidden is in the low precision
    if out.dtype != hidden.dtype:
        delta = torch.nn.functional.conv2d(hidden, up) if is_conv else torch.nn.functional.linear(hidden, up)
        return out + delta.to(out.dtype)
    if is_conv:
        return out.add_(torch.nn.functional.conv2d(hidden, up))
    if out.dim() == 2:
        return out.addmm_(hidden, up.t())
    if out.dim() == 3:
        return out.baddbmm_(hidden, up.t().unsqueeze(0).expand(out.shape[0], -1, -1))
    return out.add_(torch.nn.functional.linear(hidden, up))


class LoRAModule(torch.nn.Module):
    """A low-rank adapter of one Linear / Conv2d layer: `lora_down` (carries a conv's kernel), `lora_up` (1x1)."""

    fused_linear = True  # a frozen nn.Linear and this adapter run as one autograd node (networks.lora_fused)

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        self.is_conv3x3 = self.is_conv and tuple(org_module.kernel_size) != (1, 1)
        self._create_layers(org_module)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # a list: the original layer must not become a submodule (not saved, not moved)
        self.org_forward = None

    def _create_layers(self, org: torch.nn.Module) -> None:
        if self.is_conv:
            self.lora_down = torch.nn.Conv2d(org.in_channels, self.lora_dim, org.kernel_size, org.stride, org.padding,
                                             bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org.out_features, bias=False)
        # as Microsoft's LoRA: random down, zero up, so a fresh module changes nothing
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Hook the original layer: its forward now runs ours (which calls the previous forward)."""
        if self.org_forward is not None:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo `apply_to` (only valid when no network was applied on top of this one afterwards)."""
        if self.org_forward is not None:
            self.org_module.forward = self.org_forward
            self.org_forward = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "alpha" in state_dict:
            self.scale = float(self.alpha.float().item()) / self.lora_dim

    def lora_hidden(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scale * down(x), up weight)` with the training-time dropouts applied to the rank-sized hidden."""
        weight = self.lora_down.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        lx = self.lora_down(x)
        if self.training:
            if self.dropout:
                lx = torch.nn.functional.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
                if self.is_conv:
                    mask = mask[:, :, None, None]  # (B, rank, H, W)
                elif lx.dim() == 3:
                    mask = mask.unsqueeze(1)  # (B, tokens, rank)
                lx = lx * mask.to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank had changed
        return lx * scale, self.lora_up.weight  # scaling the rank-sized tensor is cheaper than the output

    def lora_delta(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """`scale * up(down(x))` on its own (the forward adds it to the layer output without this copy)."""
        hidden, up = self.lora_hidden(x, scale)
        up = up.to(hidden.dtype)
        return torch.nn.functional.conv2d(hidden, up) if self.is_conv else torch.nn.functional.linear(hidden, up)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0:
            return self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return self.org_forward(x, *args, **kwargs)
        if self.fused_linear and not (self.training and (self.dropout or self.rank_dropout)) and not args \
                and not kwargs and can_fuse(self.org_module, self.org_forward, x):
            return fused_lora_linear(x, self.org_module, self.lora_down.weight, self.lora_up.weight,
                                     self.multiplier * self.scale)
        out = self.org_forward(x, *args, **kwargs)
        hidden, up = self.lora_hidden(x, self.multiplier * self.scale)
        return add_up_projection(out, hidden, up, self.is_conv)

    # ---- weight-space views of the adapter (merge, max-norm) ----
    def down_weight(self) -> torch.Tensor:
        return self.lora_down.weight

    def up_weight(self) -> torch.Tensor:
        return self.lora_up.weight

    def delta_weight(self, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
        """`scale * up @ down` in the shape of the original weight, computed in float32."""
        down = (self.down_weight() if down is None else down).float()
        up = (self.up_weight() if up is None else up).float()
        scale = self.scale if scale is None else scale
        org_shape = self.org_module.weight.shape
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (delta * scale).reshape(org_shape)

    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Fold `multiplier * delta` into the original weight in place (computed in fp32, stored in its dtype).

        `sd` holds `lora_down.weight`, `lora_up.weight` and optionally `alpha` (default: this module's own).
        `device` is where the delta is computed; `dtype` is accepted for kohya's signature (the layer keeps its
        own dtype and device).
        """
        sd = sd or {}
        down = sd.get("lora_down.weight", self.down_weight())
        up = sd.get("lora_up.weight", self.up_weight())
        scale = float(sd["alpha"]) / down.shape[0] if "alpha" in sd else self.scale
        weight = self.org_module.weight
        device = weight.device if device is None else device
        with torch.no_grad():
            delta = self.delta_weight(down.to(device), up.to(device), scale * self.multiplier)
            merged = weight.to(device=device, dtype=torch.float32) + delta
            weight.copy_(merged)  # in place: the layer keeps its own dtype and device


class LoRANetwork(torch.nn.Module):
    """A set of LoRA modules over the text encoder(s) and UNet, registered under their file names."""

    UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPMLP"]
    LORA_PREFIX_UNET = "lora_unet"
    LORA_PREFIX_TEXT_ENCODER = "lora_te"
    weight_parts: tuple[str, ...] = LORA_PARTS  # the per-module keys its files hold

    def __init__(self, text_encoder, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, block_dims: list[int] | None = None,
                 block_alphas: list[float] | None = None, conv_block_dims: list[int] | None = None,
                 conv_block_alphas: list[float] | None = None, modules_dim: Mapping[str, int] | None = None,
                 modules_alpha: Mapping[str, Any] | None = None, module_class: type = LoRAModule,
                 varbose: bool = False, **module_kwargs):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.is_sdxl = unet is not None and is_sdxl_unet(unet)
        self.block_lr_weights: list[float] | None = None
        self.lr_descriptions: list[str] = []
        self.loraplus = loraplus.LoRAPlusRatios()

        def dim_alpha(target: LoRATarget) -> tuple[int | None, Any]:
            linear = target.kind != "conv3x3"
            if modules_dim is not None:
                return modules_dim.get(target.name), (modules_alpha or {}).get(target.name)
            if target.is_unet and block_dims is not None:
                if linear:
                    return block_dims[target.block], block_alphas[target.block]
                if conv_block_dims is not None:
                    return conv_block_dims[target.block], conv_block_alphas[target.block]
                return None, None
            return (lora_dim, alpha) if linear else (conv_lora_dim, conv_alpha)

        with_conv = conv_lora_dim is not None or conv_block_dims is not None or modules_dim is not None
        targets = lora_targets(text_encoder, unet, self.is_sdxl, include_conv3x3=with_conv,
                               include_extra=modules_dim is not None)  # files may adapt conv_in, time_embedding...
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for name, target in targets.items():
            dim, module_alpha = dim_alpha(target)
            if not dim:
                continue
            lora = module_class(name, target.module, multiplier, dim, module_alpha, dropout=dropout,
                                rank_dropout=rank_dropout, module_dropout=module_dropout, **module_kwargs)
            lora.component = target.component
            lora.block = target.block
            (self.unet_loras if target.is_unet else self.text_encoder_loras).append(lora)
            self.add_module(name, lora)
        logger.info("LoRA network: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        if varbose:
            for lora in self.text_encoder_loras + self.unet_loras:
                logger.info("  %s dim=%d alpha=%g", lora.lora_name, lora.lora_dim, lora.alpha.item())

    # ---- hooking into the models ----
    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)
        loras.clear()

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the LoRA modules into the layers they were created for; modules not applied are dropped."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
        if not apply_unet:
            self._drop(self.unet_loras)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
        logger.info("applied LoRA: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def restore(self) -> None:
        """Unhook all modules (the reverse of `apply_to`; stacked networks must be restored last-first)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd: Mapping[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Fold the LoRA (from `weights_sd`, default this network's own weights) into the model weights.

        Names in `weights_sd` may be aliases (see `normalize_weights`); keys matching no layer are listed in a
        warning and a file for another model family is refused, as when loading.
        """
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        if weights_sd is not None:
            if unet is not None or text_encoder is not None:
                weights_sd = normalize_weights(weights_sd, resolver=LoRANameResolver(text_encoder, unet),
                                               source="merge_to weights", parts=self.weight_parts)
            for key, value in weights_sd.items():
                name, rest = split_key(key)
                grouped.setdefault(name, {})[rest] = value
        merged = 0
        for module in self.text_encoder_loras + self.unet_loras:
            sd = grouped.get(module.lora_name) if weights_sd is not None else {}
            if sd is None:
                continue
            module.merge_to(sd, dtype, device)
            merged += 1
        logger.info("merged %d network modules into the model weights", merged)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        """Turn every module off (multiplier 0 keeps the hooks but skips the LoRA path) or back on."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = self.multiplier if enabled else 0

    # ---- weights ----
    def load_weights(self, file: str | os.PathLike, weights_sd: Mapping[str, torch.Tensor] | None = None):
        """Load a LoRA file into this network's modules; errors name wrong shapes, unknown keys are listed."""
        sd = load_state_dict(file) if weights_sd is None else dict(weights_sd)
        sd = normalize_weights(sd, self, source=str(file))
        info = self.load_state_dict(sd, strict=False)
        missing = sorted({split_key(k)[0] for k in info.missing_keys})
        if missing:
            logger.warning("%s: %d LoRA modules of this network are not in the file and keep their initial "
                           "weights: %s", file, len(missing), ", ".join(missing))
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
        """Write the weights (`.safetensors` with metadata and kohya's `sshs_*` hashes, else torch.save)."""
        save_lora_file(self.state_dict(), file, dtype, metadata)

    # ---- training hooks as the kohya trainer calls them ----
    def set_loraplus_lr_ratio(self, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None,
                              loraplus_text_encoder_lr_ratio=None) -> None:
        """LoRA+: the lora_up weights get these multiples of their group's learning rate (networks.loraplus)."""
        self.loraplus = loraplus.parse_ratios(loraplus_lr_ratio=loraplus_lr_ratio,
                                              loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                                              loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio)

    def set_block_lr_weight(self, block_lr_weights: list[float] | None) -> None:
        """Per-block learning-rate weights (length 25 for SD1/SD2, 23 for SDXL) or None."""
        self.block_lr_weights = block_lr_weights

    def get_lr_weight(self, lora: LoRAModule) -> float:
        block = getattr(lora, "block", -1)
        if self.block_lr_weights is None or block < 0:
            return 1.0
        return self.block_lr_weights[block]

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: text encoder(s), then the U-Net (one group per block with block lr weights).

        `text_encoder_lr` may be one value or a list (one per SDXL text encoder). A group without "lr" uses the
        optimizer's default learning rate. `self.lr_descriptions` names the groups in order (for logging).
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        self.lr_descriptions = []

        def add(loras: list[LoRAModule], lr: float | None, description: str) -> None:
            named = [(n, p) for lora in loras for n, p in lora.named_parameters()]
            ratio = self.loraplus.text_encoder if description.startswith("textencoder") else self.loraplus.unet
            for group, desc in loraplus.param_groups(named, lr, ratio, default_lr, description):  # LoRA+ splits
                groups.append(group)
                self.lr_descriptions.append(desc)

        te_lrs = text_encoder_lr if isinstance(text_encoder_lr, (list, tuple)) else None
        if te_lrs:
            for index, component in enumerate(sorted({lora.component for lora in self.text_encoder_loras})):
                lr = te_lrs[min(index, len(te_lrs) - 1)]
                add([lora for lora in self.text_encoder_loras if lora.component == component], lr, f"textencoder {index + 1}")
        else:
            add(self.text_encoder_loras, text_encoder_lr, "textencoder")

        base_lr = unet_lr if unet_lr is not None else default_lr
        if self.block_lr_weights is None:
            add(self.unet_loras, unet_lr, "unet")
        else:
            for block in sorted({lora.block for lora in self.unet_loras}):
                weight = self.block_lr_weights[block] if block >= 0 else 1.0
                lr = None if base_lr is None else base_lr * weight
                if lr == 0:
                    continue
                add([lora for lora in self.unet_loras if lora.block == block], lr, f"unet block {block}")
        return groups

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: LoRA modules run inside the checkpointed blocks of the models."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, *args, **kwargs) -> None:
        """Called by the trainer before each step (DyLoRA samples its rank here; plain LoRA needs nothing)."""

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        return self.parameters()

    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """Scale down modules whose `||scale * up @ down||_F` exceeds `max_norm_value` (--scale_weight_norms).

        Returns (number of modules scaled, mean norm, max norm) after scaling, as kohya's trainer logs them.
        The norm is computed from the rank x rank Gram matrices, never forming the full delta.
        """
        norms: list[float] = []
        scaled = 0
        with torch.no_grad():
            for lora in self.text_encoder_loras + self.unet_loras:
                down = lora.down_weight().float().reshape(lora.lora_dim, -1)
                up = lora.up_weight().float().reshape(-1, lora.lora_dim)
                norm_sq = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
                norm = float(norm_sq.sqrt()) * abs(lora.scale)
                ratio = 1.0
                if norm > max_norm_value:
                    ratio = max_norm_value / norm
                    scaled += 1
                    for param in lora.parameters():  # down and up each take the square root
                        param.mul_(ratio ** 0.5)
                norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)


# ---------------------------------------------------------------------------------------------------------------
# construction


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """Build a LoRA network for training from `--network_dim`, `--network_alpha` and `--network_args` (kwargs).

    kwargs (strings from `--network_args`, or numbers / lists from Python): conv_dim, conv_alpha, rank_dropout,
    module_dropout, down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold, block_dims,
    block_alphas, conv_block_dims, conv_block_alphas; dora_wd=True makes a DoRA network (networks.dora).
    See docs/lora.md.
    """
    if str(kwargs.get("dora_wd", "")).strip().lower() in ("true", "1", "yes", "on"):
        from networks.dora import create_network as create_dora_network

        return create_dora_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout,
                                   **kwargs)
    kwargs.pop("dora_wd", None)
    sdxl = unet is not None and is_sdxl_unet(unet)
    args = lora_blocks.parse_network_args(kwargs, network_dim, network_alpha, sdxl)
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, lora_dim=args.dim, alpha=args.alpha,
                          dropout=lora_blocks.to_float("neuron_dropout", neuron_dropout),
                          rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
                          conv_lora_dim=args.conv_dim, conv_alpha=args.conv_alpha, block_dims=args.block_dims,
                          block_alphas=args.block_alphas, conv_block_dims=args.conv_block_dims,
                          conv_block_alphas=args.conv_block_alphas, varbose=args.verbose)
    network.set_block_lr_weight(args.block_lr_weights)
    network.set_loraplus_lr_ratio(**{k: kwargs.get(k) for k in loraplus.KEYS})
    return network


def infer_modules_dim_alpha(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-module rank (rows of `lora_down.weight`) and alpha (default: the rank, i.e. scale 1) of a LoRA file."""
    dims: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    for key, value in weights_sd.items():
        name, rest = split_key(key)
        if rest == "alpha":
            alphas[name] = value
        elif rest == "lora_down.weight":
            dims[name] = value.shape[0]
    for name, dim in dims.items():
        alphas.setdefault(name, dim)
    return dims, alphas


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                module_class: type = LoRAModule, **kwargs) -> tuple[LoRANetwork, dict]:
    """A network whose modules match a LoRA file (dims, alphas, conv modules); returns (network, weights_sd).

    `weights_sd` (already loaded) wins over `file`. The returned weights use canonical names, so
    `network.apply_to(...); network.load_state_dict(weights_sd)` or `network.merge_to(..., weights_sd)` work.
    Block lr weights in kwargs (down_lr_weight, ...) apply as in `create_network`.
    """
    source = str(file) if weights_sd is None else (str(file) if file else "<weights_sd>")
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights: give a file or weights_sd")
        weights_sd = load_state_dict(file)
    from networks import adapters  # LoHa / LoKr / DoRA / LoCon-CP files: a network of the modules they call for

    if adapters.needs_adapter_network(weights_sd):
        return adapters.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd,
                                                    for_inference, **kwargs)
    resolver = LoRANameResolver(text_encoder, unet)
    sd = normalize_weights(weights_sd, resolver=resolver, source=source)
    dims, alphas = infer_modules_dim_alpha(sd)
    for name, dim in dims.items():  # files without alphas mean scale 1; give load_state_dict the value it expects
        sd.setdefault(f"{name}.alpha", torch.tensor(float(dim)))
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                          module_class=module_class)
    conform_shapes(sd, network.state_dict(), source, resolver.sdxl)
    if any(k in kwargs for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        lr_args = lora_blocks.parse_network_args(kwargs, None, None, resolver.sdxl)
        network.set_block_lr_weight(lr_args.block_lr_weights)
    network.set_loraplus_lr_ratio(**{k: kwargs.get(k) for k in loraplus.KEYS})
    return network, sd

