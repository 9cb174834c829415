"""What goes on the queue: one typed spec per job kind, and the defaults behind them.

The API's resolvers (``app.params``) turn a request into one of these, every default filled
in, so ``GET /jobs/{id}`` shows the exact parameters that reproduce a job; the worker
validates the same model before it runs (``worker.jobs``). A default lives here once: the
resolvers fall back to it where a model's manifest says nothing, and the worker's
trainer and samplers take theirs from here too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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

# What the generic domain (any Stable Diffusion model: worker.domains.generic) offers,
# written once here: its workers publish it, and the API reads it for a model that names
# no domain before any worker has published.
GENERIC = "generic"
CONCEPT_KINDS = ("object", "style", "unsafe")
GENERIC_OFFER: dict[str, Any] = {
    "prompt_sets": {}, "default_prompt_set": None, "default_metrics": ["clip_score"],
    "judge_metrics": [], "reference": None, "preserve": True,
    "concept_kinds": list(CONCEPT_KINDS)}

# The upscalers' factor (Stability's x4 layout), and the files a reference folder's
# images may be (POST /evaluate `reference`): read by the API's checks and the workers.
UPSCALE_FACTOR = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# An upscale's, when the upscaler's manifest says nothing (Stability's x4 card).
UPSCALE_STEPS = 20
UPSCALE_GUIDANCE = 0.0
UPSCALE_NOISE_LEVEL = 20


Attack = Literal["inversion", "conditioning", "relearning", "prompt_search", "image_inversion"]
ATTACKS: tuple[Attack, ...] = ("inversion", "conditioning", "relearning", "prompt_search",
                               "image_inversion")
RELEARN_LEARNING_RATE = 1e-4  # relearning a model that records no learning rate of its own

Budget = Annotated[float, Field(gt=0, le=10)]


# Who sees and uses a model a key made: its owner and admins only, or every key
# (``Registry.seen_by``).
Visibility = Literal["private", "public"]

class AttackSpec(BaseModel):
    """Attacks on erased concepts (``worker.attacks``), run on the model and on its base as
    the control; every setting is recorded in the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, min_length=1, max_length=8,
        description="Default: the concepts the model's edit erased.")
    attacks: list[Attack] = Field(list(ATTACKS), min_length=1)
    train_images: int = Field(32, ge=1, le=512, description="Images of each concept the "
                              "base draws (its own prompts) for the attacks to learn from.")
    judge_images: int = Field(48, ge=1, le=512, description="Images judged per rate.")
    batch: int = Field(8, ge=1, le=64, description="Images per training step.")
    tokens: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        [1, 4], min_length=1, max_length=4, description="Inversion: new tokens per run.")
    inversion_steps: int = Field(300, ge=1, le=5000)
    inversion_lr: float = Field(5e-3, gt=0, le=1)
    budgets: list[Budget] = Field(
        [0.25, 0.5, 1.0], min_length=1, max_length=8, description="Conditioning: the "
        "offset's norm bounds, × the mean norm of the concept's prompt encodings.")
    conditioning_steps: int = Field(150, ge=1, le=5000)
    conditioning_lr: float = Field(0.05, gt=0, le=1, description="Adam's step, × the "
                                   "budget's norm per entry.")
    relearn_steps: list[Annotated[int, Field(ge=1, le=5000)]] = Field(
        [10, 50, 200], min_length=1, max_length=8, description="Relearning: the rate after "
        "each of these fine-tuning steps.")
    relearn_lr: float | None = Field(None, gt=0, le=1, description="Default: the edit's "
                                     "own learning rate.")
    search_words: int = Field(24, ge=0, le=256, description="Prompt search: the words "
                              "nearest the concept tried in its place.")
    search_images: int = Field(8, ge=1, le=64)
    search_worst: int = Field(3, ge=1, le=16, description="Drawn again with fresh seeds.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    control: bool = Field(True, description="Also run every attack on the base model: the "
                          "control that shows each attack works (about half the time).")
    reference: bool = Field(True, description="Also run them on the model retrained without "
                            "the concept, where the registry has one (`lethe train DOMAIN "
                            "--without CONCEPT`): the report's gap is the edit's rate less "
                            "that model's. Its rates are kept on its manifest and reused.")


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
    attack: AttackSpec | None = None  # attacks on the new edit, in its manifest
    # The size ESD trains at, and how the evidence grid is drawn: as the model draws.
    height: int
    width: int
    draw_steps: int = DRAW_STEPS
    draw_guidance: float = DRAW_GUIDANCE
    drift_checks: int = DRIFT_CHECKS
    parameterization: Literal["full", "lora"] = "full"
    lora_rank: int = LORA_RANK
    robust: bool = False
    visibility: Visibility = "public"
    anchor: Literal["without", "neighbour", "reference"] = "without"
    anchor_concept: str | None = None
    reference: str | None = None  # anchor "reference": the model retrained without it


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
    attack: AttackSpec | None = None
    attack_base: str | None = None  # the control the attacks also run on
    # Whether the report joins the model's own ``reports``: the owner's and an admin's do;
    # another key's evaluation is its own to read, in its job.
    record: bool = True


class ImportJob(JobSpec):
    """An uploaded checkpoint (``file``, relative to outputs/) to register as ``id``."""

    id: str
    file: str
    filename: str
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    base: str | None = None  # a LoRA file: the model it is an edit of
    visibility: Visibility = "public"


EXPORT_FORMATS = ("diffusers", "single-file", "lora")
# How a LoRA file names its factors: kohya's (the WebUI tools', and diffusers reads it) or
# diffusers' PEFT layout (worker.lorafiles).
LORA_LAYOUTS = ("kohya", "peft")


class ExportJob(JobSpec):
    """A model written out in ``format`` as the export ``name`` of the registry
    (``Registry.keep_export``), the file ``GET /models/{id}/download`` then streams."""

    model: str
    format: Literal["diffusers", "single-file", "lora"]
    dtype: Literal["float32", "float16"]
    rank: int | None = None
    lora_layout: Literal["kohya", "peft"] = "kohya"
    name: str
