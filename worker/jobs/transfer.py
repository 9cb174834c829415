"""The import and export jobs: a checkpoint uploaded over HTTP into the registry, and a
model written out in a format its users load elsewhere (the file a download streams)."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from app import jobfiles
from app.errors import InvalidParams
from app.exports import download_url
from app.jobspecs import ExportJob, ImportJob
from worker.context import get_context
from worker.jobs.base import job_function, owned
from worker.progress import Reporter


@job_function(ImportJob)
def import_model(spec: ImportJob, reporter: Reporter) -> dict:
    from worker.importer import import_model as run_import

    ctx = get_context()
    upload = ctx.settings.outputs_dir / spec.file
    if not jobfiles.fetch(ctx.settings, upload):
        raise InvalidParams(f"the uploaded checkpoint ({spec.file}) is no longer stored")
    reporter.progress(0, 1, "importing", force=True)
    try:
        manifest = run_import(ctx.registry, upload, spec.id,
                              prediction_type=spec.prediction_type,
                              source=f"uploaded as {spec.filename!r}",
                              extra=owned(spec.visibility),
                              base=spec.base, field="file")
    finally:
        jobfiles.remove(ctx.settings, upload)  # registered or refused, the upload has served
    reporter.progress(1, 1, "done", force=True)
    return {"model": manifest, "links": {"model": f"/models/{spec.id}"}}


@job_function(ExportJob)
def export_model(spec: ExportJob, reporter: Reporter) -> dict:
    from worker.exporter import export_lora, export_model, export_single_file

    ctx = get_context()
    registry = ctx.registry
    reporter.progress(0, 1, "exporting", force=True)
    target = registry.export_file(spec.model, spec.name)
    if target is None:
        # written beside where it is kept, so keeping it is a rename
        scratch = registry.exports_dir(spec.model)
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=scratch) as tmp:
            written = Path(tmp) / "out"
            if spec.format == "lora":
                export_lora(registry, spec.model, written, rank=spec.rank,
                            layout=spec.lora_layout, dtype=spec.dtype)
            elif spec.format == "single-file":
                export_single_file(registry, spec.model, written, spec.dtype)
            else:
                export_model(registry, spec.model, written, spec.dtype)
                written = _zip(written, Path(tmp) / "out.zip", spec.model)
            target = registry.keep_export(spec.model, spec.name, written,
                                             ctx.settings.max_exports_per_model)
    reporter.progress(1, 1, "done", force=True)
    return {"model": spec.model, "format": spec.format, "bytes": target.stat().st_size,
            "links": {"download": download_url(
                spec.model, spec.format, spec.dtype, spec.rank,
                spec.lora_layout if spec.format == "lora" else None)}}


def _zip(folder: Path, dest: Path, top: str) -> Path:
    """A folder as a zip whose entries sit under ``top/`` (weights stored, not deflated:
    they do not compress and the zip would take minutes longer)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"{top}/{path.relative_to(folder)}")
    shutil.rmtree(folder)
    return dest
