"""A shared deployment under abuse: `lethe serve` with two users' keys, one attacking it
(issue 33's findings 2-7, each for a bounded time on loopback), the other using it as
usual throughout.

    python -m bench.abuse [--seconds 20] [--json out.json]

The victim (bob) lists the models and generates a small image over and over; each phase
reports his latencies (p50, p99), what the attacker (alice) was answered, and the disk
under LETHE_HOME and Redis' memory before and after. At the end: every one of bob's jobs
accounted for, his model still there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from app.testing import free_port

KEYS = {"alice": "ka-abuse-0001", "bob": "kb-abuse-0001", "ops": "ko-abuse-0001"}
GENERATE = {"prompt": "a red circle", "model": "shapes-sd", "steps": 4, "seed": 1}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()
               and "redis" not in p.parts)


class Receiver:
    """A webhook receiver on loopback: records arrival times by job, after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0):
        self.got: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(delay_s)
                event = json.loads(body)
                if event["type"] == "job.succeeded":
                    receiver.got[event["job_id"]] = time.time()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Victim(threading.Thread):
    """Bob: a model listing and a small generate (with a webhook) in turn, timed."""

    def __init__(self, url: str, hook: Receiver):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=url, headers=bearer("bob"), timeout=120)
        self.hook = hook
        self.phase = "start"
        self.stop = threading.Event()
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.jobs: dict[str, tuple[str, float]] = {}  # id -> (final status, ended at)
        self.errors: Counter[str] = Counter()

    def _add(self, what: str, seconds: float) -> None:
        self.samples.setdefault(self.phase, {}).setdefault(what, []).append(seconds)

    def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            try:
                t0 = time.perf_counter()
                r = self.http.get("/models")
                r.raise_for_status()
                self._add("list_models_s", time.perf_counter() - t0)
                seed += 1
                t0 = time.perf_counter()
                r = self.http.post("/generate", json={**GENERATE, "seed": seed,
                                                      "webhook": self.hook.url})
                r.raise_for_status()
                job_id = r.json()["id"]
                view = self.http.get(f"/jobs/{job_id}", params={"wait": 30}).json()
                while view["status"] in ("queued", "running"):
                    view = self.http.get(f"/jobs/{job_id}", params={"wait": 30}).json()
                self._add("generate_s", time.perf_counter() - t0)
                self.jobs[job_id] = (view["status"], time.time())
            except httpx.HTTPError as exc:
                self.errors[f"{self.phase}: {type(exc).__name__}"] += 1
                time.sleep(0.2)

    def webhook_lag(self) -> list[float]:
        return [self.hook.got[j] - ended for j, (_, ended) in self.jobs.items()
                if j in self.hook.got]


def _attack_exports(http: httpx.Client, until: float, edit: str) -> Counter[str]:
    """Finding 2: every format, dtype and rank of a model's export (the shipped base's,
    and the attacker's own edit's LoRA at every rank)."""
    seen: Counter[str] = Counter()
    rank = 1
    while time.monotonic() < until:
        for fmt, dtype in (("diffusers", "float32"), ("single-file", "float16"),
                           ("diffusers", "float16"), ("single-file", "float32")):
            r = http.get("/models/shapes-sd/download",
                         params={"format": fmt, "dtype": dtype})
            seen[str(r.status_code)] += 1
        for dtype in ("float16", "float32"):
            r = http.get(f"/models/{edit}/download",
                         params={"format": "lora", "rank": rank, "dtype": dtype})
            seen[f"lora {r.status_code}"] += 1
        rank = rank % 1024 + 1
    return seen


def _attack_uploads(http: httpx.Client, until: float) -> Counter[str]:
    """Finding 3: uploads past the key's storage (declared, and streamed without a
    length), and onto reserved ids."""
    seen: Counter[str] = Counter()
    blob = os.urandom(8 * 1024 * 1024)
    big = os.urandom(80 * 1024 * 1024)  # past the key's 64 MB

    def unsized() -> Any:  # chunked: no Content-Length to refuse it by
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    n = 0
    while time.monotonic() < until:
        n += 1
        for model_id in (f"alice-{n}", "shapes-sd", "tiny-sd"):
            r = http.post("/models", files={"id": (None, model_id),
                                            "file": ("x.safetensors", blob)})
            seen[f"{model_id.split('-')[0]} {r.status_code}"] += 1
        try:
            r = http.post("/models", files={"id": (None, f"alice-big-{n}"),
                                            "file": ("x.safetensors", big)})
            seen[f"80 MB {r.status_code}"] += 1
        except httpx.HTTPError as exc:  # refused before the body was sent whole
            seen[f"80 MB {type(exc).__name__}"] += 1
        body = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\n",
                         f"alice-chunked-{n}".encode(), b"\r\n--b\r\nContent-Disposition: "
                         b"form-data; name=\"file\"; filename=\"x.safetensors\"\r\n\r\n"])
        try:
            r = http.post("/models", content=iter([body, *unsized(), b"\r\n--b--\r\n"]),
                          headers={"content-type": "multipart/form-data; boundary=b"})
            seen[f"80 MB chunked {r.status_code}"] += 1
        except httpx.HTTPError as exc:
            seen[f"80 MB chunked {type(exc).__name__}"] += 1
    return seen


def _attack_form_parts(http: httpx.Client, until: float) -> Counter[str]:
    """Finding 4: one form of ten thousand parts."""
    seen: Counter[str] = Counter()
    while time.monotonic() < until:
        files = [(f"f{i}", (None, "x")) for i in range(10_000)]
        r = http.post("/models", files=files)
        seen[str(r.status_code)] += 1
    return seen


def _attack_webhooks(http: httpx.Client, until: float, slow: Receiver) -> Counter[str]:
    """Finding 5: internal targets, and a receiver that takes 5 s an answer, fed
    progress events."""
    seen: Counter[str] = Counter()
    for target in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.1/",
                   "http://localhost:6379/", "http://[::1]:8000/"):
        r = http.post("/generate", json={**GENERATE, "webhook": target})
        seen[f"internal {r.status_code}"] += 1
    http.post("/webhooks/secret")
    while time.monotonic() < until:
        r = http.post("/generate", json={**GENERATE, "steps": 20, "webhook": slow.url,
                                         "webhook_events": ["started", "progress",
                                                            "completed"]})
        seen[f"slow {r.status_code}"] += 1
        if r.status_code == 429:
            time.sleep(0.5)
    return seen


def _attack_export_cancel(http: httpx.Client, until: float, bob: httpx.Client
                          ) -> Counter[str]:
    """Finding 6: alice asks for an export and cancels it; bob asks for the same file."""
    seen: Counter[str] = Counter()
    params = {"format": "single-file", "dtype": "float32"}
    r = http.get("/models/shapes-sd/download", params=params)
    seen[f"alice export {r.status_code}"] += 1
    if r.status_code == 202:
        canceled = http.delete(f"/jobs/{r.json()['id']}")
        seen[f"alice cancel {canceled.status_code}"] += 1
    r = bob.get("/models/shapes-sd/download", params=params)
    while r.status_code == 202 and time.monotonic() < until + 120:
        job = bob.get(f"/jobs/{r.json()['id']}", params={"wait": 30}).json()
        if job["status"] not in ("queued", "running"):
            seen[f"bob export job {job['status']}"] += 1
        r = bob.get("/models/shapes-sd/download", params=params)
    seen[f"bob download {r.status_code} ({len(r.content)} bytes)"] += 1
    return seen


def _attack_holds(http: httpx.Client, until: float, url: str) -> Counter[str]:
    """Finding 7: event streams and long polls on queued jobs, and submit-cancel loops."""
    seen: Counter[str] = Counter()
    job_ids = []
    for _ in range(4):
        r = http.post("/generate", json={**GENERATE, "steps": 200})
        if r.status_code == 202:
            job_ids.append(r.json()["id"])
    streams = []
    for i in range(50):
        if not job_ids:
            break
        client = httpx.Client(base_url=url, headers=bearer("alice"), timeout=60)
        cm = client.stream("GET", f"/jobs/{job_ids[i % len(job_ids)]}/events")
        response = cm.__enter__()
        seen[f"stream {response.status_code}"] += 1
        streams.append((client, cm))
    while time.monotonic() < until:
        r = http.post("/generate", json=GENERATE)
        seen[f"submit {r.status_code}"] += 1
        if r.status_code == 202:
            canceled = http.delete(f"/jobs/{r.json()['id']}")
            seen[f"cancel {canceled.status_code}"] += 1
    for client, cm in streams:
        cm.__exit__(None, None, None)
        client.close()
    for job_id in job_ids:
        http.delete(f"/jobs/{job_id}")
    return seen


def run(seconds: float = 20.0) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="lethe-abuse-"))
    port = free_port()
    env = {**os.environ, "LETHE_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "LETHE_API_KEYS": ",".join([f"alice:{KEYS['alice']}", f"bob:{KEYS['bob']}",
                                       f"ops:{KEYS['ops']}:admin"]),
           "LETHE_MAX_ACTIVE_JOBS": "4", "LETHE_MAX_STORAGE_BYTES": str(64 * 1024**2),
           "LETHE_WEBHOOK_SECRET": "whsec_YWJ1c2UtYmVuY2gtc2VjcmV0LTAwMDE=",
           "LETHE_WEBHOOK_ALLOW": "127.0.0.1", "LETHE_LOG_FORMAT": "text"}
    env.pop("LETHE_REDIS_URL", None)
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    redis_url = None
    for line in proc.stdout or []:
        if "embedded redis at" in line:
            redis_url = line.split(" at ", 1)[1].strip()
        if "serving on" in line:
            break
    url = f"http://127.0.0.1:{port}"
    assert redis_url, "lethe serve did not start"
    threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
    deadline = time.monotonic() + 60
    while True:  # "serving on" is printed just before uvicorn binds its port
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "lethe serve never became ready"
        time.sleep(0.2)
    redis = Redis.from_url(redis_url)
    out: dict[str, Any] = {"phases": {}}
    fast, slow = Receiver(), Receiver(delay_s=5.0)
    victim = Victim(url, fast)
    alice = httpx.Client(base_url=url, headers=bearer("alice"), timeout=120)
    bob = httpx.Client(base_url=url, headers=bearer("bob"), timeout=120)
    bob.post("/webhooks/secret").raise_for_status()
    # Each user's own edit: alice's for a LoRA export at every rank, bob's to find intact
    # at the end (and never shown to alice).
    for who, client in (("alice", alice), ("bob", bob)):
        r = client.post("/erase", json={"base_model": "shapes-sd", "concepts": ["triangle"],
                                        "iterations": 8, "name": f"{who}-edit",
                                        "evaluate": False})
        r.raise_for_status()
        job = client.get(f"/jobs/{r.json()['id']}", params={"wait": 30}).json()
        assert job["status"] == "succeeded", job
    phases: list[tuple[str, Callable[[float], Counter[str]] | None]] = [
        ("baseline", None),
        ("6 export cancel", lambda until: _attack_export_cancel(alice, until, bob)),
        ("2 exports", lambda until: _attack_exports(alice, until, "alice-edit")),
        ("3 uploads", lambda until: _attack_uploads(alice, until)),
        ("4 form parts", lambda until: _attack_form_parts(alice, until)),
        ("5 webhooks", lambda until: _attack_webhooks(alice, until, slow)),
        ("7 streams and cancels", lambda until: _attack_holds(alice, until, url)),
    ]
    try:
        victim.start()
        for name, attack in phases:
            before = {"disk_bytes": disk_bytes(home),
                      "redis_used_memory": int(redis.info("memory")["used_memory"])}
            victim.phase = name
            jobs_before = set(victim.jobs)
            t0 = time.monotonic()
            answered = attack(t0 + seconds) if attack else Counter()
            left = seconds - (time.monotonic() - t0)
            if left > 0:
                time.sleep(left)
            ended = [j for j in victim.jobs if j not in jobs_before]
            lag = [victim.hook.got[j] - victim.jobs[j][1] for j in ended
                   if j in victim.hook.got]
            samples = victim.samples.get(name, {})
            out["phases"][name] = {
                "attacker_answers": dict(answered),
                "before": before,
                "after": {"disk_bytes": disk_bytes(home),
                          "redis_used_memory": int(redis.info("memory")["used_memory"])},
                **{f"{what} p50": percentile(xs, 50) for what, xs in samples.items()},
                **{f"{what} p99": percentile(xs, 99) for what, xs in samples.items()},
                "victim_requests": sum(len(xs) for xs in samples.values()),
                "victim_webhook_lag_s p50": percentile(lag, 50),
                "victim_webhook_lag_s max": max(lag) if lag else None,
            }
            print(json.dumps({name: out["phases"][name]}), flush=True)
        victim.stop.set()
        victim.join(timeout=120)
        time.sleep(3)  # the last webhooks
        statuses = Counter(status for status, _ in victim.jobs.values())
        listed: set[str] = set()
        cursor = None
        while True:  # every page of bob's GET /jobs
            page = bob.get("/jobs", params={"limit": 100, **(
                {"cursor": cursor} if cursor else {})}).json()
            listed |= {j["id"] for j in page["data"] if j["type"] == "generate"}
            cursor = page["next_cursor"]
            if not cursor:
                break
        out["victim"] = {"jobs": dict(statuses), "errors": dict(victim.errors),
                         "jobs_not_listed": len(set(victim.jobs) - listed),
                         "model_kept": bob.get("/models/bob-edit").status_code == 200,
                         "model_shown_to_alice": alice.get("/models/bob-edit").status_code,
                         "webhooks_received": sum(j in fast.got for j in victim.jobs),
                         "webhook_lag_s p50": percentile(victim.webhook_lag(), 50)}
    finally:
        victim.stop.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each phase's length")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    result = run(args.seconds)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
