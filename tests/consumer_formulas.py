"""Reference weight updates written the way the consumers of these files compute them (ComfyUI's
`comfy/weight_adapter/{lora,loha,lokr,base}.py` `calculate_weight` / `weight_decompose`), independently of
`networks.adapter_math`, so the tests compare our modules and tools against the readers' formulas."""
from __future__ import annotations

import torch


def _tucker(t, b, a):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def consumer_weight(weight: torch.Tensor, parts: dict, strength: float = 1.0) -> torch.Tensor:
    """The layer weight after applying one module's `parts` at `strength`, in float64."""
    weight = weight.double().clone()
    v = {k: t.double() for k, t in parts.items()}
    alpha_value = float(v["alpha"]) if "alpha" in v else None
    if "hada_w1_a" in v:
        alpha = alpha_value / v["hada_w1_b"].shape[0] if alpha_value is not None else 1.0
        if "hada_t1" in v:
            m1 = _tucker(v["hada_t1"], v["hada_w1_b"], v["hada_w1_a"])
            m2 = _tucker(v["hada_t2"], v["hada_w2_b"], v["hada_w2_a"])
        else:
            m1 = torch.mm(v["hada_w1_a"], v["hada_w1_b"])
            m2 = torch.mm(v["hada_w2_a"], v["hada_w2_b"])
        diff = (m1 * m2).reshape(weight.shape)
    elif any(k.startswith("lokr_") for k in v):
        dim = None
        if "lokr_w1" in v:
            w1 = v["lokr_w1"]
        else:
            dim = v["lokr_w1_b"].shape[0]
            w1 = torch.mm(v["lokr_w1_a"], v["lokr_w1_b"])
        if "lokr_w2" in v:
            w2 = v["lokr_w2"]
        else:
            dim = v["lokr_w2_b"].shape[0]
            if "lokr_t2" in v:
                w2 = _tucker(v["lokr_t2"], v["lokr_w2_b"], v["lokr_w2_a"])
            else:
                w2 = torch.mm(v["lokr_w2_a"], v["lokr_w2_b"])
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2.contiguous()).reshape(weight.shape)  # contiguous as LyCORIS / the webui make_kron
    else:
        mat1, mat2 = v["lora_up.weight"], v["lora_down.weight"]
        alpha = alpha_value / mat2.shape[0] if alpha_value is not None else 1.0
        if "lora_mid.weight" in v:
            mid = v["lora_mid.weight"]
            final_shape = [mat2.shape[1], mat2.shape[0], mid.shape[2], mid.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1),
                            mid.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    if "dora_scale" not in v:
        return weight + strength * alpha * diff
    calc = weight + diff * alpha
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True) \
        .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (v["dora_scale"] / norm)
    return weight + strength * (calc - weight)


def layer_output(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`layer`'s forward with another weight, in float64."""
    bias = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, torch.nn.Conv2d):
        return torch.nn.functional.conv2d(x.double(), weight, bias, layer.stride, layer.padding)
    return torch.nn.functional.linear(x.double(), weight, bias)


def layer_input(layer: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=g)
    return torch.randn(2, 3, layer.in_features, generator=g)


def group(sd: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        out.setdefault(name, {})[part] = value
    return out
