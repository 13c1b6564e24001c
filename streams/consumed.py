"""What a stage consumed: where a record came from and its bytes, as the dead-letter topic keeps them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Consumed:
    """One consumed record as it was on the broker (before any decoding)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def of(cls, record: Any) -> Consumed:
        """From anything shaped like a consumed record: aiokafka's ``ConsumerRecord`` or faust's
        ``Message`` (both have topic, partition, offset, key, value and headers; faust's headers
        may be a mapping)."""
        headers = record.headers or ()
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        return cls(record.topic, record.partition, record.offset, record.key, record.value, tuple(pairs))
