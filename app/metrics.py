"""Prometheus metrics of the whole service, kept in Redis: one scrape of any API process
sees every API process and every worker.

The API and the workers add to counters and histograms in one Redis hash (``HINCRBY`` is
atomic, so nothing is lost between processes or hosts); what can be read at any time
(queue depths, live workers' pipeline caches, disk use) is read when ``/metrics`` is
scraped. prometheus-client builds the families and writes the exposition format. No torch:
the workers' own numbers reach this module as plain values.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import StartedJobRegistry

log = logging.getLogger("lethe.metrics")

HASH = "lethe:metrics"
_ENDED = "lethe:metrics:ended:"  # a job's end is counted once, whoever reports it first

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lethe_jobs_submitted": ("Jobs queued, by type.", ("type",)),
    "lethe_jobs_finished": ("Jobs that ended, by type and final status.", ("type", "status")),
    "lethe_images": ("Images made by succeeded generate and upscale jobs.", ("type",)),
    "lethe_esd_iterations": ("ESD training iterations run (a resumed erase counts only "
                             "what it ran after resuming).", ()),
    "lethe_esd_train_seconds": ("Seconds spent in ESD training loops; "
                                "rate(iterations) / rate(seconds) is iterations per second.",
                                ()),
    "lethe_webhook_deliveries": ("Webhook delivery attempts, by outcome (delivered, "
                                 "retrying: failed with a retry to come, failed: given up).",
                                 ("outcome",)),
}
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lethe_esd_iterations_per_second": ("Iterations per second of the latest erase.", ()),
}
_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
_RUN_BUCKETS = (0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "lethe_job_queue_wait_seconds": ("From a job's submission to its (last) start, by type.",
                                     ("type",), _WAIT_BUCKETS),
    "lethe_job_run_seconds": ("From a job's (last) start to its end, by type.", ("type",),
                              _RUN_BUCKETS),
}


def _field(name: str, labels: dict[str, str], part: str = "") -> str:
    return json.dumps([name, labels, part], sort_keys=True)


def inc(redis: Redis | Pipeline | Any, name: str, by: float = 1, **labels: str) -> None:
    assert name in COUNTERS, name
    redis.hincrbyfloat(HASH, _field(name, labels), by)


def set_gauge(redis: Redis | Pipeline, name: str, value: float, **labels: str) -> None:
    assert name in GAUGES, name
    redis.hset(HASH, _field(name, labels), value)


def observe(redis: Redis | Pipeline, name: str, value: float, **labels: str) -> None:
    _, _, buckets = HISTOGRAMS[name]
    for le in (*buckets, float("inf")):
        if value <= le:
            redis.hincrby(HASH, _field(name, labels, f"le={le}"), 1)
    redis.hincrbyfloat(HASH, _field(name, labels, "sum"), value)
    redis.hincrby(HASH, _field(name, labels, "count"), 1)


def safely(fn: Any, *args: Any, **kwargs: Any) -> None:
    """A metric the service could not write is logged, never an error of the request or
    job that made it."""
    try:
        fn(*args, **kwargs)
    except RedisError:
        log.warning("a metric was not recorded: Redis did not answer", exc_info=True)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    delta = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(
        start.replace("Z", "+00:00"))
    return max(0.0, delta.total_seconds())


def job_ended(connection: Redis, view: dict[str, Any], ttl_s: int) -> None:
    """Count a job's end (its public view), once however many of the worker, the reaper and
    a cancel report it."""
    if not connection.set(_ENDED + view["id"], 1, nx=True, ex=max(ttl_s, 60)):
        return
    job_type, status = view["type"], view["status"]
    with connection.pipeline(transaction=False) as pipe:
        inc(pipe, "lethe_jobs_finished", type=job_type, status=status)
        wait = _seconds(view.get("created_at"), view.get("started_at"))
        run = _seconds(view.get("started_at"), view.get("ended_at"))
        if wait is not None:
            observe(pipe, "lethe_job_queue_wait_seconds", wait, type=job_type)
        if run is not None:
            observe(pipe, "lethe_job_run_seconds", run, type=job_type)
        images = (view.get("result") or {}).get("images") or []
        if status == "succeeded" and job_type in ("generate", "upscale") and images:
            inc(pipe, "lethe_images", len(images), type=job_type)
        pipe.execute()


def esd_trained(connection: Redis, iterations: int, seconds: float) -> None:
    """An erase's training loop ran ``iterations`` in ``seconds`` (drift checks included)."""
    with connection.pipeline(transaction=False) as pipe:
        inc(pipe, "lethe_esd_iterations", iterations)
        inc(pipe, "lethe_esd_train_seconds", seconds)
        set_gauge(pipe, "lethe_esd_iterations_per_second", iterations / max(seconds, 1e-9))
        pipe.execute()


def _stored(connection: Redis) -> Iterator[tuple[str, dict[str, str], str, float]]:
    for raw, value in connection.hgetall(HASH).items():
        name, labels, part = json.loads(raw)
        yield name, labels, part, float(value)


def _label_values(labels: dict[str, str], names: tuple[str, ...]) -> list[str]:
    return [str(labels.get(n, "")) for n in names]


def _disk_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we walked
    return total


class ServiceCollector(Collector):
    """Everything ``/metrics`` shows, read when it is scraped."""

    def __init__(self, connection: Redis, queues: list[str], home: Path,
                 workers: dict[str, dict[str, Any]]):
        self.connection, self.queues, self.home, self.workers = connection, queues, home, workers

    def collect(self) -> Iterator[Metric]:
        stored = list(_stored(self.connection))
        yield from self._counters(stored)
        yield from self._histograms(stored)
        yield from self._queues()
        yield from self._caches()
        disk = GaugeMetricFamily("lethe_disk_bytes", "Bytes on disk under LETHE_HOME, by "
                                 "area.", labels=["area"])
        for area in ("outputs", "checkpoints", "registry"):
            disk.add_metric([area], _disk_bytes(self.home / area))
        yield disk

    def _counters(self, stored: list) -> Iterator[Metric]:
        kinds = [(CounterMetricFamily, COUNTERS), (GaugeMetricFamily, GAUGES)]
        for kind, table in kinds:
            for name, (doc, label_names) in table.items():
                family = kind(name, doc, labels=label_names)
                for got, labels, _, value in stored:
                    if got == name:
                        family.add_metric(_label_values(labels, label_names), value)
                yield family

    def _histograms(self, stored: list) -> Iterator[Metric]:
        for name, (doc, label_names, buckets) in HISTOGRAMS.items():
            series: dict[tuple, dict[str, float]] = defaultdict(dict)
            for got, labels, part, value in stored:
                if got == name:
                    series[tuple(_label_values(labels, label_names))][part] = value
            family = HistogramMetricFamily(name, doc, labels=label_names)
            for values, parts in sorted(series.items()):
                counts = [(_le_text(le), parts.get(f"le={le}", 0.0))
                          for le in (*buckets, float("inf"))]
                family.add_metric(list(values), counts, parts.get("sum", 0.0))
            yield family

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("lethe_queue_depth", "Jobs waiting in each queue.",
                                  labels=["queue"])
        running = GaugeMetricFamily("lethe_jobs_running", "Jobs running from each queue.",
                                    labels=["queue"])
        for name in self.queues:
            depth.add_metric([name], Queue(name, connection=self.connection).count)
            running.add_metric([name], StartedJobRegistry(name, connection=self.connection
                                                          ).count)
        yield depth
        yield running
        alive = GaugeMetricFamily("lethe_workers", "Workers alive (beating).")
        alive.add_metric([], len(self.workers))
        yield alive

    def _caches(self) -> Iterator[Metric]:
        """Each live worker's pipeline cache, as of its last beat."""
        counters = {"hits": "Pipeline-cache hits.", "loads": "Pipeline-cache misses "
                    "(models loaded).", "evictions": "Models evicted from the pipeline cache."}
        for part, doc in counters.items():
            family = CounterMetricFamily(f"lethe_pipeline_cache_{part}", doc, labels=["worker"])
            for worker, info in sorted(self.workers.items()):
                if "cache" in info:
                    family.add_metric([worker], info["cache"][part])
            yield family
        for part, doc in {"bytes": "Bytes of the models in each worker's pipeline cache.",
                          "models": "Models in each worker's pipeline cache."}.items():
            gauge = GaugeMetricFamily(f"lethe_pipeline_cache_{part}", doc, labels=["worker"])
            for worker, info in sorted(self.workers.items()):
                if "cache" in info:
                    gauge.add_metric([worker], info["cache"][part])
            yield gauge


def _le_text(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(float(le))
