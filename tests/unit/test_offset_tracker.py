"""Out-of-order completion: positions only pass answered offsets; answered offsets beyond the
position travel in the commit metadata and are skipped after a restart."""

from aiokafka import TopicPartition

from streams.offsets import OffsetTracker, decode_done, encode_done

TP = TopicPartition("decisions", 0)


def test_position_waits_for_the_oldest_open_offset_and_metadata_lists_the_done_ones():
    t = OffsetTracker()
    for o in (10, 11, 12):
        t.seen_offset(TP, o, open_=True)
    t.close(TP, 12)
    t.close(TP, 11)
    assert t.positions() == {TP: (10, "1,2")}  # 11 and 12 answered, 10 still running
    t.mark_committed(t.positions())
    assert t.positions() == {}  # nothing new to commit
    t.close(TP, 10)
    assert t.positions() == {TP: (13, "")}


def test_skipped_records_advance_the_position():
    t = OffsetTracker()
    t.seen_offset(TP, 5, open_=False)  # dead-lettered or already answered
    assert t.positions() == {TP: (6, "")}


def test_restore_skips_exactly_the_answered_offsets():
    before = OffsetTracker()
    for o in range(20, 25):
        before.seen_offset(TP, o, open_=True)
    for o in (21, 23):
        before.close(TP, o)
    position, metadata = before.positions()[TP]
    after = OffsetTracker()  # the partition's next owner
    after.restore(TP, position, metadata)
    assert [o for o in range(20, 25) if after.is_done(TP, o)] == [21, 23]
    for o in (20, 22, 24):
        after.seen_offset(TP, o, open_=True)
    for o in (21, 23):
        after.seen_offset(TP, o, open_=False)
    for o in (20, 22, 24):
        after.close(TP, o)
    assert after.positions()[TP] == (25, "")


def test_metadata_codec():
    assert encode_done(100, {103, 101}) == "1,3"
    assert decode_done(100, "1,3") == {101, 103}
    assert decode_done(100, "") == set()
    assert decode_done(100, "written by another tool") == set()
