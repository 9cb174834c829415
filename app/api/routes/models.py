from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.api.deps import RegistryDep
from app.openapi import errors
from app.schemas import MODEL_ID_PATTERN, ModelPublic, ModelsPublic

PathModelId = Annotated[str, Path(pattern=MODEL_ID_PATTERN)]

router = APIRouter(prefix="/models", tags=["models"], responses=errors(401))


@router.get("", response_model=ModelsPublic)
def list_models(registry: RegistryDep) -> ModelsPublic:
    data = [ModelPublic(**m) for m in registry.models()]
    return ModelsPublic(data=data, count=len(data))


@router.get("/{model_id}", response_model=ModelPublic, responses=errors(404, 422))
def get_model(model_id: PathModelId, registry: RegistryDep) -> ModelPublic:
    return ModelPublic(**registry.get(model_id))


@router.delete("/{model_id}", status_code=204, responses=errors(404, 409, 422))
def delete_model(model_id: PathModelId, registry: RegistryDep) -> Response:
    """Remove a derived (edited) model; base models are protected (409)."""
    registry.remove(model_id)
    return Response(status_code=204)
