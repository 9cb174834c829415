"""What each model domain offers, as the workers published it (``worker.domains``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import RegistryDep
from app.jobspecs import GENERIC, GENERIC_OFFER
from app.openapi import errors

router = APIRouter(prefix="/domains", tags=["models"], responses=errors(401))


@router.get("")
def list_domains(registry: RegistryDep) -> dict[str, dict[str, Any]]:
    """Each domain by name: its named prompt sets and their sizes, its default metrics,
    whether `preserve` applies, the concept kinds it knows. A model's manifest names its
    domain (`domain`); a model that names none is measured as `generic`."""
    return {GENERIC: GENERIC_OFFER} | registry.domains()
