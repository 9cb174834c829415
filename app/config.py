"""Settings: one pydantic-settings class, read once, every field a ``LETHE_*`` variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.accounts import Caller, parse_keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LETHE_", extra="ignore")

    home: Path = Field(Path("./data"), description="Data folder: registry/, outputs/, redis/.")
    redis_url: str | None = Field(None, description="Unset: `lethe serve` embeds a Redis.")
    api_keys: str = Field("", description="Comma-separated bearer keys, each `key`, "
                          "`name:key` or `name:key:role` (role `user` or `admin`); empty: "
                          "an open service whose one caller is an admin.")
    allow_open: bool = Field(False, description="Let `lethe serve` listen on a non-loopback "
                             "address with no `LETHE_API_KEYS`: every caller an admin. Only "
                             "for a service meant to be open to whoever reaches it.")
    # The shipped demo models (worker/domains/shapes/models): meaningful pictures with no download.
    default_model: str = Field("shapes-sd", description="Model used when a request names none.")
    default_upscaler: str = Field("shapes-x4", description="Upscaler used when a request "
                                  "names none.")
    queues: str = Field("images,train", description="Queues a `lethe worker` listens on.")
    domains: str = Field("", description="Plug-in domains a worker adds to the built-in "
                         "ones: name=package.module:Class, comma-separated.")

    # Job lifetimes, in seconds.
    generate_timeout_s: int = 600
    train_timeout_s: int = 6 * 3600
    result_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="How long a finished job's "
                              "record, events and images are kept; then the reaper removes "
                              "its files.")
    reap_interval_s: int = Field(30, ge=1, description="Seconds between a worker's sweeps "
                                 "of expired outputs and abandoned checkpoints.")

    # Limits per key (0: none; none on the embedded single-user start), counted in Redis.
    rate_limit_per_minute: int = Field(0, ge=0, description="Requests a key may make in any "
                                       "60 s (the open routes are not counted).")
    max_active_jobs: int = Field(0, ge=0, description="Jobs a key may have queued or "
                                 "running at once.")
    max_images_per_day: int = Field(0, ge=0, description="Images a key may ask for per UTC "
                                    "day (generate counts its `n`, upscale 1).")
    max_holds_per_key: int = Field(8, ge=1, description="Event streams and long polls "
                                   "(`GET /jobs/{id}/events`, `?wait=`) a key may hold open "
                                   "at once on one API process (429 past it), on a service "
                                   "with keys.")
    max_holds: int = Field(256, ge=1, description="Event streams and long polls one API "
                           "process holds open in all (503 past it); its Redis pool for "
                           "them is this many connections and a few more.")
    idempotency_ttl_s: int = Field(24 * 3600, ge=1, description="How long an "
                                   "`Idempotency-Key` is remembered.")
    log_format: Literal["json", "text"] = Field("json", description="JSON lines (with the "
                                                "job id on a job's lines) or plain text.")
    # A running job whose worker stops heart-beating for this long is marked failed
    # (`worker_lost`); the worker beats every third of it from a side thread.
    heartbeat_ttl_s: int = 30
    progress_interval_s: float = Field(0.25, description="Least time between progress writes.")
    checkpoint_every: int = Field(50, description="ESD iterations between checkpoints.")
    train_retries: int = Field(2, description="Times a training job whose worker died is "
                               "re-queued; it resumes from its last checkpoint.")

    batch_max_images: int = Field(8, ge=1, description="Most images a worker draws in one "
                                  "pipeline call, taking compatible queued generate jobs "
                                  "along (1: no micro-batching).")

    # Pipeline cache bounds, per worker.
    cache_max_models: int = 4
    cache_max_bytes: int = 8 * 1024**3

    # Request bounds the API enforces before anything is queued.
    max_side: int = Field(2048, description="Largest width or height any model may be asked for.")
    max_body_bytes: int = 20 * 1024**2
    max_storage_bytes: int = Field(0, ge=0, description="Bytes of models (uploads, edits) "
                                   "a key may keep in the registry; an upload past it is "
                                   "refused before its first byte is stored (0: no limit).")
    max_exports_per_model: int = Field(4, ge=1, description="Export files (a format, "
                                       "dtype, rank) a model keeps for download; the least "
                                       "recently used go first.")
    max_upload_bytes: int = Field(16 * 1024**3, description="Largest checkpoint `POST /models` "
                                  "takes (SDXL in float32 is about 14 GB).")
    # Upscaling: the output's longest side, and the input tile above which the worker
    # upscales in overlapping tiles (what bounds its memory).
    max_upscale_side: int = Field(2048, description="Largest side of an upscaled image.")
    upscale_tile: int = Field(128, ge=16, description="Input pixels a side per upscale tile.")
    upscale_overlap: int = Field(16, ge=0, description="Input pixels neighbouring tiles share.")

    # Evaluation (POST /evaluate). Real-image metrics need models the operator provides on
    # disk: nothing is downloaded.
    clip_model_path: Path | None = Field(
        None, description="A local CLIP folder (transformers CLIPModel + CLIPProcessor) for "
        "`clip_score`, the erase evidence's CLIP verdicts, and the judge of attacks on models "
        "of the generic domain.")
    inception_path: Path | None = Field(
        None, description="A TorchScript file mapping uint8 N×3×H×W images to N×D features "
        "(Inception-v3 pool features) for FID and precision/recall where the model's domain has "
        "no judge of its own.")
    max_eval_images: int = Field(2000, description="Most images one evaluation may draw.")

    torch_threads: int = Field(0, ge=0, description="CPU threads a worker's torch uses; 0: "
                               "on the CPU one per core but one, left to the API and Redis "
                               "(torch's own default on a GPU).")

    webhook_secret: str = Field("", description="Signs webhook deliveries (Standard "
                                "Webhooks; `whsec_<base64>` or any string). Unset: jobs "
                                "cannot ask for a webhook.")
    webhook_allow: str = Field("", description="Hosts webhooks may target even on "
                               "loopback or private addresses, comma-separated.")
    webhook_retry_base_s: float = Field(1.0, gt=0, description="Scales the retry delays "
                                        "(5 s doubling to 10 min, 64 min in all at 1).")

    # Shared storage for the registry (hosts without a shared disk).
    storage_url: str = Field("", description="Unset: the registry is the folder under "
                             "LETHE_HOME. `s3://bucket/prefix`: on S3-compatible storage, "
                             "each host caching what it loads under LETHE_HOME/cache.")
    s3_endpoint_url: str = Field("", description="The S3 API's address for servers other "
                                 "than AWS (SeaweedFS, MinIO...).")
    storage_cache_bytes: int = Field(50 * 1024**3, ge=0, description="Most bytes of model "
                                     "files a host keeps fetched (least recently used go).")

    # The OpenAI-compatible routes (/v1/).
    openai_wait_s: float = Field(300, gt=0, le=3600, description="Longest POST "
                                 "/v1/images/generations holds a request for its job; past "
                                 "it the answer names the job to poll.")
    url_secret: str = Field("", description="Signs the image URLs /v1 answers with "
                            "(`response_format: url`); unset: a random secret kept in Redis, "
                            "shared by every API process.")
    url_ttl_s: int = Field(3600, ge=60, description="How long a signed image URL works.")
    public_url: str = Field("", description="The service's address as clients reach it "
                            "(`https://lethe.example.com`), for absolute image URLs; unset: "
                            "the address the request came to.")

    device: str = Field("auto", description="`auto` picks cuda when present, else cpu.")
    dtype: str = Field("auto", description="`auto`: float16 on cuda, float32 on cpu.")

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def references_dir(self) -> Path:
        """Operator-provided reference image folders, one per name, for POST /evaluate."""
        return self.home / "references"

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: str) -> str:
        parse_keys(value)  # a malformed entry stops the service at start, named
        return value

    @property
    def keys(self) -> dict[str, Caller]:
        """The callers by key (``app.accounts``)."""
        return parse_keys(self.api_keys)

    @property
    def webhook_hosts(self) -> set[str]:
        """``LETHE_WEBHOOK_ALLOW`` as a set of host names."""
        return {h.strip() for h in self.webhook_allow.split(",") if h.strip()}

    @property
    def queue_names(self) -> list[str]:
        return [q.strip() for q in self.queues.split(",") if q.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
