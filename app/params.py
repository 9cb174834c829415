"""Request bodies into job params: defaults from the model's manifest, limits checked.

What a job runs with is decided here, in the API, so ``GET /jobs/{id}`` shows the exact
parameters (seed included) that reproduce it, and a bad request fails before it is queued.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from redis import Redis

from app import jobfiles, jobs
from app import jobspecs as d
from app.accounts import Caller
from app.config import Settings
from app.errors import InvalidParams, Unavailable
from app.jobspecs import (
    RELEARN_LEARNING_RATE,
    AttackSpec,
    EraseJob,
    EvaluateJob,
    GenerateJob,
    UpscaleJob,
    Visibility,
)
from app.registry import Registry, reserved_ids, validate_model_id
from app.schemas import (
    HOOK_FIELDS,
    EraseCreate,
    EvaluateCreate,
    GenerateCreate,
    ImageSource,
    UpscaleOptions,
)

SCALE = d.UPSCALE_FACTOR


def _drawing_defaults(manifest: dict) -> dict[str, Any]:
    """How a model draws when a request does not say: its manifest's ``defaults``, else
    ``app.jobspecs``' (Stable Diffusion's: 30 DDIM steps at guidance 7.5, 512×512)."""
    m = manifest.get("defaults") or {}
    side = m.get("size") or d.DRAW_SIDE
    return {"steps": m.get("steps") or d.DRAW_STEPS,
            "guidance_scale": d.DRAW_GUIDANCE if m.get("guidance_scale") is None
            else m["guidance_scale"],
            "scheduler": m.get("scheduler") or d.DRAW_SCHEDULER,
            "height": m.get("height") or side, "width": m.get("width") or side}


def _text_to_image(registry: Registry, model_id: str) -> dict:
    """The manifest of ``model_id``, which must draw images from text (a base or an edit)."""
    manifest = registry.get(model_id)
    if manifest["kind"] != "text-to-image":
        raise InvalidParams(
            f"`model` {model_id!r} is a {manifest['kind']} model, not text-to-image")
    return manifest


def resolve_generate(body: GenerateCreate, registry: Registry, settings: Settings
                     ) -> GenerateJob:
    """Fill defaults from the model's manifest and check the request against its limits."""
    model_id = body.model or settings.default_model
    max_side = settings.max_side
    manifest = _text_to_image(registry, model_id)
    defaults = _drawing_defaults(manifest)
    params = body.model_dump(exclude=HOOK_FIELDS)
    params["model"] = model_id
    for key in ("steps", "guidance_scale", "width", "height", "scheduler"):
        if params[key] is None:
            params[key] = defaults[key]
    if params["seed"] is None:  # drawn here so the job's params say how to reproduce it
        params["seed"] = secrets.randbelow(2**31)
    limit = min(int((manifest.get("limits") or {}).get("max_side", max_side)), max_side)
    for side in ("width", "height"):
        if params[side] > limit:
            raise InvalidParams(
                f"`{side}` must be at most {limit} for model {model_id!r}, got {params[side]}"
            )
    if body.upscale is not None:  # a cascade: the same job upscales what it generated
        check_input_size(params["width"], params["height"], settings, "width/height")
        params["upscale"] = resolve_upscale(body.upscale, registry, settings,
                                            prompt=params["prompt"], seed=params["seed"])
    return GenerateJob(**params)


def _domain(registry: Registry, manifest: dict) -> tuple[str | None, dict[str, Any]]:
    """A model's domain (its own, else its base's) and what the workers published about it
    (``worker.domains``: prompt sets, default metrics, judge, references, preservation)."""
    name = _lineage_value(manifest, registry, "domain")
    info = registry.domains().get(name or d.GENERIC)
    if info is None:
        if name is not None:
            raise Unavailable(f"model {manifest['id']!r} belongs to domain {name!r}, which no "
                              "worker has published; start a worker that knows it "
                              "(LETHE_DOMAINS)")
        info = d.GENERIC_OFFER  # no worker has started yet: what any model offers
    return name, info


def _resolve_preserve(body: EraseCreate, domain: str | None, info: dict, base_id: str
                      ) -> bool:
    if body.preserve_prompts is not None:
        if body.preserve is False or body.train_prompts != "varied":
            raise InvalidParams("`preserve_prompts` are held while varied prompts are trained: "
                                f"they need preserve true and train_prompts 'varied', got "
                                f"preserve {body.preserve!r}, train_prompts "
                                f"{body.train_prompts!r}")
        return True
    known = bool(info["preserve"]) and body.train_prompts == "varied"
    if body.preserve and not known:
        raise InvalidParams(
            f"`preserve` is true but model {base_id!r} has no domain whose neighbouring "
            f"concepts are known (domain {domain!r}, train_prompts {body.train_prompts!r}); "
            "it needs a domain that knows neighbours and train_prompts 'varied'")
    return known if body.preserve is None else body.preserve


def _resolve_anchor(body: EraseCreate, defaults: dict, info: dict,
                    reference: dict | None) -> str:
    """The request's anchor (``anchor_concept`` implies neighbour), else the model's where
    it can be had (a neighbour known; the ``reference`` retrained without the concept, for
    one concept), else "without"."""
    asked = body.anchor or ("neighbour" if body.anchor_concept else None)
    if asked == "reference" and (reference is None or len(body.concepts) != 1):
        raise InvalidParams(
            f"`anchor` 'reference' teaches the edit what the model retrained without the "
            f"concept draws: it erases one concept of a model that has one (`lethe train "
            f"DOMAIN --without CONCEPT`), got concepts {body.concepts} on "
            f"{body.base_model or 'the default model'!r}, which has "
            f"{'one' if reference else 'none'}")
    if asked is None and defaults.get("anchor") == "reference":
        if reference is not None and len(body.concepts) == 1:
            return "reference"
        defaults = {k: v for k, v in defaults.items() if k != "anchor"}
    if body.anchor_concept is not None:
        if asked != "neighbour":
            raise InvalidParams(f"`anchor_concept` {body.anchor_concept!r} is the neighbour "
                                f"anchor's concept: it needs anchor 'neighbour', got "
                                f"{body.anchor!r}")
        if body.anchor_concept.strip().lower() in {c.strip().lower() for c in body.concepts}:
            raise InvalidParams(f"`anchor_concept` {body.anchor_concept!r} is one of the "
                                f"concepts erased, {body.concepts}")
    # A neighbour: the request's concept or preserve prompts, or the domain's neighbours.
    known = bool(body.anchor_concept or body.preserve_prompts or info["preserve"])
    possible = known and body.train_prompts == "varied"
    if asked == "neighbour" and not possible:
        raise InvalidParams("`anchor` 'neighbour' steers each prompt to a neighbour's: it "
                            "needs train_prompts 'varied' and a neighbour (anchor_concept, "
                            "preserve_prompts, or a domain that knows neighbours), got "
                            f"train_prompts {body.train_prompts!r}, anchor_concept "
                            f"{body.anchor_concept!r}")
    if asked is not None:
        return asked
    return str(defaults.get("anchor", "without")) if possible else "without"


def resolve_erase(body: EraseCreate, registry: Registry, settings: Settings) -> EraseJob:
    base_id = body.base_model or settings.default_model
    manifest = registry.get(base_id)
    if manifest["kind"] != "text-to-image" or manifest["format"] not in ("diffusers", "delta"):
        raise InvalidParams(
            f"`base_model` must be a text-to-image model or an edit of one, got {base_id!r} "
            f"({manifest['kind']}, {manifest['format']})"
        )
    # An edit (an erase's, an imported LoRA) erases as its base does.
    defaults = dict(_lineage_value(manifest, registry, "erase_defaults") or {})
    method = body.method or defaults.get("method") or d.ERASE_METHOD
    # A method may need its own step size (esd-u trains far more weights than esd-x), and
    # so may a LoRA (its factors start from zero).
    defaults |= (defaults.pop("by_method", None) or {}).get(method, {})
    defaults |= (defaults.pop("by_parameterization", None) or {}).get(body.parameterization,
                                                                       {})
    evaluator = manifest.get("evaluator")
    if body.evaluate and not evaluator:
        raise InvalidParams(
            f"`evaluate` is true but model {base_id!r} names no evaluator (a classifier of its "
            "domain) in its manifest"
        )
    if body.parameterization == "lora" and method not in ("esd-x", "esd-x-strict"):
        raise InvalidParams(f"`parameterization` 'lora' trains the cross-attention "
                            f"projections: `method` esd-x or esd-x-strict, got {method!r}")
    params = body.model_dump(exclude=HOOK_FIELDS)
    params["method"] = method
    params["evaluate"] = bool(evaluator) if body.evaluate is None else body.evaluate
    params["evaluator"] = evaluator
    params["base_model"] = base_id
    # A default is per concept: a job erasing two trains each as long as a job erasing one.
    params["iterations"] = params["iterations"] or (
        defaults.get("iterations", d.ERASE_ITERATIONS) * len(body.concepts))
    params["learning_rate"] = params["learning_rate"] or defaults.get("learning_rate",
                                                                      d.ERASE_LEARNING_RATE)
    params["ddim_steps"] = defaults.get("ddim_steps", d.ERASE_DDIM_STEPS)
    params["start_guidance"] = defaults.get("start_guidance", d.ERASE_START_GUIDANCE)
    params["preserve_weight"] = defaults.get("preserve_weight", d.PRESERVE_WEIGHT)
    if body.robust is None:
        params["robust"] = bool(defaults.get("robust", False))
    params["domain"], info = _domain(registry, manifest)  # prompt forms, neighbours
    params["preserve"] = _resolve_preserve(body, params["domain"], info, base_id)
    # Read every manifest only where a reference anchor is asked for or is the default.
    wanted = body.anchor == "reference" or (body.anchor is None and body.anchor_concept is None
                                            and defaults.get("anchor") == "reference")
    reference = registry.reference_for(base_id, body.concepts[0]) if wanted else None
    params["anchor"] = _resolve_anchor(body, defaults, info, reference)
    params["reference"] = reference["id"] if params["anchor"] == "reference" and reference \
        else None
    if body.negative_guidance is None:
        # A neighbour anchor is the drawing wanted in the concept's place: nothing to steer
        # away from beyond it.
        params["negative_guidance"] = 0.0 if params["anchor"] in ("neighbour", "reference") else (
            defaults.get("negative_guidance", d.ERASE_NEGATIVE_GUIDANCE))
    kinds = info.get("concept_kinds") or []
    if body.concept_kind is not None and body.concept_kind not in kinds:
        raise InvalidParams(f"`concept_kind` {body.concept_kind!r} means nothing to model "
                            f"{base_id!r}'s domain ({params['domain'] or d.GENERIC}), which "
                            f"knows {kinds or 'no kinds'}")
    gen = _drawing_defaults(manifest)
    params["height"], params["width"] = gen["height"], gen["width"]
    # How the job's comparison grid is drawn (worker.evidence): as the model draws.
    params["draw_steps"], params["draw_guidance"] = gen["steps"], gen["guidance_scale"]
    if body.name:
        params["name"] = registry.check_new_id(body.name, "name", reserved_ids(settings))
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", "-".join(body.concepts).lower()).strip("-")[:30]
        params["name"] = registry.free_id(f"{base_id[:24]}-no-{slug or 'concept'}")
    # A derived name is a suggestion: if another job takes it first, this one publishes
    # under the next free one rather than fail after its training.
    params["name_given"] = bool(body.name)
    params["visibility"] = visibility(body.visibility, settings, manifest)
    if body.attack is not None:
        _attackable(manifest, base_id, registry)
        params["attack"] = body.attack.model_copy(update={
            "concepts": body.attack.concepts or list(body.concepts),
            "relearn_lr": body.attack.relearn_lr or params["learning_rate"]})
    return EraseJob(**params)


def visibility(asked: Visibility | None, settings: Settings,
               base: dict[str, Any] | None = None) -> Visibility:
    """Who sees a model a request makes: as asked, else private on a service with keys
    (many users share it) and public on an open one (its one user sees all anyway). An
    edit of a private ``base`` is private: a public model's lineage is public."""
    if base is not None and base.get("visibility") == "private":
        if asked == "public":
            raise InvalidParams(f"`visibility` 'public' for an edit of the private model "
                                f"{base['id']!r}: make that one public first")
        return "private"
    return asked or ("private" if settings.keys else "public")


# Metrics that compare with real images, and those that need the domain's classifier.
REFERENCE_METRICS = {"fid", "precision_recall"}
JUDGE_METRICS = {"attribute_score", "accuracy"}
def _lineage_value(manifest: dict, registry: Registry, key: str) -> Any:
    """``key`` from a manifest, else from its base's (an edit measures like its base)."""
    if manifest.get(key) is not None or not manifest.get("base"):
        return manifest.get(key)
    return registry.get(manifest["base"]["id"]).get(key)


def resolve_evaluate(body: EvaluateCreate, registry: Registry, settings: Settings
                     ) -> EvaluateJob:
    """Check that every metric asked for can be computed here, before anything is queued."""
    model_id = body.model or settings.default_model
    manifest = _text_to_image(registry, model_id)
    domain, info = _domain(registry, manifest)
    judged = bool(info["judge_metrics"])  # the domain has a classifier to judge with
    evaluator = _lineage_value(manifest, registry, "evaluator") if judged else None
    sets: dict[str, int] = info["prompt_sets"]
    metrics = info["default_metrics"] if body.metrics is None else body.metrics
    if (metrics and body.prompts is None and body.prompt_set is None
            and not info["default_prompt_set"]):
        raise InvalidParams(f"`prompts` is required for model {model_id!r}: its domain "
                            f"({domain or d.GENERIC}) has no default prompt set")
    if body.prompt_set is not None and body.prompt_set not in sets:
        raise InvalidParams(f"`prompt_set` {body.prompt_set!r} is not a set of model "
                            f"{model_id!r}'s domain ({domain or d.GENERIC}), which has "
                            f"{sorted(sets) or 'none'}")
    if "clip_score" in metrics and settings.clip_model_path is None:
        raise InvalidParams("`metrics` asks for 'clip_score' but no CLIP model is configured: "
                            "set LETHE_CLIP_MODEL_PATH to a local CLIP folder")
    if JUDGE_METRICS & set(metrics) and not evaluator:
        raise InvalidParams(f"`metrics` {sorted(JUDGE_METRICS & set(metrics))} need the "
                            f"model's domain classifier; model {model_id!r} names none")
    reference = body.reference or info["reference"]
    if REFERENCE_METRICS & set(metrics):
        _check_reference(reference, info, evaluator, settings)
    n_prompts = len(body.prompts) if body.prompts is not None else None
    params = body.model_dump(exclude=HOOK_FIELDS)
    params.update(model=model_id, metrics=list(metrics), reference=reference,
                  domain=domain, evaluator=evaluator,
                  prompt_set=None if body.prompts is not None else
                  (body.prompt_set or info["default_prompt_set"]))
    total = (n_prompts or sets[params["prompt_set"]]) * body.images_per_prompt if metrics else 0
    if total > settings.max_eval_images:
        raise InvalidParams(f"`images_per_prompt` {body.images_per_prompt} × "
                            f"{total // body.images_per_prompt} prompts is {total} images; "
                            f"the limit is {settings.max_eval_images} (LETHE_MAX_EVAL_IMAGES)")
    if "precision_recall" in metrics and total < 8:
        raise InvalidParams(f"`metrics` precision_recall needs at least 8 images, the request "
                            f"draws {total}")
    defaults = _drawing_defaults(manifest)
    params["steps"] = body.steps or defaults["steps"]
    params["guidance_scale"] = (defaults["guidance_scale"] if body.guidance_scale is None
                                else body.guidance_scale)
    params["height"], params["width"] = defaults["height"], defaults["width"]
    if body.attack is not None:
        params["attack"] = _resolve_attack(body.attack, manifest, model_id, registry)
        params["attack_base"] = (manifest.get("base") or {}).get("id") or model_id
    return EvaluateJob(**params)


def _resolve_attack(attack: AttackSpec, manifest: dict, model_id: str, registry: Registry
                    ) -> AttackSpec:
    """The attacks' concepts and relearning step from the edit itself where not given."""
    edit = manifest.get("edit") or {}
    concepts = attack.concepts or edit.get("concepts")
    if not concepts:
        raise InvalidParams(f"`attack.concepts` is required for model {model_id!r}: it is "
                            "no edit, so it names no erased concept")
    if "relearning" in attack.attacks and manifest.get("format") != "delta":
        raise InvalidParams(f"`attack.attacks` 'relearning' retrains an edit's parameters; "
                            f"model {model_id!r} is no edit")
    _attackable(manifest, model_id, registry)
    return attack.model_copy(update={
        "concepts": list(concepts),
        "relearn_lr": attack.relearn_lr or edit.get("learning_rate") or RELEARN_LEARNING_RATE})


def _attackable(manifest: dict, model_id: str, registry: Registry) -> None:
    if "XL" in str(_lineage_value(manifest, registry, "pipeline") or ""):
        raise InvalidParams(f"`attack` supports Stable Diffusion 1.x/2.x models; model "
                            f"{model_id!r} is SDXL (two text encoders), not supported yet")


# How messages name the references folder: by its setting, not by this machine's path.
REFERENCES_SHOWN = "$LETHE_HOME/references/"


def _check_reference(reference: str | None, info: dict, evaluator: str | None,
                     settings: Settings) -> None:
    if reference == "render":
        if not (info["reference"] == "render" and evaluator):
            raise InvalidParams("`reference` 'render' needs a domain that renders its own "
                                "scenes, and this model's does not: name a folder under "
                                f"{REFERENCES_SHOWN}")
        return
    if reference is None:
        raise InvalidParams("`metrics` fid and precision_recall compare with real images: "
                            f"set `reference` to a folder name under {REFERENCES_SHOWN}")
    validate_model_id(reference, "reference")  # a plain folder name, never a path
    folder = settings.references_dir / reference
    if not folder.is_dir() or not any(p.suffix.lower() in d.IMAGE_SUFFIXES
                                      for p in folder.iterdir()):
        raise InvalidParams(f"`reference` {reference!r} is not a folder of images under "
                            f"{REFERENCES_SHOWN}")
    if settings.inception_path is None:
        raise InvalidParams("`metrics` fid and precision_recall on real images need an "
                            "Inception feature extractor: set LETHE_INCEPTION_PATH to a "
                            "local TorchScript file")


def resolve_upscale(options: UpscaleOptions, registry: Registry, settings: Settings,
                    prompt: str | None = None, seed: int | None = None,
                    **inputs: Any) -> UpscaleJob:
    """Fill an upscale's defaults from the upscaler's manifest and check them against it;
    ``prompt`` and ``seed`` are the fallbacks a source or cascade supplies; ``inputs``
    (``input``, ``source``) say where POST /upscale's image is stored."""
    model_id = options.model or settings.default_upscaler
    manifest = registry.get(model_id)
    if manifest["kind"] != "upscaler":
        raise InvalidParams(f"`model` {model_id!r} is a {manifest['kind']} model, not an upscaler")
    defaults = manifest.get("defaults") or {}
    # Only the options: a JSON body's `image` (base64) is stored as a file, never queued.
    params = options.model_dump(include=set(UpscaleOptions.model_fields))
    params["model"] = model_id
    params["prompt"] = params["prompt"] if params["prompt"] is not None else (prompt or "")
    params["steps"] = params["steps"] or defaults.get("steps", d.UPSCALE_STEPS)
    for key, fallback in (("guidance_scale", d.UPSCALE_GUIDANCE),
                          ("noise_level", d.UPSCALE_NOISE_LEVEL)):
        if params[key] is None:
            params[key] = defaults.get(key, fallback)
    index = registry.path(model_id) / "model_index.json"
    max_noise = json.loads(index.read_text()).get("max_noise_level", 350) if index.is_file() \
        else 350
    if params["noise_level"] > max_noise:
        raise InvalidParams(f"`noise_level` must be at most {max_noise} for model {model_id!r}, "
                            f"got {params['noise_level']}")
    if params["seed"] is None:
        params["seed"] = secrets.randbelow(2**31) if seed is None else seed
    params["tile"], params["overlap"] = settings.upscale_tile, settings.upscale_overlap
    return UpscaleJob(**params, **inputs)


def check_input_size(width: int, height: int, settings: Settings, field: str) -> None:
    limit = settings.max_upscale_side // SCALE
    if width > limit or height > limit:
        raise InvalidParams(
            f"`{field}` is {width}×{height}; upscaled ×{SCALE} it would pass the "
            f"{settings.max_upscale_side}-pixel limit (LETHE_MAX_UPSCALE_SIDE), so at most "
            f"{limit} a side")


def resolve_source(source: ImageSource, redis: Redis, settings: Settings, caller: Caller
                   ) -> tuple[str, str]:
    """(input path relative to outputs/, its prompt) of a job's output image, one of
    ``caller``'s jobs (another's is not found)."""
    view = jobs.describe(jobs.fetch_for(redis, source.job_id, caller))
    path, entry = jobfiles.stored_image(settings, view, source.index, "source.")
    rel = path.relative_to(settings.outputs_dir).as_posix()
    check_input_size(entry["width"], entry["height"], settings, "source")
    return rel, (view["params"] or {}).get("prompt", "")
