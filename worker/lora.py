"""An edit as a LoRA: low-rank factors of each changed weight matrix's difference.

An ESD edit stores the trained parameters whole (``worker.variants``). Tools built around
LoRA files (diffusers' ``load_lora_weights``, the WebUI's) want ``W' = W + B·A`` instead:
for each changed matrix, the truncated SVD of ``ΔW = W' − W`` gives the best rank-r factors
(Eckart–Young), ``B = U_r·diag(S_r)`` and ``A = V_rᵀ``. The rank is given, or picked per
matrix as the least that keeps ``energy`` of ΔW's squared singular values.

Keys follow diffusers' PEFT layout (``unet.<module>.lora_A.weight`` /
``unet.<module>.lora_B.weight``), so ``pipe.load_lora_weights(state_dict)`` reads them.
A LoRA holds matrices only: a changed bias cannot be written as one, and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.errors import InvalidParams
from worker.esd import delta_targets, full_delta


@dataclass
class LoraExport:
    state_dict: dict[str, torch.Tensor]
    ranks: dict[str, int]  # module -> rank used
    # Per module, the share of ΔW's squared singular values the factors keep.
    kept_energy: dict[str, float]
    left_out: list[str] = field(default_factory=list)  # changed parameters no LoRA can hold


def lora_of_edit(unet: torch.nn.Module, delta: dict[str, torch.Tensor],
                 rank: int | None = None, energy: float = 0.99) -> LoraExport:
    """``lora_from_delta`` against ``unet``'s own values of the delta's parameters (an
    error naming any parameter this UNet lacks). An edit trained as LoRA is first expanded
    to its matrices: refactoring them at its own rank gives its factors back."""
    delta = full_delta(unet, delta)
    base = {name: p.detach() for name, p in delta_targets(unet, delta).items()}
    return lora_from_delta(base, delta, rank=rank, energy=energy)


def lora_from_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                    rank: int | None = None, energy: float = 0.99,
                    prefix: str = "unet") -> LoraExport:
    """Factors for every 2-D weight of ``delta`` (trained values, by parameter name) that
    differs from ``base`` (the same names' original values). ``rank``: at most this many
    factors a matrix; None: the least rank keeping ``energy`` of each difference."""
    if rank is not None and rank < 1:
        raise InvalidParams(f"`rank` must be at least 1, got {rank}")
    if not 0 < energy <= 1:
        raise InvalidParams(f"`energy` must be in (0, 1], got {energy}")
    out = LoraExport({}, {}, {})
    for name, value in delta.items():
        if name not in base:
            raise InvalidParams(f"the delta names a parameter the base lacks: {name!r}")
        diff = value.float() - base[name].float()
        if not torch.any(diff):
            continue
        if not name.endswith(".weight") or diff.dim() != 2:
            out.left_out.append(name)
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        power = s.square()
        if rank is None:
            share = power.cumsum(0) / power.sum()
            r = int(torch.searchsorted(share, torch.tensor(energy)).item()) + 1
        else:
            r = rank
        r = min(r, len(s))
        module = name.removesuffix(".weight")
        out.state_dict[f"{prefix}.{module}.lora_A.weight"] = vh[:r].contiguous()
        out.state_dict[f"{prefix}.{module}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
        out.ranks[module] = r
        out.kept_energy[module] = float(power[:r].sum() / power.sum())
    return out
