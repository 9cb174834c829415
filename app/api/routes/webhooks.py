"""The caller's webhook signing secret: made (or replaced) here and shown once."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app import webhooks
from app.api.deps import SubmitterDep
from app.errors import InvalidParams
from app.openapi import errors

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=errors(401))


class WebhookSecret(BaseModel):
    secret: str = Field(..., description="`whsec_<base64>`: verify deliveries with it, as "
                        "the Standard Webhooks libraries do. Shown this once.")


@router.post("/secret", status_code=201, response_model=WebhookSecret,
             responses=errors(422))
async def new_secret(sub: SubmitterDep) -> WebhookSecret:
    """Make the secret that signs your jobs' webhook deliveries, replacing any before it
    (deliveries from then on are signed with the new one). Each key's name has its own:
    a delivery to you does not verify at another tenant's endpoint."""
    if not sub.settings.webhook_secret:
        raise InvalidParams("webhooks are off on this service: the operator has not set "
                            "LETHE_WEBHOOK_SECRET")
    secret = await run_in_threadpool(webhooks.new_secret, sub.redis, sub.caller.name)
    return WebhookSecret(secret=secret)
