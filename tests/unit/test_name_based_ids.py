"""schemas.ids.name_based_id is the standard library's uuid5, string for string: ids derived
before it (in changelogs, in PostgreSQL) must be derived the same after it."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from schemas.ids import name_based_id


@given(namespace=st.uuids(), name=st.text())
def test_same_string_as_uuid5(namespace: uuid.UUID, name: str) -> None:
    assert name_based_id(namespace, name) == str(uuid.uuid5(namespace, name))


def test_known_value() -> None:
    # RFC 9562's example of a version 5 UUID: the DNS namespace and "www.example.com".
    assert (
        name_based_id(uuid.NAMESPACE_DNS, "www.example.com")
        == "2ed6657d-e927-568b-95e1-2665a8aea6a2"
    )
