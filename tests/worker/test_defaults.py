"""The models a worker registers at first start are the ids the API reserves for them."""

from __future__ import annotations

from app.registry import SHIPPED_IDS
from worker.defaults import TINY_ID, TINY_X4_ID
from worker.domains import DOMAINS, get_domain


def test_the_api_reserves_every_id_a_worker_registers_at_start():
    shipped = {model_id for name in DOMAINS
               for model_id in getattr(get_domain(name), "shipped", dict)()}
    assert {TINY_ID, TINY_X4_ID} | shipped == SHIPPED_IDS
