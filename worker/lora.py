"""An edit as a LoRA: low-rank factors of each changed weight matrix's difference.

An ESD edit stores the trained parameters whole (``worker.variants``). Tools built around
LoRA files (diffusers' ``load_lora_weights``, the WebUI's) want ``W' = W + B·A`` instead:
for each changed matrix, the truncated SVD of ``ΔW = W' − W`` gives the best rank-r factors
(Eckart–Young), ``B = U_r·diag(S_r)`` and ``A = V_rᵀ``. The rank is given, or picked per
matrix as the least that keeps ``energy`` of ΔW's squared singular values.

A convolution's kernel is factored as the matrix it multiplies by (``out × in·kh·kw``), the
way the WebUI tools' LoRA (LoCon) files hold one. A LoRA holds weights only: a changed bias
or norm cannot be written as one, and is reported. How the factors are named in a file is
``worker.lorafiles``' business; ``LoraExport.state_dict`` is diffusers' PEFT layout, which
``pipe.load_lora_weights(state_dict)`` reads in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.errors import InvalidParams
from worker.esd import delta_targets, full_delta


@dataclass
class LoraExport:
    # module -> (down, up): W' = W + up·down, down (r, in[, kh, kw]), up (out, r[, 1, 1])
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ranks: dict[str, int]  # module -> rank used
    # Per module, the share of ΔW's squared singular values the factors keep.
    kept_energy: dict[str, float]
    left_out: list[str] = field(default_factory=list)  # changed parameters no LoRA can hold

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return peft_state_dict(self.factors)


def peft_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """Factors in diffusers' PEFT layout (``unet.<module>.lora_A.weight`` = down)."""
    out = {}
    for module, (down, up) in factors.items():
        out[f"unet.{module}.lora_A.weight"] = down
        out[f"unet.{module}.lora_B.weight"] = up
    return out


def lora_of_edit(unet: torch.nn.Module, delta: dict[str, torch.Tensor],
                 rank: int | None = None, energy: float = 0.99) -> LoraExport:
    """``lora_from_delta`` against ``unet``'s own values of the delta's parameters (an
    error naming any parameter this UNet lacks). An edit trained as LoRA is first expanded
    to its matrices: refactoring them at its own rank gives its factors back."""
    delta = full_delta(unet, delta)
    base = {name: p.detach() for name, p in delta_targets(unet, delta).items()}
    return lora_from_delta(base, delta, rank=rank, energy=energy)


def lora_from_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                    rank: int | None = None, energy: float = 0.99) -> LoraExport:
    """Factors for every linear or convolution weight of ``delta`` (trained values, by
    parameter name) that differs from ``base`` (the same names' original values). ``rank``:
    at most this many factors a matrix; None: the least rank keeping ``energy`` of each
    difference."""
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
        if not name.endswith(".weight") or diff.dim() not in (2, 4):
            out.left_out.append(name)
            continue
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        power = s.square()
        if rank is None:
            share = power.cumsum(0) / power.sum()
            r = int(torch.searchsorted(share, torch.tensor(energy)).item()) + 1
        else:
            r = rank
        r = min(r, len(s))
        module = name.removesuffix(".weight")
        down, up = vh[:r], u[:, :r] * s[:r]
        if diff.dim() == 4:  # a kernel: down convolves in to r channels, up mixes them 1x1
            down, up = down.reshape(r, *diff.shape[1:]), up[:, :, None, None]
        out.factors[module] = (down.contiguous(), up.contiguous())
        out.ranks[module] = r
        out.kept_energy[module] = float(power[:r].sum() / power.sum())
    return out
