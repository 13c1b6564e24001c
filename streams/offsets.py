"""Commit positions for records that finish out of order, without ever redoing a finished one.

Kafka commits a *position* per partition, but stages such as the inference worker (continuous
batching) and the trainer (rollouts waiting for rewards) finish records out of order. The tracker
commits the lowest unfinished offset and carries, in the commit's metadata, the offsets beyond it
that are already finished. A stage restores both when it is assigned a partition and skips the
finished offsets, so a crash or rebalance redoes exactly the unfinished records.
"""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    """Commit positions for out-of-order completion, without ever answering a request twice.

    Requests finish out of order (continuous batching), but a Kafka offset is a position: it can
    only move past offsets that are all answered. So each commit carries, in the offset's
    metadata, the offsets *beyond* the position that are already answered ("done"). The metadata
    is committed in the same transaction as their final responses, so after a crash or rebalance
    the partition's next owner restores it and skips exactly those offsets.
    """

    def __init__(self) -> None:
        self.open: dict[TopicPartition, set[int]] = {}
        self.done: dict[TopicPartition, set[int]] = {}
        self.seen: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, tuple[int, str]] = {}

    def restore(self, tp: TopicPartition, position: int, metadata: str) -> None:
        """Seed a newly assigned partition from its committed offset and metadata."""
        self.open[tp] = set()
        self.done[tp] = decode_done(position, metadata)
        self.seen[tp] = position - 1
        self.committed[tp] = (position, metadata)

    def is_done(self, tp: TopicPartition, offset: int) -> bool:
        return offset in self.done.get(tp, ())

    def seen_offset(self, tp: TopicPartition, offset: int, open_: bool) -> None:
        self.seen[tp] = max(self.seen.get(tp, -1), offset)
        (self.open if open_ else self.done).setdefault(tp, set()).add(offset)

    def close(self, tp: TopicPartition, offset: int) -> None:
        if offset in self.open.get(tp, set()):
            self.open[tp].discard(offset)
            self.done.setdefault(tp, set()).add(offset)

    def positions(self) -> dict[TopicPartition, tuple[int, str]]:
        """(position, metadata) of every partition whose commit would change."""
        out = {}
        for tp, high in self.seen.items():
            pending = self.open.get(tp)
            position = min(pending) if pending else high + 1
            done = {o for o in self.done.get(tp, set()) if o >= position}
            self.done[tp] = done
            metadata = encode_done(position, done)
            if (position, metadata) != self.committed.get(tp):
                out[tp] = (position, metadata)
        return out

    def mark_committed(self, positions: dict[TopicPartition, tuple[int, str]]) -> None:
        self.committed.update(positions)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            for table in (self.open, self.done, self.seen, self.committed):
                table.pop(tp, None)


def encode_done(position: int, done: set[int]) -> str:
    """Answered offsets beyond the position, as deltas: "3,7" = position+3 and position+7."""
    return ",".join(str(o - position) for o in sorted(done))


def decode_done(position: int, metadata: str) -> set[int]:
    try:
        return {position + int(d) for d in metadata.split(",") if d.strip()}
    except ValueError:
        return set()  # foreign metadata (another tool committed): nothing known to be done
