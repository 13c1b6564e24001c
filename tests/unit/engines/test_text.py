from workers.engines.text import IncrementalText


def _decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_text_is_held_back_while_it_may_start_a_stop_string() -> None:
    t = IncrementalText(_decode, stop=("END",))
    assert [t.add(ord(c)) for c in "abE"] == ["a", "b", ""]
    assert t.add(ord("x")) == "Ex"  # "Ex" can no longer become "END"
    assert t.add(ord("E")) == "" and t.add(ord("N")) == ""
    assert t.add(ord("D")) == "" and t.stopped
    assert t.text == "abEx"
    assert t.add(ord("z")) == ""


def test_half_characters_wait_for_the_rest_and_flush_releases_held_text() -> None:
    def decode(ids: list[int]) -> str:  # the 4th token is the first byte of "é"
        return {1: "c", 2: "ca", 3: "caf", 4: "caf\ufffd", 5: "café"}[len(ids)]

    t = IncrementalText(decode)
    assert [t.add(0) for _ in range(5)] == ["c", "a", "f", "", "é"]
    held = IncrementalText(lambda ids: "ab", stop=("bc",))
    assert held.add(0) == "a"  # "b" might start "bc"
    assert held.flush() == "b"
