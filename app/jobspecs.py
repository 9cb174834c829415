"""What goes on the queue: one typed spec per job kind, and the defaults behind them.

The API's resolvers (``app.params``) turn a request into one of these, every default filled
in, so ``GET /jobs/{id}`` shows the exact parameters that reproduce a job; the worker
validates the same model before it runs (``worker.jobs``). A default lives here once: the
resolvers fall back to it where a model's manifest says nothing, and the worker's
trainer and samplers take theirs from here too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# How a model draws when neither the request nor its manifest says: Stable Diffusion's.
DRAW_STEPS = 30
DRAW_GUIDANCE = 7.5
DRAW_SCHEDULER = "ddim"
DRAW_SIDE = 512

# ESD's hyper-parameters when the base model's manifest names none (the paper's, for
# Stable Diffusion 1.4: 1000 iterations at 1e-5, a 50-step DDIM trajectory at guidance 3).
ERASE_METHOD = "esd-x"
ERASE_ITERATIONS = 1000  # per concept
ERASE_LEARNING_RATE = 1e-5
ERASE_DDIM_STEPS = 50
ERASE_START_GUIDANCE = 3.0
ERASE_NEGATIVE_GUIDANCE = 1.0  # η
PRESERVE_WEIGHT = 1.0  # λ of the neighbour-holding term (worker.esd)
DRIFT_CHECKS = 3  # neighbour drift measured this many times during training
LORA_RANK = 4  # an erase trained as LoRA: the rank of each matrix's change

# An upscale's, when the upscaler's manifest says nothing (Stability's x4 card).
UPSCALE_STEPS = 20
UPSCALE_GUIDANCE = 0.0
UPSCALE_NOISE_LEVEL = 20


class JobSpec(BaseModel):
    """A resolved job. Unknown fields are refused: a worker older than the API that queued
    the job fails it with a clear error rather than ignore what was asked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def queued(self) -> dict[str, Any]:
        """The JSON-able form RQ stores and ``GET /jobs/{id}`` shows."""
        return self.model_dump(mode="json")


class UpscaleJob(JobSpec):
    model: str
    prompt: str
    steps: int
    guidance_scale: float
    noise_level: int
    seed: int
    tile: int
    overlap: int
    # Set for POST /upscale (the stored input, relative to outputs/); None in a cascade.
    input: str | None = None
    source: dict[str, Any] | None = None


class GenerateJob(JobSpec):
    prompt: str
    negative_prompt: str | None = None
    model: str
    num_images: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    seed: int
    upscale: UpscaleJob | None = None
    previews: int = 0  # a preview event every this many steps; 0: none


class EraseJob(JobSpec):
    base_model: str
    name: str
    name_given: bool = True  # False: a derived name, moved on if another job takes it
    concepts: list[str]
    method: str
    iterations: int
    learning_rate: float
    negative_guidance: float
    erase_from: str | None = None
    train_prompts: Literal["varied", "plain"]
    preserve: bool
    preserve_weight: float = PRESERVE_WEIGHT
    concept_kind: str | None = None
    preserve_prompts: list[str] | None = None
    seed: int
    ddim_steps: int = ERASE_DDIM_STEPS
    start_guidance: float = ERASE_START_GUIDANCE
    domain: str | None = None
    evaluate: bool = False
    evaluator: str | None = None
    # The size ESD trains at, and how the evidence grid is drawn: as the model draws.
    height: int
    width: int
    draw_steps: int = DRAW_STEPS
    draw_guidance: float = DRAW_GUIDANCE
    drift_checks: int = DRIFT_CHECKS
    parameterization: Literal["full", "lora"] = "full"
    lora_rank: int = LORA_RANK


class EvaluateJob(JobSpec):
    model: str
    prompts: list[str] | None = None
    prompt_set: str | None = None
    images_per_prompt: int
    seed: int
    metrics: list[str]
    reference: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float
    steps: int
    height: int
    width: int
    domain: str | None = None
    evaluator: str | None = None


class ImportJob(JobSpec):
    """An uploaded checkpoint (``file``, relative to outputs/) to register as ``id``."""

    id: str
    file: str
    filename: str
    prediction_type: Literal["epsilon", "v_prediction"] | None = None


EXPORT_FORMATS = ("diffusers", "single-file", "lora")


class ExportJob(JobSpec):
    """A model written out in ``format`` as the export ``name`` of the registry
    (``Registry.keep_export``), the file ``GET /models/{id}/download`` then streams."""

    model: str
    format: Literal["diffusers", "single-file", "lora"]
    dtype: Literal["float32", "float16"]
    rank: int | None = None
    name: str
