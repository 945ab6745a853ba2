"""The verified-key cache: a revoked key is not cached again by a request already under way."""

from __future__ import annotations

import time

from api.deps import _connector_may
from api.tenants import Principal, PrincipalCache


def test_a_key_looked_up_before_its_revocation_is_not_cached_after_it() -> None:
    cache = PrincipalCache(ttl_s=60)
    principal = Principal(tenant_id="t", key_id="k1", role="sdr")
    cache.put("secret-1", principal)
    assert cache.get("secret-1") == principal
    cache.forget_key("k1")
    assert cache.get("secret-1") is None
    # A request that read the key from PostgreSQL before the revoke caches it afterwards.
    cache.put("secret-1", principal)
    assert cache.get("secret-1") is None
    other = Principal(tenant_id="t", key_id="k2", role="sdr")
    cache.put("secret-2", other)
    assert cache.get("secret-2") == other


def test_a_key_verified_before_is_known_after_its_entry_expires_until_revoked() -> None:
    # Behind a load balancer every client shares an address: a known key re-verified after
    # the cache's TTL must not be refused for another client's guesses.
    cache = PrincipalCache(ttl_s=0.001)
    principal = Principal(tenant_id="t", key_id="k1", role="connector")
    cache.put("secret-1", principal)
    time.sleep(0.01)
    assert cache.get("secret-1") is None
    assert cache.verified_before("secret-1")
    assert not cache.verified_before("a-guess")
    cache.forget_key("k1")
    assert not cache.verified_before("secret-1")


def test_a_connector_key_reaches_ingest_under_a_root_path_too() -> None:
    ingest = {"method": "POST", "path": "/backend/api/events/inbound", "root_path": "/backend"}
    assert _connector_may(ingest)
    assert _connector_may({"method": "POST", "path": "/api/events/inbound"})
    assert not _connector_may({"method": "GET", "path": "/api/leads"})
    assert not _connector_may(ingest | {"method": "GET"})
