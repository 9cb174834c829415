"""`lethe serve` under faults: a stalled Redis, a killed Redis, paused workers.

One real `lethe serve` (embedded Redis, two worker processes, uvicorn) in a data folder
of its own, so these tests can stop and kill its parts without touching the session's.
Its heartbeat TTL is the tests' 3 s.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.testing import ROOT, free_port

pytestmark = pytest.mark.slow

HEARTBEAT_TTL_S = 3


class Served:
    """A `lethe serve` subprocess and what it started."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "LETHE_REDIS_URL"}
        env.update(LETHE_HOME=str(home), LETHE_DEFAULT_MODEL="tiny-sd",
                   LETHE_DEFAULT_UPSCALER="tiny-x4",
                   LETHE_HEARTBEAT_TTL_S=str(HEARTBEAT_TTL_S))
        self.log = open(home / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 180
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lethe serve did not start: {self.log_text()[-3000:]}")
            time.sleep(0.3)

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def children(self, needle: str) -> list[int]:
        """Pids of `lethe serve`'s child processes whose command line holds ``needle``."""
        found = []
        # Each thread lists the children it started (the supervisor's restarts are its own).
        pids = [pid for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except FileNotFoundError:
                continue
            if needle.encode() in cmdline:
                found.append(int(pid))
        return found

    def redis_pid(self) -> int:
        (pid,) = self.children("redis-server")
        return pid

    def log_text(self) -> str:
        return (self.home / "serve.log").read_text(errors="replace")

    def generate(self, **body) -> str:
        body = {"prompt": "a red circle", "steps": 2, "seed": 1, **body}
        r = self.http.post("/generate", json=body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait(self, job_id: str, until=("succeeded", "failed", "canceled"), timeout_s=60
             ) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.http.get(f"/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.http.close()
        self.log.close()


@pytest.fixture(scope="module")
def served(tiny_model):
    with tempfile.TemporaryDirectory(prefix="lethe-serve-") as home:
        s = Served(Path(home))
        yield s
        s.close()


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = call()
    return r, time.monotonic() - t0


def png(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_stalled_redis_answers_503_within_3s_and_loses_or_doubles_nothing(served):
    before = served.generate(steps=30)  # queued or running when Redis stops
    done = served.wait(served.generate())
    redis_pid = served.redis_pid()
    jobs_before = len(list((served.home / "outputs").iterdir()))
    os.kill(redis_pid, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        calls = {
            "POST /generate": lambda: served.http.post("/generate", json={"prompt": "a"}),
            "POST /erase": lambda: served.http.post("/erase", json={"concepts": ["red"]}),
            "POST /evaluate": lambda: served.http.post(
                "/evaluate", json={"model": "shapes-sd", "images_per_prompt": 2}),
            "POST /upscale (upload)": lambda: served.http.post(
                "/upscale", files={"image": ("in.png", png(), "image/png")}),
            "POST /upscale (source)": lambda: served.http.post(
                "/upscale", json={"source": {"job_id": done["id"], "index": 0}}),
            "GET /jobs/{id}": lambda: served.http.get(f"/jobs/{before}"),
            "GET /jobs/{id}?wait": lambda: served.http.get(f"/jobs/{before}?wait=10"),
            "GET /jobs/{id}/images/0": lambda: served.http.get(f"/jobs/{done['id']}/images/0"),
            "DELETE /jobs/{id}": lambda: served.http.delete("/jobs/0f0e8d6c-0000-4000-8000-0"),
            "GET /readyz": lambda: served.http.get("/readyz"),
        }
        # All at once, each timed on its own, while /healthz is asked throughout.
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = {name: pool.submit(timed, call) for name, call in calls.items()}
            while not all(f.done() for f in answers.values()):
                assert served.http.get("/healthz", timeout=1).status_code == 200
                time.sleep(0.1)
        for name, future in answers.items():
            r, took = future.result()
            print(f"stalled: {name} -> {r.status_code} in {took:.2f}s")
            assert r.status_code == 503, (name, r.status_code, r.text)
            assert took < 3, (name, took)
            assert r.headers["retry-after"], name
        # The routes that read only the registry do not need Redis.
        assert served.http.get("/models").status_code == 200
        time.sleep(max(0.0, 10 - (time.monotonic() - stalled_at)))
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    # Nothing refused during the stall runs after it, and nothing queued before is lost.
    assert served.wait(before)["status"] == "succeeded"
    assert served.wait(served.generate())["status"] == "succeeded"
    time.sleep(1)  # a late submission would be running by now
    outputs = sorted(p.name for p in (served.home / "outputs").iterdir())
    assert len(outputs) == jobs_before + 1, outputs  # only the job queued after SIGCONT


def test_a_killed_embedded_redis_is_restarted_and_the_queue_survives(served):
    running = served.generate(steps=400, width=64, height=64)
    served.wait(running, until=("running",))
    queued = served.generate(prompt="a blue square")
    old = served.redis_pid()
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    while served.children("redis-server") in ([], [old]) or not served.ready():
        assert time.monotonic() - killed_at < 20, served.log_text()[-3000:]
        time.sleep(0.05)
    print(f"kill -9 of the embedded redis: ready again in {time.monotonic() - killed_at:.2f}s")
    assert served.wait(queued)["status"] == "succeeded"
    # The running job either rode out the restart (the worker's client retries a failed
    # write with back-off) or ended failed, saying why; never "running" for good.
    ended = served.wait(running, timeout_s=120)
    assert ended["status"] == "succeeded" or (
        ended["status"] == "failed" and ended["error"]["code"] == "redis_lost"), ended
    print(f"the job running at the kill: {ended['status']}")
    if ended["status"] == "failed":  # as soon as Redis answers again, within a heartbeat TTL
        assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + 10
    assert served.proc.poll() is None and len(served.children("app.cli worker")) == 2


def test_paused_workers_count_again_within_one_heartbeat(served):
    pids = served.children("app.cli worker")
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # Four times the TTL: their liveness keys lapse, as after 40 s with the default 30.
        time.sleep(4 * HEARTBEAT_TTL_S)
        r = served.http.get("/readyz")
        assert r.status_code == 503 and r.json()["workers"] == 0, r.text
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    # Both count again (each at its own next beat), within one TTL.
    while served.http.get("/readyz").json().get("queues") != {"images": 1, "train": 1}:
        assert time.monotonic() - resumed_at < HEARTBEAT_TTL_S, "not both within one TTL"
        time.sleep(0.05)
    print(f"paused workers: both counted {time.monotonic() - resumed_at:.2f}s after SIGCONT")
    assert served.wait(served.generate())["status"] == "succeeded"


def test_serve_gives_up_with_status_1_when_redis_keeps_dying(served):
    # The last test of the module: it ends the shared `lethe serve`.
    workers = served.children("app.cli worker")
    deadline = time.monotonic() + 60
    while served.proc.poll() is None:
        assert time.monotonic() < deadline, served.log_text()[-3000:]
        try:
            os.kill(served.redis_pid(), signal.SIGKILL)
        except ValueError:  # between a death and its restart
            pass
        time.sleep(0.3)
    assert served.proc.wait() == 1
    assert "embedded redis exited 6 times" in served.log_text()
    time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]  # stopped on the way out


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "lethe.example"])
def test_serve_beyond_loopback_without_keys_refuses_to_start_saying_how(host, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LETHE_REDIS_URL", "LETHE_API_KEYS", "LETHE_ALLOW_OPEN")}
    env["LETHE_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", host,
                           "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"lethe: refusing to serve on {host} with no LETHE_API_KEYS")
    assert "--allow-open" in done.stderr
    assert not (tmp_path / "redis").exists()  # refused before anything started


def test_keys_or_a_plain_allow_open_or_loopback_let_serve_start():
    from app.config import Settings
    from app.serve import check_exposure

    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_exposure(host, Settings(api_keys=""))
    check_exposure("0.0.0.0", Settings(api_keys="ops:k-secret:admin"))
    check_exposure("0.0.0.0", Settings(api_keys="", allow_open=True))
    with pytest.raises(SystemExit, match="refusing to serve on 0.0.0.0"):
        check_exposure("0.0.0.0", Settings(api_keys=""))


def test_serve_without_the_worker_extra_says_how_to_install_it_before_anything_starts(
        tmp_path):
    """Issue 35, item 6: `pip install lethe` then `lethe serve` — each worker died on
    `import numpy` with a traceback. Here numpy is made unimportable in the serving
    process, as it is where the extra was never installed."""
    env = {k: v for k, v in os.environ.items() if k != "LETHE_REDIS_URL"}
    env["LETHE_HOME"] = str(tmp_path)
    code = ("import sys; sys.modules['numpy'] = None; from app.cli import main; "
            f"main(['serve', '--port', '{free_port()}'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lethe: the workers need the worker extra (numpy not installed)")
    assert "pip install 'lethe[worker]'" in last and "Traceback" not in done.stderr
    assert not (tmp_path / "redis").exists()  # before anything started


def test_the_worker_modules_checked_are_the_worker_extras():
    from app.serve import WORKER_MODULES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["worker"]
    names = {re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0] for requirement in extra}
    imported_as = {"pillow": "PIL"}
    assert {imported_as.get(n, n) for n in names} == set(WORKER_MODULES)
