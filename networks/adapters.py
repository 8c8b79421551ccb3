"""The shared base of the weight-space adapters (LoHa, LoKr, and any LyCORIS-format module read from a file).

`AdapterModule` is one module over one Linear / Conv2d layer. Its parameters are named exactly as the file keys
(`hada_w1_a`, `lokr_w2_b`, `lora_down.weight` is the only dotted one and stays in `networks.lora`), so its
state dict *is* the file format. Its forward adds `networks.adapter_math.weight_update(...)` to the layer weight
(the same function the merge tools call), so what trains is what every tool applies. The subclasses
(`networks.loha.LoHaModule`, `networks.lokr.LoKrModule`) only choose the factor shapes and their initialisation.

`AdapterNetwork` is `networks.lora.LoRANetwork` (names, block dims / lr weights, apply_to, optimizer groups) with
the weight loading, merging, max-norm and metadata of these formats. `create_network_from_weights` builds the
module class of each file module from its keys, so any of `networks.lora/loha/lokr` loads any of these files.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import torch

from library.file_io import CheckpointError, load_state_dict
from networks import adapter_math as am
from networks import lora_blocks
from networks.lora import LoRAModule, LoRANetwork
from networks.lora_files import normalize_weights, save_lora_file
from networks.lora_names import LoRANameResolver, is_sdxl_unet, split_key

logger = logging.getLogger(__name__)

TRUE_VALUES = ("true", "1", "yes", "on")


def to_bool(value: Any) -> bool:
    return str(value).strip().lower() in TRUE_VALUES if value is not None else False


class AdapterModule(torch.nn.Module):
    """An adapter whose effect is a weight update `weight_update(W, parts, multiplier)` of the layer it wraps."""

    algo = "lora"

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | torch.Tensor | None = 1, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None, dora_wd: bool = False, **algo_args):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.weight_shape = tuple(org_module.weight.shape)
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        if shapes is None:
            shapes = self.factor_shapes(self.weight_shape, self.lora_dim, **algo_args)
        for key, shape in shapes.items():
            if key in am.COMMON_KEYS:
                continue
            owner, _, param = key.rpartition(".")  # `lora_mid.weight` of a LoCon-CP file: a child holds it
            if owner and not hasattr(self, owner):
                self.add_module(owner, torch.nn.Module())
            (getattr(self, owner) if owner else self).register_parameter(param, torch.nn.Parameter(torch.zeros(shape)))
        if dora_wd or "dora_scale" in shapes:  # magnitude initialised to the layer's own norms: a fresh module changes nothing
            self.dora_scale = torch.nn.Parameter(am.column_norm(org_module.weight.detach().float()))
        self.init_factors()
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._org = [org_module]
        self.org_forward = None

    # ---- what the subclasses define ----
    @staticmethod
    def factor_shapes(weight_shape: tuple[int, ...], rank: int, **algo_args) -> dict[str, tuple[int, ...]]:
        raise ValueError("this adapter module is built from a file's shapes only")

    def init_factors(self) -> None:
        """Random factors with the delta starting at zero (subclasses); file-built modules are loaded next."""

    # ---- shared ----
    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def parts(self) -> dict[str, torch.Tensor]:
        parts = dict(self.named_parameters())
        parts["alpha"] = self.alpha
        return parts

    @property
    def scale(self) -> float:
        return am.scale_of(self.parts())

    apply_to = LoRAModule.apply_to  # the same forward hook as LoRA's
    restore = LoRAModule.restore

    def weight_update(self, multiplier: float | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`multiplier * (W' - W)` in float32 (differentiable), with rank dropout on the delta's rows in training."""
        weight = self.org_module.weight if weight is None else weight
        update = am.weight_update(weight.detach(), self.parts(), self.multiplier if multiplier is None else multiplier,
                                  self.lora_name)
        if self.training and self.rank_dropout:
            keep = (torch.rand(update.shape[0], device=update.device) > self.rank_dropout).to(update.dtype)
            update = update * keep.reshape(-1, *([1] * (update.dim() - 1))) / (1.0 - self.rank_dropout)
        return update

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        org = self.org_module
        if self.is_conv:
            return torch.nn.functional.conv2d(x, weight, bias, org.stride, org.padding, org.dilation, org.groups)
        return torch.nn.functional.linear(x, weight, bias)

    def _is_plain_layer(self) -> bool:
        """Whether `org_forward` is the layer's own forward (not another network's hook), so W + dW may replace it."""
        func = getattr(self.org_forward, "__func__", None)
        return func is not None and func in (torch.nn.Linear.forward, torch.nn.Conv2d.forward) and \
            getattr(self.org_forward, "__self__", None) is self.org_module

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0:
            return self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return self.org_forward(x, *args, **kwargs)
        org = self.org_module
        if not hasattr(self, "dora_scale"):
            delta_out = self.bypass(x)
            if delta_out is not None:  # the delta applied to x without forming it (cheaper than W + dW)
                out = self.org_forward(x, *args, **kwargs)
                return out + (self.multiplier * self._row_dropout(delta_out, 1 if self.is_conv else -1)).to(out.dtype)
        update = self.weight_update()
        if self._is_plain_layer() and not args and not kwargs:  # one matmul with the updated weight
            return self._layer(x, org.weight + update.to(org.weight.dtype), org.bias)
        out = self.org_forward(x, *args, **kwargs)
        return out + self._layer(x.to(out.dtype), update.to(out.dtype), None)

    def bypass(self, x: torch.Tensor) -> torch.Tensor | None:
        """`delta(x)` (scale included, no multiplier) computed from the factors where that is cheaper than forming
        the delta (subclasses); None: the forward uses the updated weight."""
        return None

    def _row_dropout(self, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Rank dropout as in `weight_update`: whole output channels of the delta dropped, the rest rescaled."""
        if not (self.training and self.rank_dropout):
            return out
        keep = (torch.rand(out.shape[channel_dim], device=out.device) > self.rank_dropout).to(out.dtype)
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        return out * keep.reshape(shape) / (1.0 - self.rank_dropout)

    def _low_rank(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """`up(down(x))` with down (rank, in[, kh, kw]) carrying the layer's kernel / stride / padding."""
        org = self.org_module
        x = x.to(down.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.is_conv:
            hidden = torch.nn.functional.conv2d(x, down.reshape(down.shape[0], *self.weight_shape[1:]), None,
                                                org.stride, org.padding, org.dilation, org.groups)
            return torch.nn.functional.conv2d(hidden, up.reshape(*up.shape, 1, 1))
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)

    def delta_weight(self) -> torch.Tensor:
        """`scale * product` in the layer weight's shape (no DoRA, no multiplier), float32."""
        return am.delta_weight({k: v.float() for k, v in self.parts().items()}, self.weight_shape, self.lora_name)

    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Add `multiplier * update` (from `sd`, default this module's own parts) to the layer weight in place."""
        am.merge_into_layer(self.org_module, dict(sd) if sd else self.parts(), self.multiplier, self.lora_name, device)


class AdapterNetwork(LoRANetwork):
    """A LoRANetwork of adapter modules: the LoRA container with the loading / merging / saving of these formats."""

    algo = "lora"
    algo_args: dict[str, Any] = {}
    weight_parts = am.ADAPTER_KEYS

    def adapter_modules(self) -> list[torch.nn.Module]:
        return self.text_encoder_loras + self.unet_loras

    def load_weights(self, file: str | os.PathLike, weights_sd: Mapping[str, torch.Tensor] | None = None):
        sd = load_state_dict(file) if weights_sd is None else dict(weights_sd)
        sd = normalize_weights(sd, self, source=str(file), parts=self.weight_parts)
        info = self.load_state_dict(sd, strict=False)
        missing = sorted({split_key(k)[0] for k in info.missing_keys})
        if missing:
            logger.warning("%s: %d modules of this network are not in the file and keep their initial weights: %s",
                           file, len(missing), ", ".join(missing))
        return info

    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """Scale down modules whose `||delta||_F` exceeds `max_norm_value`. The delta is linear in each factor, so
        each of the n factors is scaled by ratio**(1/n); DoRA's magnitude is left alone."""
        norms: list[float] = []
        scaled = 0
        with torch.no_grad():
            for module in self.adapter_modules():
                norm = float(module.delta_weight().norm())
                ratio = 1.0
                if norm > max_norm_value:
                    ratio = max_norm_value / norm
                    scaled += 1
                    factors = [p for n, p in module.named_parameters() if n != "dora_scale"]
                    for p in factors:
                        p.mul_(ratio ** (1.0 / len(factors)))
                norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> None:
        """Write the weights; training metadata is rewritten as LyCORIS writes it (`lycoris.kohya` + algo args)."""
        save_lora_file(self.state_dict(), file, dtype, lycoris_metadata(metadata, self.algo, self.algo_args))


def lycoris_metadata(metadata: Mapping[str, str] | None, algo: str, algo_args: Mapping[str, Any]) -> dict[str, str]:
    """`ss_network_module = lycoris.kohya` and `ss_network_args` with `algo` first, as LyCORIS's kohya wrapper
    writes them (metadata managers and the webui tell LoHa / LoKr files apart by these); nothing added to empty
    metadata (--no_metadata)."""
    meta = dict(metadata or {})
    if "ss_network_module" not in meta:
        return meta
    args = json.loads(meta["ss_network_args"]) if meta.get("ss_network_args") not in (None, "", "None") else {}
    args = {"algo": algo, **{k: v for k, v in args.items() if k != "algo"},
            **{k: str(v) for k, v in algo_args.items() if k not in args}}
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_args"] = json.dumps(args)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# construction


def create_adapter_network(network_class: type[AdapterNetwork], module_class: type[AdapterModule],
                           multiplier: float, network_dim: int | None, network_alpha: float | None, text_encoder,
                           unet, neuron_dropout: float | None = None, algo_args: Mapping[str, Any] | None = None,
                           **kwargs) -> AdapterNetwork:
    """Build a network for training from `--network_dim/alpha/args` (kwargs as in `networks.lora.create_network`,
    plus `algo_args`, the algorithm's own arguments given to each module)."""
    sdxl = unet is not None and is_sdxl_unet(unet)
    args = lora_blocks.parse_network_args(kwargs, network_dim, network_alpha, sdxl)
    if neuron_dropout:
        logger.warning("--network_dropout applies to LoRA's rank-sized hidden; %s has none and ignores it",
                       module_class.algo)
    algo_args = dict(algo_args or {})
    network = network_class(text_encoder, unet, multiplier=multiplier, lora_dim=args.dim, alpha=args.alpha,
                            rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
                            conv_lora_dim=args.conv_dim, conv_alpha=args.conv_alpha, block_dims=args.block_dims,
                            block_alphas=args.block_alphas, conv_block_dims=args.conv_block_dims,
                            conv_block_alphas=args.conv_block_alphas, module_class=module_class,
                            varbose=args.verbose, **algo_args)
    network.algo = module_class.algo
    network.algo_args = {k: v for k, v in algo_args.items()}
    network.set_block_lr_weight(args.block_lr_weights)
    return network


def needs_adapter_network(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds anything beyond plain LoRA keys (LoHa, LoKr, DoRA, LoCon CP)."""
    from networks.convert_lora import convert_state_dict

    extra = set(am.ADAPTER_KEYS) - {"lora_down.weight", "lora_up.weight", "alpha"}
    return any(split_key(k)[1] in extra for k in convert_state_dict(sd))


def _module_factory(modules: Mapping[str, dict[str, torch.Tensor]]) -> Callable[..., torch.nn.Module]:
    """A module constructor choosing, per module name, the class its keys call for, shaped like the file."""
    from networks.dora import DoRAModule

    def make(name: str, org_module: torch.nn.Module, multiplier: float, dim: int, alpha: Any, **kwargs):
        parts = modules[name]
        algo = am.algo_of(parts, name)
        if algo == "lora" and "lora_mid.weight" not in parts:
            cls = DoRAModule if "dora_scale" in parts else LoRAModule
            return cls(name, org_module, multiplier, dim, alpha, **kwargs)
        shapes = {k: tuple(v.shape) for k, v in parts.items() if k != "alpha"}
        module = AdapterModule(name, org_module, multiplier, dim, alpha, shapes=shapes, **kwargs)
        module.algo = algo
        return module

    return make


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae, text_encoder, unet,
                                weights_sd: Mapping[str, torch.Tensor] | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[AdapterNetwork, dict]:
    """A network whose modules match a file of any of these formats (LoRA, LoCon CP, LoHa, LoKr, DoRA, mixed);
    returns (network, weights under canonical names) like `networks.lora.create_network_from_weights`."""
    source = str(file) if file else "<weights_sd>"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights: give a file or weights_sd")
        weights_sd = load_state_dict(file)
    resolver = LoRANameResolver(text_encoder, unet)
    sd = normalize_weights(weights_sd, resolver=resolver, source=source, parts=am.ADAPTER_KEYS)
    modules = am.group_modules(sd)
    dims, alphas = {}, {}
    for name, parts in modules.items():
        try:
            am.algo_of(parts, name)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        dims[name] = am.rank_of(parts) or 1
        alphas[name] = parts.get("alpha", torch.tensor(float(dims[name])))
        sd.setdefault(f"{name}.alpha", torch.tensor(float(dims[name])))
    algos = {am.algo_of(p) for p in modules.values()}
    network = AdapterNetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                             module_class=_module_factory(modules))
    network.algo = next(iter(algos)) if len(algos) == 1 else "lora"
    logger.info("%s: %s modules (%s)", source, len(modules), ", ".join(sorted(algos)))
    if any(k in kwargs for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        lr_args = lora_blocks.parse_network_args(kwargs, None, None, resolver.sdxl)
        network.set_block_lr_weight(lr_args.block_lr_weights)
    return network, sd
