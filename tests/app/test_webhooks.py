"""Webhooks over real HTTP: a receiver on loopback gets the job's events, signed as the
Standard Webhooks scheme says, retried after failures, recorded on the job."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.webhooks import signature
from tests.support import wait_job

pytestmark = pytest.mark.slow


class Receiver:
    """An HTTP server on loopback that records every delivery and answers 500 to the
    first ``fail`` of them, each after ``delay_s``."""

    def __init__(self, fail: int = 0, delay_s: float = 0.0):
        self.fail, self.got = fail, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(delay_s)
                receiver.got.append((dict(self.headers.items()), body))
                self.send_response(500 if len(receiver.got) <= receiver.fail else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout_s: float = 20) -> list:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.got) >= n, self.got
        return self.got

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    made: list[Receiver] = []
    yield lambda fail=0, delay_s=0.0: made.append(Receiver(fail, delay_s)) or made[-1]
    for r in made:
        r.close()


def verify(headers: dict, body: bytes, secret_text: str | None = None) -> bool:
    """The documented recipe: HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>"
    with the secret's base64 part, compared with the v1 signature."""
    secret = base64.b64decode((secret_text or os.environ["LETHE_WEBHOOK_SECRET"]
                               ).removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s.removeprefix("v1,"))
               for s in headers["webhook-signature"].split())


def test_the_signature_matches_the_standard_webhooks_test_vector():
    assert signature("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                     1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_try(http, receiver):
    from tests.app.test_metrics import moved, scrape

    hook = receiver(fail=2)
    before = scrape(http)
    r = http.post("/generate", json={"prompt": "a red circle", "steps": 2,
                                     "webhook": hook.url})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded"
    got = hook.wait_for(3)
    assert len({h["webhook-id"] for h, _ in got}) == 1  # one message, tried three times
    headers, body = got[2]
    assert verify(headers, body)
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    event = json.loads(body)
    assert event["type"] == "job.succeeded" and event["job_id"] == job["id"]
    assert event["data"]["status"] == "succeeded" and event["data"]["result"]["images"]
    deadline = time.monotonic() + 5
    while (http.get(f"/jobs/{job['id']}").json()["webhook"] or {}).get("delivered") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    record = http.get(f"/jobs/{job['id']}").json()["webhook"]
    assert record["attempts"] == 3 and record["last_status"] == "204"
    assert record["last_event"] == "job.succeeded"
    assert not verify({**headers, "webhook-timestamp": "1"}, body)  # the recipe can fail
    delta = moved(before, scrape(http))  # and /metrics counted each attempt
    assert delta[("lethe_webhook_deliveries_total", (("outcome", "retrying"),))] == 2
    assert delta[("lethe_webhook_deliveries_total", (("outcome", "delivered"),))] == 1


def test_started_progress_and_completed_arrive_in_order(http, receiver):
    hook = receiver()
    r = http.post("/generate", json={"prompt": "a red circle", "steps": 3, "webhook": hook.url,
                                     "webhook_events": ["started", "progress", "completed"]})
    job = wait_job(http, r.json()["id"])
    kinds: list[str] = []
    deadline = time.monotonic() + 10
    while "job.succeeded" not in kinds:
        assert time.monotonic() < deadline, kinds
        time.sleep(0.05)
        kinds = [json.loads(body)["type"] for _, body in hook.got]
    assert kinds[0] == "job.started" and "job.progress" in kinds
    assert kinds.index("job.succeeded") == len(kinds) - 1
    assert all(verify(h, b) for h, b in hook.got)
    assert job["status"] == "succeeded"


@pytest.mark.parametrize("url", ["http://10.1.2.3/hook", "http://localhost:9/hook",
                                 "http://[::1]:9/hook", "http://169.254.169.254/latest"])
def test_private_and_loopback_targets_are_refused_unless_allowed(http, url):
    r = http.post("/generate", json={"prompt": "a red circle", "webhook": url})
    assert r.status_code == 422
    assert "`webhook`" in r.json()["error"]["message"] and "LETHE_WEBHOOK_ALLOW" in \
        r.json()["error"]["message"]


def test_what_is_not_an_http_url_is_refused(http):
    r = http.post("/generate", json={"prompt": "a red circle", "webhook": "ftp://x/y"})
    assert r.status_code == 422 and "http(s) URL" in r.json()["error"]["message"]
    r = http.post("/generate", json={"prompt": "a red circle", "webhook": "http://127.0.0.1/",
                                     "webhook_events": ["finished"]})
    assert r.status_code == 422 and "webhook_events" in r.json()["error"]["message"]


def test_a_multipart_upscale_asks_for_a_webhook_with_form_fields(http, receiver):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    hook = receiver()
    r = http.post("/upscale", files={"image": ("in.png", buf.getvalue(), "image/png")},
                  data={"steps": "2", "webhook": hook.url,
                        "webhook_events": "started, completed"})
    assert r.status_code == 202, r.text
    assert wait_job(http, r.json()["id"])["status"] == "succeeded"
    hook.wait_for(2)
    assert [json.loads(b)["type"] for _, b in hook.got] == ["job.started", "job.succeeded"]
    r = http.post("/upscale", files={"image": ("in.png", buf.getvalue(), "image/png")},
                  data={"webhook": hook.url, "webhook_events": "finished"})
    assert r.status_code == 422 and "`webhook_events`" in r.json()["error"]["message"]


# Issue 33, finding 5: webhooks read as an attacker of a shared deployment would. These
# run a Deliverer of their own on a database no API reads, with a resolver the test
# answers for (a name that is global at submission and loopback at delivery).


class Resolver:
    """Answers ``answers[i]`` to the i-th look-up (the last one from then on), as a DNS
    server under an attacker's control would; counts the look-ups."""

    def __init__(self, *answers: list[str]):
        self.answers, self.calls = answers, 0

    def lookup(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]

    async def __call__(self, host: str, port: int) -> list[str]:
        return self.lookup(host, port)


def _deliver_for(aredis_url: str, resolve, until, timeout_s: float = 10, **kwargs) -> None:
    """Run a Deliverer until ``until()`` holds (or the time is out)."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from app.webhooks import Deliverer

    async def main() -> None:
        aredis = AsyncRedis.from_url(aredis_url)
        task = asyncio.create_task(Deliverer(aredis, "whsec_c2VydmljZQ==", retry_base_s=0.01,
                                             resolve=resolve, **kwargs).run())
        deadline = time.monotonic() + timeout_s
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aredis.aclose()

    asyncio.run(main())


def _queue(redis, owner: str, url: str, job_id: str, event: str = "succeeded") -> None:
    from app.webhooks import queue_delivery

    meta = {"owner": owner, "webhook": {"url": url, "events": list(
        {"succeeded": ["completed"], "progress": ["progress"]}[event])}}
    queue_delivery(redis, meta, job_id, event, {"status": event})


def test_a_name_that_rebinds_to_loopback_is_never_reached(scratch_redis, receiver):
    from app.webhooks import check_target, new_secret, record
    from tests.conftest import scratch_redis_url

    hook = receiver()
    url = hook.url.replace("127.0.0.1", "rebind.test")
    dns = Resolver(["93.184.216.34"], ["127.0.0.1"])
    # At submission the name is global: accepted (nothing is connected to there).
    assert check_target(url, set(), dns.lookup) == url
    new_secret(scratch_redis, "alice")
    _queue(scratch_redis, "alice", url, "job-rebind")
    _deliver_for(scratch_redis_url(), dns,
                 lambda: (record(scratch_redis, "job-rebind") or {}).get("attempts", 0) >= 3)
    got = record(scratch_redis, "job-rebind")
    assert got["attempts"] >= 3 and got["delivered"] == 0, got
    assert got["last_status"] == "refused: not a public address"  # no port-scan oracle
    assert dns.calls >= 4  # checked again at every attempt
    assert hook.got == []  # nothing reached loopback


def test_the_connection_goes_to_the_very_address_checked(scratch_redis, receiver):
    from app.webhooks import new_secret, record
    from tests.conftest import scratch_redis_url

    hook = receiver()
    port = hook.server.server_port
    url = f"http://pinned.test:{port}/hook"
    # A second look-up would answer an address where nothing listens.
    dns = Resolver(["127.0.0.1"], ["127.0.0.9"])
    new_secret(scratch_redis, "alice")
    _queue(scratch_redis, "alice", url, "job-pinned")
    _deliver_for(scratch_redis_url(), dns, lambda: len(hook.got) >= 1,
                 allow={"pinned.test"})
    assert len(hook.got) == 1 and dns.calls == 1
    headers = {k.lower(): v for k, v in hook.got[0][0].items()}
    assert headers["host"] == f"pinned.test:{port}"  # the URL's name, not the address
    assert record(scratch_redis, "job-pinned")["delivered"] == 1


def test_one_slow_receiver_delays_only_its_own_tenant(scratch_redis, receiver):
    from app.webhooks import new_secret
    from tests.conftest import scratch_redis_url

    slow, fast = receiver(delay_s=2.0), receiver()
    for owner in ("slow", "fast"):
        new_secret(scratch_redis, owner)
    for i in range(40):  # queued first: a flood to a receiver that takes 2 s an answer
        _queue(scratch_redis, "slow", slow.url, f"job-slow-{i}")
    for i in range(3):
        _queue(scratch_redis, "fast", fast.url, f"job-fast-{i}")
    started = time.monotonic()
    arrived: list[float] = []

    def fast_done() -> bool:
        while len(arrived) < len(fast.got):
            arrived.append(time.monotonic() - started)
        return len(fast.got) >= 3

    _deliver_for(scratch_redis_url(), Resolver(["127.0.0.1"]), fast_done,
                 allow={"127.0.0.1"})
    assert len(fast.got) == 3 and max(arrived) < 1.5, arrived
    assert len(slow.got) <= 4  # two at a time for the slow tenant


def test_a_tenants_outbox_is_bounded_and_what_is_dropped_counted(scratch_redis):
    from app.webhooks import MAX_PENDING, outbox, record

    for _ in range(MAX_PENDING + 50):
        _queue(scratch_redis, "mallory", "http://127.0.0.1:9/hook", "job-flood", "progress")
    assert scratch_redis.xlen(outbox("mallory")) == MAX_PENDING
    assert record(scratch_redis, "job-flood")["dropped"] == 50
    _queue(scratch_redis, "mallory", "http://127.0.0.1:9/hook", "job-flood")  # its end
    assert scratch_redis.xlen(outbox("mallory")) == MAX_PENDING + 1


def test_each_tenant_signs_with_its_own_secret_shown_once(worker, receiver):
    """A delivery one tenant received no longer verifies at another's endpoint."""
    import httpx

    from tests.support import SHARED_KEYS, bearer, served

    hook = receiver()
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "a red circle", "steps": 2, "webhook": hook.url}
        r = http.post("/generate", json=body, headers=bearer("alice"))
        assert r.status_code == 422 and "POST /webhooks/secret" in r.text, r.text
        secrets = {}
        for name in ("alice", "bob"):
            r = http.post("/webhooks/secret", headers=bearer(name))
            assert r.status_code == 201 and r.json()["secret"].startswith("whsec_"), r.text
            secrets[name] = r.json()["secret"]
        assert secrets["alice"] != secrets["bob"]
        http.headers.update(bearer("alice"))
        r = http.post("/generate", json=body)
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["id"])["status"] == "succeeded"
        headers, got = hook.wait_for(1)[0]
        assert verify(headers, got, secrets["alice"])
        assert not verify(headers, got, secrets["bob"])
        assert not verify(headers, got, os.environ["LETHE_WEBHOOK_SECRET"])


def test_an_https_target_is_pinned_and_its_certificate_still_checked_by_name(tmp_path):
    """The connection goes to the checked address while TLS checks the URL's name (SNI
    and the certificate), not the address."""
    import asyncio
    import shutil
    import ssl
    import subprocess

    import httpx

    from app.webhooks import pinned

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem",
                    "-subj", "/CN=pinned.test", "-addext", "subjectAltName=DNS:pinned.test"],
                   check=True, capture_output=True)
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            hosts.append(self.headers["host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port

    async def main() -> tuple[int, type]:
        trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        async with httpx.AsyncClient(verify=trust) as http:
            url, host, extensions = await pinned(
                f"https://pinned.test:{port}/hook", {"pinned.test"},
                Resolver(["127.0.0.1"]))
            assert url == f"https://127.0.0.1:{port}/hook"
            ok = await http.post(url, content=b"{}", headers=host, extensions=extensions)
            with pytest.raises(httpx.ConnectError) as refused:  # the name is what TLS checks
                await http.post(url, content=b"{}", headers=host)
            return ok.status_code, refused.type

    try:
        assert asyncio.run(main()) == (204, httpx.ConnectError)
        assert hosts == [f"pinned.test:{port}"]
    finally:
        server.shutdown()
