from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import RegistryDep
from app.schemas import ModelPublic, ModelsPublic

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(registry: RegistryDep) -> ModelsPublic:
    data = [ModelPublic(**m) for m in registry.models()]
    return ModelsPublic(data=data, count=len(data))


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, registry: RegistryDep) -> ModelPublic:
    return ModelPublic(**registry.get(model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, registry: RegistryDep) -> Response:
    """Remove a derived (edited) model; base models are protected (409)."""
    registry.remove(model_id)
    return Response(status_code=204)
