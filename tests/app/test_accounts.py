"""Keys with names and roles: each user sees its own jobs, an admin sees all, a model is
deleted by the key that made it; GET /jobs pages newest first."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from app.accounts import ANONYMOUS, Caller, parse_keys
from app.config import Settings
from tests.support import SHARED_KEYS, bearer, served, wait_job

TINY = {"prompt": "a", "steps": 1, "width": 64, "height": 64}


def test_key_specs_give_names_and_roles():
    callers = parse_keys("plainkey, alice:ka, root:kr:admin, alice:ka2:user")
    assert callers["ka"] == Caller("alice", "user") == callers["ka2"]
    assert callers["kr"].admin and not callers["ka"].admin
    plain = callers["plainkey"]
    # A plain key is a user of its own, named without showing the key.
    assert plain.role == "user" and plain.name.startswith("key-")
    assert "plainkey" not in plain.name
    assert parse_keys("") == {} and ANONYMOUS.admin


@pytest.mark.parametrize("spec, named", [
    ("alice:ka:boss", "role 'boss' is not one of ['user', 'admin']"),
    ("a:b:c:d", "entry 1 has 4 ':'-separated parts"),
    ("ok:k1, alice::user", "entry 2 (alice): the key is empty"),
    ("alice:k1, bob:k1", "entry 2 (bob): this key is given already"),
    ("alice:k1, alice:k2:admin", "'alice' has role 'user' in an earlier entry"),
    ("al ice:k1", "name 'al ice' must match"),
])
def test_a_malformed_key_spec_stops_the_service_naming_the_entry(spec, named):
    with pytest.raises(ValueError, match="LETHE_API_KEYS") as caught:
        parse_keys(spec)
    assert named in str(caught.value)
    # The setting itself refuses it: `lethe serve` stops at start with this message.
    with pytest.raises(ValidationError, match="LETHE_API_KEYS entry"):
        Settings(api_keys=spec)


def _generate(http: httpx.Client, who: str) -> str:
    r = http.post("/generate", json=TINY, headers=bearer(who))
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def shared(worker):
    """The service with three keys: alice and bob (users), root (admin)."""
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, httpx.Client(base_url=url,
                                                                 timeout=60) as http:
        yield http


def test_users_see_only_their_own_jobs_and_an_admin_sees_all(shared):
    http = shared
    mine, theirs = _generate(http, "alice"), _generate(http, "bob")
    for job_id, who in ((mine, "alice"), (theirs, "bob")):
        http.headers.update(bearer(who))
        assert wait_job(http, job_id)["status"] == "succeeded"
    http.headers.pop("Authorization")

    def listed(who: str, **query) -> list[str]:
        r = http.get("/jobs", params=query, headers=bearer(who))
        assert r.status_code == 200, r.text
        return [job["id"] for job in r.json()["data"]]

    assert mine in listed("alice") and theirs not in listed("alice")
    assert theirs in listed("bob") and mine not in listed("bob")
    assert {mine, theirs} <= set(listed("root"))
    assert mine in listed("root", owner="alice") and theirs not in listed("root", owner="alice")
    job = http.get(f"/jobs/{mine}", headers=bearer("root")).json()
    assert job["owner"] == "alice"

    # Another's job is not found, whatever one asks of it.
    for method, path in (("GET", f"/jobs/{theirs}"), ("GET", f"/jobs/{theirs}/images/0"),
                         ("GET", f"/jobs/{theirs}/events"), ("DELETE", f"/jobs/{theirs}"),
                         ("DELETE", f"/jobs/{theirs}?purge=true")):
        r = http.request(method, path, headers=bearer("alice"))
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"
    r = http.post("/upscale", json={"source": {"job_id": theirs, "index": 0}},
                  headers=bearer("alice"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    # ... and the admin's reads of it work.
    assert http.get(f"/jobs/{theirs}/images/0", headers=bearer("root")).status_code == 200
    assert http.get(f"/jobs/{theirs}", headers=bearer("bob")).status_code == 200


def test_jobs_are_listed_newest_first_a_page_at_a_time(shared):
    http = shared
    made = [_generate(http, "bob") for _ in range(3)]
    r = http.get("/jobs", params={"limit": 2}, headers=bearer("bob"))
    first = r.json()
    assert [j["id"] for j in first["data"]] == made[::-1][:2]
    assert first["next_cursor"]
    # A job queued meanwhile does not shift the pages still to read.
    later = _generate(http, "bob")
    second = http.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]},
                      headers=bearer("bob")).json()
    assert [j["id"] for j in second["data"]][0] == made[0]
    assert later not in [j["id"] for j in second["data"]]
    # Filters: by type and by status.
    assert http.get("/jobs", params={"type": "erase"}, headers=bearer("bob")).json()[
        "data"] == []
    http.headers.update(bearer("bob"))
    for job_id in [*made, later]:
        wait_job(http, job_id)
    http.headers.pop("Authorization")
    done = http.get("/jobs", params={"status": "succeeded", "limit": 100},
                    headers=bearer("bob")).json()["data"]
    assert {*made, later} <= {j["id"] for j in done}
    assert all(j["status"] == "succeeded" and j["owner"] == "bob" for j in done)


@pytest.mark.parametrize("query, field", [
    ({"cursor": "abc"}, "`cursor` 'abc' is not a cursor"),
    ({"cursor": "-5"}, "`cursor` '-5'"),
    ({"cursor": "9" * 40}, "`cursor`"),
    ({"type": "paint"}, "`type` must be one of"),
    ({"status": "done"}, "`status`"),
    ({"limit": 0}, "`limit`"),
    ({"limit": 101}, "`limit`"),
    ({"owner": "bob"}, "`owner` is for admin keys"),
])
def test_a_bad_job_listing_query_is_a_422_naming_it(shared, query, field):
    r = shared.get("/jobs", params=query, headers=bearer("alice"))
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_a_model_is_deleted_by_the_key_that_made_it_or_an_admin(shared):
    http = shared
    made = []
    for name, visibility in (("alice-no-red", "public"), ("alice-no-red-2", None)):
        r = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                      "iterations": 2, "name": name,
                                      "visibility": visibility},
                      headers=bearer("alice"))
        assert r.status_code == 202, r.text
        made.append(r.json()["id"])
    http.headers.update(bearer("alice"))
    for job_id in made:
        assert wait_job(http, job_id, timeout_s=300)["status"] == "succeeded"
    http.headers.pop("Authorization")
    model = http.get("/models/alice-no-red", headers=bearer("bob")).json()
    assert model["visibility"] == "public" and "owner" not in model  # who made it: hidden
    r = http.delete("/models/alice-no-red", headers=bearer("bob"))
    assert r.status_code == 403 and "another key" in r.json()["error"]["message"]
    assert http.get("/models/alice-no-red", headers=bearer("bob")).status_code == 200
    # Private by default on a service with keys: to bob it is not there at all.
    assert http.get("/models/alice-no-red-2", headers=bearer("alice")).json()[
        "visibility"] == "private"
    assert http.get("/models/alice-no-red-2", headers=bearer("bob")).status_code == 404
    assert http.delete("/models/alice-no-red-2", headers=bearer("bob")).status_code == 404
    assert http.delete("/models/alice-no-red", headers=bearer("alice")).status_code == 204
    assert http.delete("/models/alice-no-red-2", headers=bearer("root")).status_code == 204
    assert http.get("/models/alice-no-red-2", headers=bearer("alice")).status_code == 404
