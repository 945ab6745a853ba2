"""Name-based ids: the same name always gives the same id (UUID version 5, RFC 9562).

Every effect of an event gets an id derived from the event's, so a replay produces records
that consumers recognise as duplicates. A worker derives about ten per inbound message, and
`str(uuid.uuid5(...))` builds a `UUID` object only to format it: 2.9 us a call, 4 % of a
worker's CPU on a backlog. This computes the same string from the SHA-1 digest in 0.9 us.
"""

from __future__ import annotations

import hashlib
import uuid


def name_based_id(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))`, without the `UUID` object in between."""
    digest = bytearray(hashlib.sha1(namespace.bytes + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC's variant
    hex_digits = digest.hex()
    return (
        f"{hex_digits[:8]}-{hex_digits[8:12]}-{hex_digits[12:16]}-"
        f"{hex_digits[16:20]}-{hex_digits[20:]}"
    )
