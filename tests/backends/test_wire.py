"""The call encoding between the driver and its workers (rhapsody_graph.backends.wire):
upstream values fill their slots the same way on the flat fast path and the general one."""
import gc
import pickle
import weakref

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.backends import wire


class Upstream:
    """Stands for an upstream node: only its identity matters to the encoding."""


def _round_trip(args, kwargs, deps, values):
    data = wire.dump_args(args, kwargs, deps)
    return data, wire.load_args(data, [pickle.dumps(v) for v in values])


def test_positional_upstream_values_beside_scalars_take_the_flat_encoding():
    a, b = Upstream(), Upstream()
    data, (args, kwargs) = _round_trip((a, 1, "x", b, None, 2.5), {}, (a, b), (10, [1, 2]))
    assert type(data) is tuple  # pickled once, with the frame
    assert args == (10, 1, "x", [1, 2], None, 2.5) and kwargs == {}


def test_a_call_of_its_inputs_in_order_takes_the_flat_encoding_at_no_walk():
    a, b, c = Upstream(), Upstream(), Upstream()
    for args in ((a,), (a, b), (a, b, c)):
        data, (loaded, kwargs) = _round_trip(args, {}, args, range(len(args)))
        assert data == wire._flat(args, {id(d): i for i, d in enumerate(args)})
        assert loaded == tuple(range(len(args))) and kwargs == {}
    # one arity, one pair (a reduction's joins share it), which the collector ignores
    assert wire.dump_args((a, b), {}, (a, b)) is wire.dump_args((c, a), {}, (c, a))
    for _ in range(3):  # the outer tuple once the inner ones are let go
        gc.collect()
    assert not gc.is_tracked(wire.dump_args((a, b), {}, (a, b)))


def test_one_upstream_value_read_twice_is_one_object_on_both_encodings():
    a = Upstream()
    flat, (args, _) = _round_trip((a, a), {}, (a,), ([7],))
    assert type(flat) is tuple and args[0] is args[1]
    general, (args, kwargs) = _round_trip((a, [a]), {"k": a}, (a,), ([7],))
    assert type(general) is bytes
    assert args[0] is args[1][0] is kwargs["k"] and args[0] == [7]


def test_a_call_of_scalars_alone_keeps_its_argument_tuple_and_others_are_pickled():
    for args in ((), (1, "a", b"b", 2.5, None, True, 1j), ("__main__",)):
        data, loaded = _round_trip(args, {}, (), ())
        assert data is args and loaded == (args, {})
    for args, kwargs in (((1, [2]), {}), ((1,), {"k": 2})):
        data, loaded = _round_trip(args, kwargs, (), ())
        assert type(data) is bytes and loaded == (args, kwargs)


def test_waiting_scalar_and_flat_arguments_leave_nothing_for_the_cyclic_collector_to_walk():
    a = Upstream()
    forms = [wire.dump_args((1, "a"), {}, ()), wire.dump_args((a, 2), {}, (a,))]
    for _ in range(3):  # a tuple is let go once the tuples in it are: 3 levels here
        gc.collect()
    assert [gc.is_tracked(f) for f in forms] == [False, False]


def test_containers_keywords_and_other_objects_take_the_general_encoding():
    a = Upstream()
    for args, kwargs in (((a, [1]), {}), ((a,), {"k": 1}), ((a, Upstream()), {})):
        data = wire.dump_args(args, kwargs, (a,))
        assert type(data) is bytes, (args, kwargs)


@rhapsody.task
def _pair(x, y):
    return x is y, x


@rhapsody.task
def _listed(n):
    return list(range(n))


def test_a_worker_gives_one_upstream_value_read_twice_as_one_object():
    backend = rhapsody.LocalBackend(cpus=1)
    try:
        up = _listed(3)
        assert _pair(up, up).compute(backend=backend) == (True, [0, 1, 2])
    finally:
        backend.shutdown()


def test_code_sent_by_value_keeps_its_source_file_for_the_remote_traceback():
    offset = 3

    def shifted(x):
        return helper_in_a_closure(x) + offset

    def helper_in_a_closure(x):
        return x
    fn = pickle.loads(wire.dump_callable(shifted))
    assert fn(1) == 4
    assert fn.__code__.co_filename == __file__  # cloudpickle 3.1 alone: "<dynamic-code>"
    args = pickle.loads(wire.dump_value((lambda: 1,)))  # arguments by value too
    assert args[0].__code__.co_filename == __file__


class Held:
    """What a driver frame holds (a call's Dask future, say)."""


def _raise_value_error():
    raise ValueError("in the worker")


def test_an_error_pickled_with_its_traceback_keeps_no_driver_frame_alive():
    """With tblib's pickling installed (Dask installs it), the error's rebuilt traceback
    chained into the frames that loaded it: a failed Dask call's future stayed alive,
    and its task on the scheduler, for as long as the user held the error."""
    pytest.importorskip("tblib.pickling_support").install()
    try:
        _raise_value_error()
    except ValueError as e:
        data = wire.dump_error(e)
    assert pickle.loads(pickle.loads(data)[0]).__traceback__ is not None  # tblib's at work

    def load():
        held = Held()  # a local of the frame that loads the error
        return weakref.ref(held), wire.load_error(data, "node-1")
    gone, exc = load()
    gc.collect()
    assert isinstance(exc, ValueError) and "in the worker" in str(exc.__cause__)
    assert gone() is None, "the error kept the loading frame's locals alive"
