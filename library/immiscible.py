"""Immiscible diffusion (Li et al., arXiv 2406.12303): each latent of a batch is noised with a nearby noise.

`--immiscible_noise K` draws K candidate noises for a batch of B latents (K >= B; K < B counts as B) and gives
each latent its own candidate by a linear assignment that minimises the total L2 distance between latents and
their noises (scipy's `linear_sum_assignment`, exact). With K = B the noises are only permuted, so the batch's
noise is still i.i.d. Gaussian as a set, and the model learns a less tangled mapping from noise to images; a
larger K makes the assignment closer at the price of a slightly non-Gaussian marginal. The extra candidates
come from the training noise generator, so a seeded run stays reproducible; off (None) draws nothing extra.
"""
from __future__ import annotations

from typing import Any

import torch


def add_immiscible_arguments(group: Any) -> None:
    group.add_argument("--immiscible_noise", type=int, default=None,
                       help="immiscible diffusion: assign K candidate noises to the batch's latents by a minimal "
                            "distance linear assignment (K >= batch size; off by default)")


def validate(args: Any) -> None:
    k = getattr(args, "immiscible_noise", None)
    if k is not None and k < 1:
        raise ValueError(f"--immiscible_noise {k}: expected a number of candidate noises >= 1 (e.g. the batch "
                         "size, or a few times it)")
    if k is not None:
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise ValueError("--immiscible_noise needs scipy (pip install scipy)")


def metadata(args: Any) -> dict[str, str]:
    k = getattr(args, "immiscible_noise", None)
    return {"ss_immiscible_noise": str(k)} if k else {}


def assignment(latents: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index into `candidates` (K, ...) for each latent (B, ...), distinct, minimising the summed L2 distance."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(latents.detach().reshape(len(latents), -1).double().cpu(),
                       candidates.detach().reshape(len(candidates), -1).double().cpu())
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.empty(len(latents), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return order


def assign_noise(latents: torch.Tensor, noise: torch.Tensor, k: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch's noise re-assigned to the latents from `noise` plus max(0, k - B) more draws."""
    extra = max(0, k - len(latents))
    candidates = noise
    if extra:
        more = torch.randn((extra, *latents.shape[1:]), generator=generator).to(noise)
        candidates = torch.cat([noise, more])
    return candidates[assignment(latents, candidates).to(candidates.device)]
