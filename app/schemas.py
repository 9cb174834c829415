"""Request and response bodies, named by role (``GenerateCreate``, ``JobPublic``, ...)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict

from app.jobspecs import (
    DRIFT_CHECKS,
    ERASE_NEGATIVE_GUIDANCE,
    LORA_RANK,
    AttackSpec,
    Visibility,
)

Scheduler = Literal["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "pndm"]

# A registry id (app.registry.MODEL_ID_RE), as the OpenAPI document states it.
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN, examples=["shapes-sd"])]
# Seeds stay within the integers every JSON parser keeps exact (JavaScript's included).
MAX_SEED = 2**53 - 1
# Text that must hold more than white space: stated in the document, checked by a
# validator whose message says so ("must not be blank").
NOT_BLANK: JsonDict = {"pattern": r"\S"}


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


Prompt = Annotated[str, AfterValidator(_not_blank)]


# A job's states, and the three it ends in: one definition for the API, the job events the
# workers write and the SDK.
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINISHED: tuple[str, ...] = ("succeeded", "failed", "canceled")

class _Strict(BaseModel):
    # An unknown field is a typo the user wants to hear about, not silently ignore; a value
    # of the wrong JSON type (`"steps": "3"`, `"evaluate": 0`) is refused, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class UpscaleOptions(_Strict):
    """How to upscale: shared by POST /upscale and a cascade's ``upscale`` field."""

    model: ModelId | None = Field(None, description="An upscaler in the registry; default: "
                                  "LETHE_DEFAULT_UPSCALER.")
    prompt: str | None = Field(None, max_length=1000, description="The x4 upscaler is "
                               "text-conditioned; default: the source job's prompt, else empty.")
    steps: int | None = Field(None, ge=1, le=500, description="Default: the model's.")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    noise_level: int | None = Field(None, ge=0, le=1000,
                                    description="Noise added to the input; at most the model's "
                                    "max_noise_level.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Default: random.")


WebhookEvent = Literal["started", "progress", "completed"]


class _Hooked(_Strict):
    """What every job-creating body may add: where to POST the job's events."""

    webhook: str | None = Field(None, min_length=1, max_length=2000, description="An "
                                "http(s) URL the job's events are POSTed to, signed "
                                "(Standard Webhooks; needs LETHE_WEBHOOK_SECRET).")
    webhook_events: list[WebhookEvent] = Field(
        ["completed"], min_length=1, max_length=3, json_schema_extra={"uniqueItems": True},
        description="Which events: started, progress, completed (the final one).")


HOOK_FIELDS = {"webhook", "webhook_events"}


class GenerateCreate(_Hooked):
    prompt: Prompt = Field(..., min_length=1, max_length=1000, examples=["a red circle"],
                           json_schema_extra=NOT_BLANK)
    negative_prompt: str | None = Field(None, max_length=1000)
    model: ModelId | None = Field(None, description="Registry id; default: "
                                  "LETHE_DEFAULT_MODEL.")
    num_images: int = Field(1, ge=1, le=8)
    steps: int | None = Field(None, ge=1, le=500, description="Default: the model's.")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8,
                              description="At most the model's max_side.")
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8,
                               description="At most the model's max_side.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Default: random.")
    scheduler: Scheduler | None = None
    upscale: UpscaleOptions | None = Field(
        None, description="Cascade: upscale every generated image ×4 in the same job.")
    previews: int = Field(0, ge=0, le=500, description="Every this many steps, a `preview` "
                          "event on `GET /jobs/{id}/events`: the image the model is heading "
                          "for, as a small PNG. 0: none. A job with previews is not "
                          "batched with others.")


class ImageGeneration(_Strict):
    """POST /v1/images/generations: OpenAI's Images API, with Lethe's extensions."""

    prompt: Prompt = Field(..., min_length=1, max_length=1000, json_schema_extra=NOT_BLANK)
    n: int = Field(1, ge=1, le=8, description="Images to make (at most 8 a request).")
    size: str | None = Field(None, max_length=20, examples=["512x512"], description="'<width>"
                             "x<height>' (multiples of 8) or 'auto'; default: the model's.")
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url`: a signed link to the PNG on this service, good for "
        "LETHE_URL_TTL_S; `b64_json`: the PNG itself.")
    model: ModelId | None = Field(None, description="A text-to-image model of the registry "
                                  "(GET /v1/models); default: LETHE_DEFAULT_MODEL.")
    user: str | None = Field(None, max_length=256, description="The end user, for the "
                             "operator's logs.")
    # Accepted as OpenAI's clients send them; a diffusion model has no use for them.
    quality: str | None = Field(None, max_length=20, description="Accepted, not used.")
    style: str | None = Field(None, max_length=20, description="Accepted, not used.")
    output_format: Literal["png"] | None = None
    # Lethe's extensions (the openai SDK: `extra_body={...}`).
    negative_prompt: str | None = Field(None, max_length=1000)
    steps: int | None = Field(None, ge=1, le=500, description="Default: the model's.")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i; "
                             "the same as POST /generate with this seed.")
    scheduler: Scheduler | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    job_id: str = Field(..., description="Lethe's job (GET /jobs/{id}).")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModels(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class ImageSource(_Strict):
    job_id: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    index: int = Field(0, ge=0, le=1000)


class UpscaleCreate(UpscaleOptions, _Hooked):
    """JSON body of POST /upscale: exactly one of ``image`` (base64) and ``source``."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["image"], "properties": {"image": {"type": "string"}}},
        {"required": ["source"], "properties": {"source": {"type": "object"}}},
    ]})

    image: str | None = Field(None, min_length=1, description="Base64 PNG/JPEG/WebP/BMP "
                              "bytes (a `data:image/...;base64,` prefix is allowed).")
    source: ImageSource | None = Field(None, description="An earlier job's output image.")

    @model_validator(mode="after")
    def _one_input(self) -> UpscaleCreate:
        if (self.image is None) == (self.source is None):
            raise ValueError("give exactly one of `image` (base64) and `source` (job_id, index)")
        return self


EraseMethod = Literal["esd-x", "esd-u", "esd-all", "esd-x-strict"]
Concept = Annotated[str, Field(min_length=1, max_length=200, json_schema_extra=NOT_BLANK)]


class EraseCreate(_Hooked):
    base_model: ModelId | None = Field(None, description="Registry id; default: "
                                       "LETHE_DEFAULT_MODEL.")
    concepts: list[Concept] = Field(..., min_length=1, max_length=8, examples=[["triangle"]],
                                    json_schema_extra={"uniqueItems": True},
                                    description="Distinct, ignoring case.")
    method: EraseMethod | None = Field(
        None, description="Which weights train: esd-x (cross-attention), esd-x-strict (its "
        "keys and values only), esd-u (everything else), esd-all. Default: the model's, "
        "else esd-x (the paper's for one concept).")
    iterations: int | None = Field(None, ge=1, le=100_000, description="Default: the model's "
                                   "(else the paper's 1000) per concept.")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Default: the model's "
                                        "for the method (else the paper's 1e-5).")
    negative_guidance: float | None = Field(
        None, ge=0, le=100, description="η in the ESD paper: how far the edit steers away "
        "from the concept. Default: the model's, else the paper's "
        f"{ERASE_NEGATIVE_GUIDANCE}.")
    erase_from: str | None = Field(None, min_length=1, max_length=200)
    train_prompts: Literal["varied", "plain"] = Field(
        "varied", description="varied: train each concept inside the prompts it appears in "
        "(erases its rephrasings too); plain: the bare concept, as the ESD paper.")
    preserve: bool | None = Field(
        None, description="Hold the model unchanged on the erased concept's neighbours (the "
        "same prompts with another concept of its kind: other colours for a colour). Needs "
        "a model whose manifest names a known domain; default: on there, with varied "
        "prompts.")
    concept_kind: Literal["object", "style", "unsafe"] | None = Field(
        None, description="What the concepts are, for models of the generic domain: it "
        "picks the phrasings trained and the neighbours held. Default: inferred (a "
        "capitalised name or a word like 'style' is a style; 'nudity', 'violence'... unsafe; "
        "anything else an object).")
    preserve_prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=1, max_length=32, description="Prompts to hold unchanged while the "
        "concepts go (instead of the domain's neighbours).")
    visibility: Visibility | None = Field(
        None, description="Who sees and uses the edit: `private` (its owner and admins; "
        "404 to other keys) or `public` (every key). Default: private when the service has "
        "API keys, public when it is open.")
    name: ModelId | None = Field(None, description="Registry id of the result; default "
                                 "derived from the base and the concepts.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    evaluate: bool | None = Field(
        None, description="Measure every concept's accuracy before and after (ESD paper, "
        "Table 2). Default: when the base model names an evaluator.")
    attack: AttackSpec | None = Field(
        None, description="Attack the new edit once made (as POST /evaluate's `attack`; "
        "`concepts` default: the erased ones): the manifest's and the result's `attacks`.")
    drift_checks: int = Field(
        DRIFT_CHECKS, ge=0, le=20, description="How many times during training to measure "
        "the neighbour prompts' same-seed drift (PSNR, SSIM against the base); the last "
        "measure is the erase's evidence. 0: only that last one.")
    parameterization: Literal["full", "lora"] = Field(
        "full", description="full: the method's weights train (the paper); lora: a "
        "rank-`lora_rank` low-rank change of each of its matrices trains instead (biases "
        "stay): a delta of kilobytes. esd-x and esd-x-strict only.")
    lora_rank: int = Field(LORA_RANK, ge=1, le=256, description="The rank of each matrix's "
                           "change with `parameterization` lora.")
    anchor: Literal["without", "neighbour", "reference"] | None = Field(
        None, description="What each trained prompt is steered to. without: the prompt "
        "without the concept, moved away from it by η (ESD). neighbour: the same prompt "
        "with a neighbouring concept in its place (`anchor_concept`), so the "
        "concept's prompts draw that neighbour instead, as in concept ablation (Kumari et al., "
        "ICCV 2023); η 0 unless asked. Needs varied train_prompts and a neighbour: "
        "`anchor_concept`, preserve_prompts, or a domain that knows neighbours. reference: "
        "what the model retrained without the concept draws for each prompt (`lethe train "
        "DOMAIN --without CONCEPT`; one concept a job). Default: the model's "
        "`erase_defaults` where it can be had, else without.")
    anchor_concept: Concept | None = Field(
        None, description="The neighbour drawn in the erased concept's place in every "
        "prompt (\"orange\" for \"red\"); implies anchor neighbour. Default: the "
        "preserve_prompts in turn if given, else the domain's first neighbour of each "
        "concept (shapes-sd: the next shape or hue in its list).")
    robust: bool | None = Field(
        None, description="Adversarial training: every 8 iterations, an offset on the text "
        "encoder's output that brings the concept back in the model being trained is "
        "searched, and the concept is erased under it too (worker.esd.ESDConfig.robust). "
        "Slower; holds against conditioning attacks where the plain method does not. "
        "Default: the model's `erase_defaults`, else off (shapes-sd: off; its model card "
        "says why).")

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, v: list[str]) -> list[str]:
        if any(not c.strip() for c in v):
            raise ValueError("each concept must hold more than white space")
        if len({c.strip().lower() for c in v}) != len(v):
            raise ValueError("concepts must be distinct")
        return [c.strip() for c in v]


Metric = Literal["fid", "precision_recall", "attribute_score", "accuracy", "clip_score"]


class EvaluateCreate(_Hooked):
    """POST /evaluate: draw images from a model and measure them."""

    model: ModelId | None = Field(None, description="Registry id; default: "
                                  "LETHE_DEFAULT_MODEL.")
    prompts: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        None, min_length=1, max_length=500, description="The prompts to draw; or `prompt_set`.")
    prompt_set: ModelId | None = Field(
        None, description="A named set of the model's domain (GET /domains lists each "
        "domain's sets); default: the domain's, if it has one.")
    images_per_prompt: int = Field(8, ge=1, le=256)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Image j uses seed + j.")
    metrics: list[Metric] | None = Field(
        None, json_schema_extra={"uniqueItems": True},
        description="Default: the model's domain's (GET /domains; a model of no named "
        "domain: clip_score); [] with `attack`: the attacks alone.")
    reference: ModelId | None = Field(
        None, description="'render' (a domain that renders its own scenes: seeded renders of "
        "each prompt) or the name of a folder under $LETHE_HOME/references/ holding real "
        "images.")
    negative_prompt: str | None = Field(None, max_length=1000, description="Drawn with this "
                                        "negative prompt: the inference-time baseline for "
                                        "erasing a concept.")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    steps: int | None = Field(None, ge=1, le=500)
    attack: AttackSpec | None = Field(
        None, description="Also attack the erased concepts (inversion, an offset on the "
        "text encoder's output, relearning, prompt search) on the model and on its base, "
        "judged by the domain's judge: the report's `attacks`. Minutes of work per concept.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("must name distinct metrics")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self) -> EvaluateCreate:
        if self.prompts is not None and self.prompt_set is not None:
            raise ValueError("give `prompts` or `prompt_set`, not both")
        if self.metrics == [] and self.attack is None:
            raise ValueError("`metrics` [] measures nothing: name a metric, or give `attack`")
        return self


class Drift(BaseModel):
    iteration: int
    psnr: float | None = Field(None, description="None: the images did not move at all.")
    ssim: float


class Progress(BaseModel):
    step: int
    total: int
    fraction: float
    stage: str
    loss: float | None = Field(None, description="An erase's mean loss over its last 20 "
                               "iterations.")
    drift: Drift | None = Field(None, description="An erase's latest same-seed drift check "
                                "of the neighbour prompts.")


class JobLinks(BaseModel):
    self: str


class JobCreated(BaseModel):
    id: str
    type: str
    status: str
    links: JobLinks


class JobPublic(BaseModel):
    id: str
    type: str
    owner: str | None = Field(None, description="The name of the key that queued it.")
    status: JobStatus
    progress: Progress | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    params: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    links: JobLinks
    webhook: dict[str, Any] | None = Field(None, description="With a `webhook`: its "
                                           "deliveries' attempts, successes, last status.")


class JobsPage(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; "
                                    "null: this was the last.")


class ModelPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    format: str
    base: dict[str, Any] | None = None
    edit: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    defaults: dict[str, Any] | None = None
    reference_for: dict[str, str] | None = Field(
        None, description="Set on a model retrained without a concept (`lethe train DOMAIN "
        "--without CONCEPT`): `{base, concept}`. Attack and erasure reports on that base's "
        "edits give their gap to it.")
    created_at: str
    digest: str


class ModelChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    visibility: Visibility = Field(..., description="`private`: its owner and admins see "
                                   "and use it (404 to other keys); `public`: every key.")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    workers: int | None = None
    queues: dict[str, int] | None = Field(None, description="Live workers per queue.")
    detail: str | None = None
