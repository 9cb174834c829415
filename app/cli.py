"""The ``lethe`` command.

``serve`` and ``models list|show|rm`` need only the API side; ``worker`` and
``models import|pull|export`` load the GPU side (torch) when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import ValidationError

from app.client import ApiError, LetheClient
from app.config import get_settings
from app.errors import LetheError
from app.registry import open_registry
from app.schemas import JobCreated, JobPublic


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from app.serve import serve

    settings = get_settings()
    if args.allow_open:
        settings = settings.model_copy(update={"allow_open": True})
    serve(args.host, args.port, workers=not args.no_workers, settings=settings)


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.runner import run_worker

    settings = get_settings()
    queues = args.queues.split(",") if args.queues else settings.queue_names
    run_worker(settings, queues, burst=args.burst, name=args.name)


def cmd_models(args: argparse.Namespace) -> None:
    registry = open_registry(get_settings())
    if args.action == "list":
        for m in registry.models():
            base = (m.get("base") or {}).get("id", "-")
            print(f"{m['id']:<24} {m['kind']:<14} {m['format']:<10} "
                  f"{m.get('visibility', 'public'):<8} base={base} "
                  f"owner={m.get('owner') or '-'}")
    elif args.action == "show":
        _print(registry.get(args.id))
    elif args.action == "rm":
        (registry.force_remove if args.force else registry.remove)(args.id)
        print(f"removed {args.id}")
    elif args.action == "import":
        from worker.importer import import_model

        _print(import_model(registry, Path(args.path), args.id, allow_pickle=args.allow_pickle,
                            prediction_type=args.prediction_type, base=args.base))
    elif args.action == "pull":
        from worker.importer import pull_model

        _print(pull_model(registry, args.hub_id, args.id))
    elif args.action == "export" and args.format == "lora":
        from worker.exporter import export_lora

        print(export_lora(registry, args.id, Path(args.to), rank=args.rank,
                          layout=args.lora_layout or "kohya", dtype=args.dtype or "float16"))
    elif args.action == "export" and args.format == "single-file":
        from worker.exporter import export_single_file

        print(export_single_file(registry, args.id, Path(args.to), args.dtype or "float16"))
    elif args.action == "export":
        from worker.exporter import export_model

        print(export_model(registry, args.id, Path(args.to), args.dtype or "float32"))


def cmd_train(args: argparse.Namespace) -> None:
    from worker.domains import DOMAINS, get_domain

    if args.domain not in DOMAINS:
        raise SystemExit(f"no domain {args.domain!r}; the domains are {sorted(DOMAINS)}")
    domain = get_domain(args.domain)
    if not hasattr(domain, "train"):
        raise SystemExit(f"domain {args.domain!r} has no models of its own to train")
    if args.without:
        from worker import reference

        try:
            manifest, made = reference.train(open_registry(get_settings()), domain, args.without,
                                             seed=args.seed, threads=args.threads,
                                             scale=args.scale)
        except ValueError as e:
            raise SystemExit(f"lethe train: {e}") from None
        print(f"{manifest['id']}: {'trained' if made else 'already in the registry'} "
              f"(the reference for {args.without!r} from {manifest['reference_for']['base']!r})")
        return
    if not args.out:
        raise SystemExit("lethe train: --out is required (or --without CONCEPT)")
    trained = domain.train(Path(args.out), seed=args.seed, threads=args.threads,
                           scale=args.scale)
    for model_id, path in trained.items():
        print(f"{model_id}: {path}")


def _client(url: str) -> LetheClient:
    # The host's CLI speaks for the operator: an admin key where there is one.
    keys = get_settings().keys
    key = min(keys, key=lambda k: (not keys[k].admin, keys[k].name)) if keys else None
    return LetheClient(url, api_key=key)


def _follow(client: LetheClient, job: JobCreated) -> JobPublic:
    """The job's events as a progress bar on stderr (tqdm); the finished job."""
    from tqdm import tqdm

    with tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        for event in client.events(job):
            if event.job is not None:
                return event.job
            if event.event != "progress":
                continue
            p = event.data
            bar.total, bar.n = p["total"], p["step"]
            bar.set_description(p["stage"], refresh=False)
            shown = {}
            if p.get("loss") is not None:
                shown["loss"] = f"{p['loss']:.4f}"
            if (p.get("drift") or {}).get("psnr"):
                shown["neighbours' PSNR"] = f"{p['drift']['psnr']} dB"
            bar.set_postfix(shown, refresh=False)
            bar.refresh()
    return client.job(job)  # the stream ended early (the service went away): its state


def _submit_and_wait(client: LetheClient, submit: Callable[[], JobCreated]) -> JobPublic:
    """Queue a job with ``submit`` (the SDK sends it with an Idempotency-Key and retries
    a lost connection), show its progress on stderr, return the finished job."""
    try:
        job = submit()
    except ApiError as refused:
        raise SystemExit(f"error {refused.status} {refused.code}: {refused.message}") from None
    except httpx.TransportError as lost:
        raise SystemExit(f"lethe: the service did not answer ({lost})") from None
    print(f"job {job.id}", file=sys.stderr)
    done = _follow(client, job)
    if done.status != "succeeded":
        raise SystemExit(f"job {done.status}: {done.error}")
    return done


def _save_images(client: LetheClient, job: JobPublic, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for image in (job.result or {})["images"]:
        path = out / f"{job.id}-{image['index']}.png"
        path.write_bytes(client.image(job, image["index"]))
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    """Client: POST /generate, poll the job, save its PNGs."""
    body = {
        "prompt": args.prompt, "model": args.model, "steps": args.steps, "seed": args.seed,
        "num_images": args.num_images, "width": args.width, "height": args.height,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler,
    }
    with _client(args.url) as client:
        _save_images(client, _submit_and_wait(client, lambda: client.generate(**body)),
                     Path(args.out))


def cmd_jobs(args: argparse.Namespace) -> None:
    """Client: the caller's jobs, newest first (an admin key's: everyone's)."""
    with _client(args.url) as client:
        try:
            for n, job in enumerate(client.jobs(status=args.status, type=args.type)):
                if n == args.limit:
                    break
                print(f"{job.id}  {job.type:<8} {job.status:<9} "
                      f"{job.created_at or '-':<27} {job.owner or '-'}")
        except ApiError as refused:
            raise SystemExit(f"error {refused.status} {refused.code}: {refused.message}"
                             ) from None


def cmd_upscale(args: argparse.Namespace) -> None:
    """Client: POST /upscale with an image file, follow the job, save the ×4 PNG."""
    path = Path(args.image)
    if not path.is_file():
        raise SystemExit(f"no image file {str(path)!r}")
    options = {"model": args.model, "prompt": args.prompt, "steps": args.steps,
               "seed": args.seed}
    with _client(args.url) as client:
        job = _submit_and_wait(client, lambda: client.upscale(image=path.read_bytes(),
                                                              **options))
        _save_images(client, job, Path(args.out))


def cmd_erase(args: argparse.Namespace) -> None:
    """Client: POST /erase, poll the job, print the new model's id."""
    body = {
        "base_model": args.base_model, "concepts": args.concepts, "method": args.method,
        "iterations": args.iterations, "learning_rate": args.learning_rate,
        "negative_guidance": args.negative_guidance, "erase_from": args.erase_from,
        "train_prompts": args.train_prompts, "preserve": args.preserve,
        "robust": args.robust, "anchor": args.anchor, "anchor_concept": args.anchor_concept,
        "name": args.name, "seed": args.seed, "visibility": args.visibility,
    }
    with _client(args.url) as client:
        job = _submit_and_wait(client, lambda: client.erase(**body))
        print((job.result or {})["model"])


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Client: POST /evaluate, poll the job, print the report as JSON."""
    body = {
        "model": args.model, "prompts": args.prompt or None, "prompt_set": args.prompt_set,
        "images_per_prompt": args.images_per_prompt, "seed": args.seed,
        "metrics": args.metric or None, "reference": args.reference,
        "negative_prompt": args.negative_prompt,
    }
    with _client(args.url) as client:
        job = _submit_and_wait(client, lambda: client.evaluate(**body))
        print(json.dumps((job.result or {})["report"], indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API, the workers and (unless configured) Redis")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-workers", action="store_true",
                   help="run only the API (workers run elsewhere, e.g. docker compose)")
    p.add_argument("--allow-open", action="store_true",
                   help="listen beyond loopback with no LETHE_API_KEYS (every caller an "
                   "admin): only for a service meant to be open")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one RQ worker (jobs run in-process)")
    p.add_argument("--queues", help="comma-separated; default LETHE_QUEUES (images,train)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default: random)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="the model registry")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    msub.add_parser("show").add_argument("id")
    rm = msub.add_parser("rm")
    rm.add_argument("id")
    rm.add_argument("--force", action="store_true", help="also remove a base model")
    imp = msub.add_parser("import", help="copy in a diffusers folder or a single-file "
                          "checkpoint (SD 1.x, 2.x, SDXL base; checked by loading it), or a "
                          "LoRA file as an edit of --base")
    imp.add_argument("path", help="a diffusers folder or a .safetensors file (a checkpoint "
                     "or a LoRA)")
    imp.add_argument("--id", required=True)
    imp.add_argument("--base", help="a LoRA file: the registered model it applies to (it "
                     "imports as an edit of that model)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="also read pickled .ckpt/.pt files (loading a pickle runs its code)")
    imp.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                     help="what the UNet predicts, where the file cannot say (SD 2.x: "
                     "v_prediction for the 768 models, the default; epsilon for 512 base)")
    pull = msub.add_parser("pull", help="download from a hub (machines with network only)")
    pull.add_argument("hub_id")
    pull.add_argument("--id", required=True)
    exp = msub.add_parser("export", help="write a standalone diffusers folder or single-file "
                          "checkpoint (edits merged), or an edit as a LoRA file for its base")
    exp.add_argument("id")
    exp.add_argument("--to", required=True,
                     help="a new folder (diffusers) or .safetensors file (single-file, lora)")
    exp.add_argument("--format", choices=["diffusers", "single-file", "lora"],
                     default="diffusers")
    exp.add_argument("--dtype", choices=["float32", "float16"],
                     help="default: float32 for diffusers, float16 for single-file and lora")
    exp.add_argument("--rank", type=int, help="lora: factors per changed matrix (default: "
                     "the least keeping 99%% of each difference's energy)")
    exp.add_argument("--lora-layout", choices=["kohya", "peft"],
                     help="lora: kohya (the default: AUTOMATIC1111, ComfyUI, Forge, InvokeAI "
                     "and diffusers read it) or peft (diffusers' own layout)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a domain's own models from scratch")
    p.add_argument("domain", help="a domain that ships models of its own (worker.domains)")
    p.add_argument("--out", help="folder for the trained model folders")
    p.add_argument("--without", metavar="CONCEPT",
                   help="instead: retrain the domain's model without CONCEPT and add it to "
                   "the registry (LETHE_HOME) as the reference its erasures are measured "
                   "against (<base>-without-<concept>; made once, reused)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every step count and data size (0.01 for a smoke run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("erase", help="client: erase concepts through a running service")
    p.add_argument("concepts", nargs="+")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--base-model")
    p.add_argument("--method", choices=["esd-x", "esd-u", "esd-all", "esd-x-strict"])
    p.add_argument("--iterations", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--negative-guidance", type=float)
    p.add_argument("--erase-from")
    p.add_argument("--train-prompts", choices=["varied", "plain"],
                   help="varied (default): the concept inside the prompts it appears in; "
                   "plain: the bare concept, as the ESD paper")
    p.add_argument("--preserve", action=argparse.BooleanOptionalAction,
                   help="hold the erased concept's neighbours (other colours for a colour); "
                   "default: on for models of a known domain")
    p.add_argument("--robust", action=argparse.BooleanOptionalAction,
                   help="adversarial training against offsets on the text encoding; "
                   "default: the model's")
    p.add_argument("--anchor", choices=["without", "neighbour"],
                   help="steer the concept's prompts away from it (without, ESD) or to a "
                   "neighbour's drawing (neighbour); default: the model's")
    p.add_argument("--anchor-concept", help="the neighbour drawn in the concept's place; "
                   "implies --anchor neighbour")
    p.add_argument("--name", help="registry id of the result")
    p.add_argument("--seed", type=int)
    p.add_argument("--visibility", choices=["private", "public"],
                   help="who sees the edit: its owner and admins (private) or every key; "
                   "default: private on a service with keys")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("evaluate", help="client: measure a model through a running service")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model")
    p.add_argument("--prompt", action="append", help="a prompt to draw (repeatable)")
    p.add_argument("--prompt-set", help="a named set of the model's domain (GET /domains)")
    p.add_argument("--images-per-prompt", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--metric", action="append",
                   choices=["fid", "precision_recall", "attribute_score", "accuracy",
                            "clip_score"], help="a metric (repeatable); default: the model's")
    p.add_argument("--reference", help="'render' or a folder name under $LETHE_HOME/references")
    p.add_argument("--negative-prompt")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="client: generate through a running service")
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default=".")
    p.add_argument("--model")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--scheduler")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("jobs", help="client: list your jobs, newest first")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                        "canceled"])
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("upscale", help="client: upscale an image ×4 through a running service")
    p.add_argument("image", help="a PNG, JPEG, WebP or BMP file")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default=".")
    p.add_argument("--model")
    p.add_argument("--prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_upscale)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LetheError as exc:
        raise SystemExit(f"lethe: {exc.message}") from None
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A setting the service cannot start with: each named, without a traceback.
        raise SystemExit("lethe: invalid settings:\n" + "\n".join(
            f"  LETHE_{'_'.join(map(str, e['loc'])).upper()}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())) from None


if __name__ == "__main__":
    main()
