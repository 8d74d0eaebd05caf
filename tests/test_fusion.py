"""Fusion: short nodes read by one node run inside its call, on real worker processes
(the planning itself is checked as pure logic, on nodes that never run)."""
import asyncio
import gc
import os
import threading
import time
import weakref

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph import fusion
from rhapsody_graph.errors import RemoteTraceback


def leaf(i):
    return i


def plus(a, b):
    return a + b


def check(x):
    if x == 13:
        raise ValueError("thirteen")
    return x


def record(path, x):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def slow_if(path, x):
    if os.path.exists(path):
        time.sleep(0.005)
    return x


def make_list(n):
    return list(range(n))


def append_len(xs):
    xs.append(0)
    return len(xs)


def length(xs):
    return len(xs)


def identical(a, b):
    return a is b


def interrupt(x):
    if x == 13:
        raise KeyboardInterrupt
    return x


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not this one")


def raise_unpicklable(x):
    raise Unpicklable(x)


KEPT = [0, 1, 2]  # a worker's own object, that a function hands out


def kept(x):
    return KEPT


def both(xs, extra=None):
    xs.append(0)
    return [len(xs), len(extra), xs is extra]


def make_counter():
    calls = [0]

    def count(x):
        calls[0] += 1
        return calls[0]
    return count


@rhapsody.task
def decorated(x):
    return x


async def later(x):
    await asyncio.sleep(0)
    return x + 1


def tree(leaves, make_leaf=lambda i: rhapsody.task(leaf)(i)):
    level = [make_leaf(i) for i in range(leaves)]
    while len(level) > 1:
        level = [rhapsody.task(plus)(level[k], level[k + 1]) for k in range(0, len(level), 2)]
    return level[0]


def lines(path):
    with open(path) as f:
        return f.read().split()


def calls_and_nodes(session):
    """(calls started, nodes done) on the session's one compute backend."""
    lane = next(lane for lane in session._scheduler.lanes.values()
                if lane.backend.name == "local")
    return lane.started, lane.done


@pytest.fixture
def session():
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], progress=False) as s:
        yield s


def test_a_reduction_runs_in_fewer_calls_once_its_functions_are_timed(session):
    assert session.compute(tree(64)) == (2016,)
    assert calls_and_nodes(session) == (127, 127)  # first: one call per node, timed
    assert session.compute(tree(64)) == (2016,)
    calls, nodes = calls_and_nodes(session)
    assert nodes == 254  # progress counts every node, fused ones too
    assert calls - 127 < 16  # the tree ran in a few calls


def test_fuse_false_runs_every_node_in_its_own_call():
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], progress=False,
                          fuse=False) as s:
        for _ in range(2):
            assert s.compute(tree(16)) == (120,)
        assert calls_and_nodes(s) == (62, 62)


def test_a_run_log_turns_fusion_off(tmp_path):
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], progress=False,
                          run_log=str(tmp_path / "runs.jsonl")) as s:
        for _ in range(2):
            assert s.compute(tree(16)) == (120,)
        assert calls_and_nodes(s) == (62, 62)  # every node has its own line in the log


def test_a_journal_turns_fusion_off(session, tmp_path):
    assert session.compute(tree(16)) == (120,)
    assert session.compute(tree(16), journal=str(tmp_path / "j")) == (120,)
    assert calls_and_nodes(session) == (62, 62)


def test_a_function_slower_than_the_call_limit_is_never_fused(session, tmp_path):
    flag = str(tmp_path / "slow")
    open(flag, "w").close()
    for _ in range(2):
        assert session.compute(tree(8, lambda i: rhapsody.task(slow_if)(flag, i))) == (28,)
    calls, _ = calls_and_nodes(session)
    assert calls >= 15 + 8  # the 8 slow leaves ran alone, both times


def test_a_function_that_grew_slow_inside_fused_calls_stops_being_fused(session, tmp_path):
    flag = str(tmp_path / "slow")
    make = lambda i: rhapsody.task(slow_if)(flag, i)  # noqa: E731
    assert session.compute(tree(64, make)) == (2016,)  # timed: fast
    assert session.compute(tree(64, make)) == (2016,)
    assert calls_and_nodes(session)[0] - 127 < 32  # fused
    open(flag, "w").close()  # from now on each call takes 5 ms
    assert session.compute(tree(64, make)) == (2016,)  # fused, far slower than foretold
    before = calls_and_nodes(session)[0]
    assert session.compute(tree(64, make)) == (2016,)
    assert calls_and_nodes(session)[0] - before >= 64  # the slow leaves run alone again


def test_a_fused_node_that_raises_fails_the_compute_with_its_exception_naming_it(session):
    assert session.compute(rhapsody.task(plus)(rhapsody.task(check)(1),
                                               rhapsody.task(check)(2))) == (3,)
    bad = rhapsody.task(check)(13)
    with pytest.raises(ValueError, match="thirteen") as info:
        session.compute(rhapsody.task(plus)(bad, rhapsody.task(check)(2)))
    notes = [n for n in info.value.__notes__ if n.startswith("raised by node")]
    assert len(notes) == 1 and notes[0].startswith(f"raised by node {bad.key!r}")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in check" in str(info.value.__cause__)  # the remote traceback of the raise


def test_a_second_failure_inside_a_fused_call_is_named_in_a_note_of_the_first(session):
    """Unfused, a compute() names every node that failed; fused, only the first was."""
    assert session.compute(rhapsody.task(plus)(rhapsody.task(check)(1),
                                               rhapsody.task(check)(2))) == (3,)
    first, second = rhapsody.task(check)(13), rhapsody.task(check)(13)
    with pytest.raises(ValueError, match="thirteen") as info:
        session.compute(rhapsody.task(plus)(first, second), fail_fast=False)
    notes = "\n".join(info.value.__notes__)
    assert f"{second.key} (ValueError: thirteen)" in notes or \
        f"{first.key} (ValueError: thirteen)" in notes, notes


def test_the_part_of_a_fused_call_that_does_not_read_a_failed_node_still_runs(session,
                                                                              tmp_path):
    path = str(tmp_path / "ran")
    warm = rhapsody.task(plus)(rhapsody.task(check)(1), rhapsody.task(record)(path, 0))
    assert session.compute(warm) == (1,)
    out = rhapsody.task(plus)(rhapsody.task(check)(13), rhapsody.task(record)(path, 5))
    with pytest.warns(RuntimeWarning, match="thirteen"):
        (value,) = session.compute(out, on_error="continue")
    assert isinstance(value, ValueError)
    assert lines(path) == ["0", "5"]


def test_a_fused_head_that_raises_is_named_once_and_is_not_called_lost(session):
    assert session.compute(rhapsody.task(check)(rhapsody.task(leaf)(1))) == (1,)
    head = rhapsody.task(check)(rhapsody.task(leaf)(13))
    with pytest.raises(ValueError) as info:
        session.compute(head)
    assert info.value.__notes__ == [f"raised by node {head.key!r}"]



def test_the_nodes_a_failure_skipped_are_counted_fused_ones_included(session):
    inc = rhapsody.task(plus)
    chain = rhapsody.task(leaf)(0)
    for _ in range(100):
        chain = inc(chain, 1)
    assert session.compute(chain) == (100,)  # timed: the next chain is fused
    x = bad = rhapsody.task(check)(13)
    for _ in range(300):
        x = inc(x, 1)
    with pytest.raises(ValueError) as info:
        session.compute(x)
    # a fused call stands for many nodes: it was counted as one ("2 node(s)")
    assert f"300 node(s) depending on {bad.key!r} did not run" in info.value.__notes__


def test_a_step_gets_its_own_copy_of_an_input_other_steps_read_too():
    made = rhapsody.task(make_list)(3)  # an input of the call: computed elsewhere
    top = rhapsody.task(plus)(rhapsody.task(append_len)(made), rhapsody.task(length)(made))
    (nodes,) = fusion.plan([top.deps[0], top.deps[1], top], [top],
                           {id(append_len): 1e-6, id(length): 1e-6, id(plus): 1e-6},
                           lambda n: True, fusion.Functions())[0].values()
    pickled, inputs, _ = fusion.steps(nodes, {}, fusion.Functions())
    assert inputs == (made,)
    assert fusion.run_fused(pickled, [0, 1, 2]) == 7  # 4 + 3: length saw it unchanged
    same = rhapsody.task(identical)(made, made)
    top = rhapsody.task(plus)(same, rhapsody.task(length)(made))
    (nodes,) = fusion.plan([same, top.deps[1], top], [top],
                           {id(identical): 1e-6, id(length): 1e-6, id(plus): 1e-6},
                           lambda n: True, fusion.Functions())[0].values()
    pickled, inputs, _ = fusion.steps(nodes, {}, fusion.Functions())
    assert fusion.run_fused(pickled, [7]) == 2  # f(x, x) got one object twice: True + 1


def test_steps_of_one_call_never_share_one_copy_of_a_value(session):
    # unfused, each call unpickles its own copy of its inputs and arguments: a step
    # that changes its input in place must not change what another step reads
    shared_list = [0, 1, 2]
    for _ in range(3):
        made = rhapsody.task(make_list)(3)
        from_node = rhapsody.task(plus)(rhapsody.task(append_len)(made),
                                        rhapsody.task(length)(made))
        from_constant = rhapsody.task(plus)(rhapsody.task(append_len)(shared_list),
                                            rhapsody.task(length)(shared_list))
        assert session.compute(from_node, from_constant) == (7, 7)
    assert shared_list == [0, 1, 2]


def test_a_reader_changing_a_fused_value_in_place_changes_no_worker_state(session):
    for _ in range(4):  # each reader gets a copy, as if the value had been sent
        changed = rhapsody.task(append_len)(rhapsody.task(kept)(0))
        assert session.compute(rhapsody.task(plus)(changed, rhapsody.task(leaf)(0))) == (4,)
    calls, nodes = calls_and_nodes(session)
    assert nodes == 16 and calls < 16


def test_an_object_passed_as_an_argument_and_a_keyword_stays_one_object(session):
    shared = [1]
    for _ in range(3):
        node = rhapsody.task(both)(shared, extra=shared)
        assert session.compute(rhapsody.task(plus)(node, [])) == ([2, 2, True],)


def test_a_function_of_the_script_fused_sees_its_globals_as_they_are_now(session):
    scope = {"K": 1}
    exec("def scale(x):\n    return x * K\n", scope)  # noqa: S102 (a notebook's cell)
    scale = scope["scale"]
    for k, expected in ((1, 3), (1, 3), (100, 300)):
        scope["K"] = k
        node = rhapsody.task(plus)(rhapsody.task(scale)(1), rhapsody.task(scale)(2))
        assert session.compute(node) == (expected,)


def test_two_closures_that_pickle_alike_keep_their_own_state(session):
    first, second = make_counter(), make_counter()
    for _ in range(2):
        node = rhapsody.task(plus)(rhapsody.task(first)(0), rhapsody.task(second)(0))
        (value,) = session.compute(node)
    assert value == 2  # each counted its own calls: one each, in each run


def test_estimates_refit_toward_what_the_fused_calls_took_not_past_it(session):
    scheduler = session._scheduler
    scheduler._time(leaf, 10e-6)
    for _ in range(60):  # one plan's calls, each 2.5 times slower than foretold
        fused = fusion.Fused(31, 31 * 10e-6, ((id(leaf), 10e-6),))
        scheduler._refit(fused, 2.5 * fused.predicted)
    assert 20e-6 < scheduler.seconds[id(leaf)] <= 25e-6
    scheduler._refit(fusion.Fused(31, 31 * 10e-6, ((id(leaf), 10e-6),)), 31 * 10e-6)
    assert scheduler.seconds[id(leaf)] > 20e-6  # as foretold: left alone


def test_a_fused_value_that_cannot_be_pickled_fails_its_node_saying_where_it_went():
    made = rhapsody.task(threading.Lock)()
    top = rhapsody.task(plus)(rhapsody.task(identical)(made, made), rhapsody.task(leaf)(1))
    seconds = {id(threading.Lock): 1e-6, id(identical): 1e-6, id(plus): 1e-6, id(leaf): 1e-6}
    with pytest.raises(TypeError, match="to go to the node that reads it") as info:
        fusion.run_fused(fused_call([top], seconds))
    assert info.value.__notes__[0].startswith(f"raised by node {made.key!r}")


def test_a_task_function_of_a_module_travels_by_reference():
    assert decorated.func is not decorated  # the module's name holds the Task
    assert len(fusion.Functions().get(decorated.func)) < 200


def test_run_times_keep_no_function_alive(session):
    class Big:
        pass
    big = Big()
    alive = weakref.ref(big)
    fn = (lambda held: lambda x: x)(big)  # a closure over a large object
    for _ in range(2):
        assert session.compute(rhapsody.task(plus)(rhapsody.task(fn)(1), 2)) == (3,)
    session.wait()
    del big, fn
    gc.collect()
    assert alive() is None


def test_executables_are_not_timed(session):
    before = len(session._scheduler.seconds)
    for _ in range(3):
        session.compute(rhapsody.executable(["true"]))
    assert len(session._scheduler.seconds) == before


def test_a_node_read_by_two_nodes_runs_once(session, tmp_path):
    for name in ("warm", "once"):
        path = str(tmp_path / name)
        shared = rhapsody.task(record)(path, 1)
        both = rhapsody.task(plus)(rhapsody.task(plus)(shared, 1), rhapsody.task(plus)(shared, 2))
        assert session.compute(both) == (5,)
        assert lines(path) == ["1"]


def test_an_output_is_never_fused_into_the_node_that_reads_it(session):
    for _ in range(2):
        x = rhapsody.task(plus)(rhapsody.task(leaf)(1), rhapsody.task(leaf)(2))
        assert session.compute(x, rhapsody.task(plus)(x, 10)) == (3, 13)


def test_an_argument_that_cannot_be_pickled_is_named_on_the_node_that_takes_it(session):
    assert session.compute(rhapsody.task(plus)(rhapsody.task(leaf)(1),
                                               rhapsody.task(leaf)(2))) == (3,)
    unsendable = rhapsody.task(leaf)(threading.Lock())
    with pytest.raises(TypeError, match=f"node {unsendable.key!r}: argument 0"):
        session.compute(rhapsody.task(plus)(unsendable, rhapsody.task(leaf)(2)))


def fused_call(outputs, seconds):
    """The steps of the one fused call ``plan`` makes for ``outputs``, pickled, and its
    inputs' values (none here): what a worker gets."""
    (nodes,) = planned(outputs, seconds).values()
    pickled, inputs, _ = fusion.steps(nodes, seconds, fusion.Functions())
    assert inputs == ()
    return pickled


def test_a_fused_call_awaits_an_async_function():
    x = rhapsody.task(later)(rhapsody.task(later)(rhapsody.task(later)(0)))
    assert fusion.run_fused(fused_call([x], {id(later): 1e-6})) == 3


def test_a_fused_call_runs_what_does_not_read_a_failed_step_then_raises_its_error():
    bad = rhapsody.task(check)(13)
    fine = rhapsody.task(plus)(rhapsody.task(leaf)(1), 1)
    top = rhapsody.task(plus)(rhapsody.task(plus)(bad, 1), fine)
    seconds = {id(check): 1e-6, id(plus): 1e-6, id(leaf): 1e-6}
    with pytest.raises(ValueError, match="thirteen") as info:
        fusion.run_fused(fused_call([top], seconds))
    assert info.value.__notes__ == [f"raised by node {bad.key!r}, which ran inside the call "
                                    f"of node {top.key!r} (fused: see rhapsody_graph.fusion)"]


def test_a_fused_step_interrupted_is_named_as_any_other_failure():
    bad = rhapsody.task(interrupt)(13)
    top = rhapsody.task(plus)(bad, rhapsody.task(leaf)(1))
    with pytest.raises(KeyboardInterrupt) as info:
        fusion.run_fused(fused_call([top], {id(interrupt): 1e-6, id(plus): 1e-6,
                                            id(leaf): 1e-6}))
    assert info.value.__notes__[0].startswith(f"raised by node {bad.key!r}")


def test_an_exception_that_cannot_be_pickled_keeps_the_fused_nodes_name():
    from rhapsody_graph.backends import wire
    bad = rhapsody.task(raise_unpicklable)(1)
    top = rhapsody.task(plus)(bad, rhapsody.task(leaf)(1))
    try:
        fusion.run_fused(fused_call([top], {id(raise_unpicklable): 1e-6, id(plus): 1e-6,
                                            id(leaf): 1e-6}))
    except Unpicklable as exc:
        back = wire.load_error(wire.dump_error(exc), top.key)
    assert isinstance(back, rhapsody.RemoteError)
    first, why = back.__notes__  # and no "raised by node" naming the call's own node
    assert first.split(",")[0] == f"raised by node {bad.key!r}"
    assert why.startswith("RemoteError stands for the node's tests.test_fusion.Unpicklable")


# -- planning (pure logic: nodes that never run) ----------------------------------------

def planned(outputs, seconds, fusable=lambda n: True):
    order = list(rhapsody.Graph(*outputs))
    return fusion.plan(order, outputs, seconds, fusable, fusion.Functions())[0]


def test_planning_fuses_a_chain_in_calls_of_at_most_the_budget_of_measured_work():
    x = rhapsody.task(leaf)(0)
    for _ in range(39):
        x = rhapsody.task(plus)(x, 1)
    groups = planned([x], {id(leaf): 45e-6, id(plus): 45e-6})
    sizes = [len(nodes) for nodes in groups.values()]
    assert sum(sizes) == 40 and len(sizes) >= 2
    assert max(sizes) * 45e-6 <= fusion.BUDGET
    assert x in list(groups.values())[-1]  # the output's call is the last


def test_planning_leaves_untimed_and_slow_functions_and_refused_options_alone():
    x = rhapsody.task(plus)(rhapsody.task(leaf)(1), rhapsody.task(leaf)(2))
    assert planned([x], {}) == {}  # nothing timed yet
    assert planned([x], {id(leaf): 1e-3, id(plus): 1e-6}) == {}  # the leaves are slow
    assert planned([x], {id(leaf): 1e-6, id(plus): 1e-6}, lambda n: None) == {}
    # a node is fused only into a reader on its own backend
    assert planned([x], {id(leaf): 1e-6, id(plus): 1e-6}, lambda n: n.name) == {}
    y = rhapsody.task(timeout=5)(plus)(rhapsody.task(leaf)(1), rhapsody.task(leaf)(2))
    assert not y.opts.fusable and x.opts.fusable
    assert rhapsody.task(cpus=1, gpus=0, retries=0, name="p")(plus)(1, 2).opts.fusable
    assert not rhapsody.task(cpus=2)(plus)(1, 2).opts.fusable  # the defaults, spelt out
    (nodes,) = planned([x], {id(leaf): 1e-6, id(plus): 1e-6}).values()
    assert nodes[-1] is x and len(nodes) == 3


def test_planning_never_fuses_an_output_or_a_node_read_twice_or_inside_a_container():
    seconds = {id(leaf): 1e-6, id(plus): 1e-6, id(sum): 1e-6}
    a = rhapsody.task(leaf)(1)
    twice = rhapsody.task(plus)(a, a)  # read twice by one node: one reader, fusable
    top = rhapsody.task(plus)(twice, rhapsody.task(leaf)(0))
    (nodes,) = planned([top], seconds).values()
    assert nodes.index(a) < nodes.index(twice) < nodes.index(top) == len(nodes) - 1
    b = rhapsody.task(leaf)(2)
    two_readers = [rhapsody.task(plus)(b, 1), rhapsody.task(plus)(b, 2)]
    assert all(b not in nodes for nodes in planned(two_readers, seconds).values())
    c = rhapsody.task(leaf)(3)
    top = rhapsody.task(plus)(c, 1)
    assert planned([c, top], seconds) == {}  # c is an output
    listed = rhapsody.task(sum)([rhapsody.task(leaf)(4), rhapsody.task(leaf)(5)])
    assert planned([listed], seconds) == {}  # its inputs sit in a list
