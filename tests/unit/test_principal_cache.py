"""The verified-key cache: a revoked key is not cached again by a request already under way."""

from __future__ import annotations

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
