"""Job functions the queues name by dotted path (``worker.jobs.generate``), one module per
job kind: ``generation``, ``upscaling``, ``erasure``, ``evaluation``, ``transfer`` (import
and export); ``base`` wraps each.

Each takes the queued spec (``app.jobspecs``, as JSON), validates it, reports progress in
``job.meta`` and returns a JSON-able result. Errors a user can act on are stored as
``meta["error"]`` (code and message); the traceback stays in the worker log.
"""

from worker.jobs.erasure import erase
from worker.jobs.evaluation import evaluate
from worker.jobs.generation import generate
from worker.jobs.transfer import export_model, import_model
from worker.jobs.upscaling import upscale

__all__ = ["erase", "evaluate", "export_model", "generate", "import_model", "upscale"]
