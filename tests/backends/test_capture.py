"""The per-call output capture of a worker (pure logic: a Tee over a StringIO)."""
import io

from rhapsody_graph.backends.capture import CUT, Tee


def test_tee_writes_through_and_hands_over_each_calls_output_once():
    sink = io.StringIO()
    tee = Tee(sink)
    print("one", file=tee)
    assert tee.take() == "one\n" and tee.take() == ""
    print("two", file=tee)
    assert sink.getvalue() == "one\ntwo\n" and tee.take() == "two\n"


def test_tee_keeps_only_the_tail_of_a_long_output_and_marks_the_cut():
    tee = Tee(io.StringIO(), limit=100)
    for i in range(1000):
        tee.write(f"line {i:04d}\n")
        assert tee._size <= 2 * 100 + 10  # memory stays bounded while it grows
    kept = tee.take()
    assert kept.startswith(CUT) and kept.endswith("line 0999\n") and len(kept) == 100 + len(CUT)
