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
    first ``fail`` of them."""

    def __init__(self, fail: int = 0):
        self.fail, self.got = fail, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
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
    yield lambda fail=0: made.append(Receiver(fail)) or made[-1]
    for r in made:
        r.close()


def verify(headers: dict, body: bytes) -> bool:
    """The documented recipe: HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>"
    with the secret's base64 part, compared with the v1 signature."""
    secret = base64.b64decode(os.environ["LETHE_WEBHOOK_SECRET"].removeprefix("whsec_"))
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
