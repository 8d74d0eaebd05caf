"""The simulated backend in a real session: mixed graphs with edges on a virtual clock,
values None, no user code run, placements checked for double booking from its records
(not from the ledger), the ledger idle after, and a moderate scale case."""
import warnings

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.backends.simulated import (Record, SimulatedBackend, double_bookings,
                                               timeline)
from rhapsody_graph.resources import Host, Placement


def boom(*_):
    raise AssertionError("a simulated node must never run its function")


def seconds_of(node):
    """A node's modelled duration: its first argument, if a number."""
    return float(node.args[0]) if node.args and isinstance(node.args[0], int) else 3.0


def mixed_graph(n):
    """Python nodes of 1 core, 4 cores + 1 GPU and 8 GPUs, 16-rank jobs, a map wave over
    every GPU, executables, and edges: each wave feeds the next, a join at the end."""
    one = rhapsody.task(cpus=1)(boom)
    train = rhapsody.task(cpus=4, gpus=1)(boom)
    whole = rhapsody.task(cpus=1, gpus=8)(boom)
    job = rhapsody.task(cpus=1, ranks=16, distribution="round_robin")(boom)
    join = rhapsody.task(cpus=1)(boom)
    nodes = []
    for i in range(n):
        k = i % 20
        if k < 12:
            nodes.append(one(1 + i % 7))
        elif k < 16:
            nodes.append(train(2 + i % 5, nodes[-3:]))
        elif k == 16:
            nodes.append(whole(9))
        elif k == 17:
            nodes.append(job(4, nodes[-1]))
        elif k == 18:
            nodes.append(rhapsody.executable(["never-run", "--x", str(i)], cpus=2))
        else:
            nodes.extend(rhapsody.map(boom, [5, 6, 7], nodes[-3:], gpus="all"))
    return nodes + [join(1, nodes[-50:])]


def test_a_mixed_graph_completes_with_none_values_and_no_double_booking():
    sim = SimulatedBackend(hosts=4, cpus=16, gpus=8, duration=seconds_of)
    nodes = mixed_graph(400)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        values, = s.compute(nodes)
    assert values == [None] * len(nodes)
    assert len(sim.records) == len(nodes)
    assert sim.double_bookings() == []
    assert sim.ledger.idle()
    first_end = min(r.end for r in sim.records)
    assert sim.clock >= first_end > 0
    used = {(p.host, g) for r in sim.records for p in r.placements for g in p.gpus}
    assert len(used) == 32  # the map waves and the trainers went over every GPU
    jobs = [r for r in sim.records if len(r.placements) == 16]
    spread = [len({p.host for p in r.placements}) for r in jobs]
    # round-robin: one rank per host in turn, over the hosts with a free core then
    assert jobs and min(spread) >= 2 and max(spread) == 4, spread
    assert all([(p.rank, p.world_size) for p in r.placements] == [(k, 16) for k in range(16)]
               for r in jobs)  # a record's placements are the ledger's, rank by rank
    u = sim.utilisation()
    assert 0 < u["cores"] <= 1 and 0 < u["gpus"] <= 1 and u["seconds"] == sim.clock


def test_a_node_starts_only_after_its_inputs_ended_in_simulated_time():
    sim = SimulatedBackend(hosts=1, cpus=4, gpus=0, duration=seconds_of)
    step = rhapsody.task(cpus=1)(boom)
    a = step(5)
    b = step(7, a)
    c = step(2, [a, b])
    with rhapsody.Session(backends=[sim], progress=False) as s:
        assert s.compute(c) == (None,)
    span = {r.key: (r.start, r.end) for r in sim.records}
    assert span[a.key] == (0.0, 5.0) and span[b.key] == (5.0, 12.0) and span[c.key] == (12.0, 14.0)
    assert sim.clock == 14.0


def test_the_clock_queues_what_does_not_fit_and_records_show_it():
    sim = SimulatedBackend(hosts=[Host("a", cpus=2, gpus=1)], duration=10)
    gpu = rhapsody.task(cpus=1, gpus=1)(boom)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        s.compute([gpu(i) for i in range(3)])
    assert sorted((r.start, r.end) for r in sim.records) == [(0, 10), (10, 20), (20, 30)]
    assert sim.utilisation()["gpus"] == 1.0
    assert sim.utilisation()["cores"] == 0.5


def test_futures_and_several_computes_share_one_clock():
    sim = SimulatedBackend(hosts=2, cpus=2, gpus=0, duration=4.0)
    one = rhapsody.task(cpus=1)(boom)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        futures = s.submit([one(i) for i in range(8)])
        assert [f.result() for f in futures] == [None] * 8
        assert sim.clock == 8.0
        s.compute(one(99))
    assert sim.clock == 12.0 and sim.double_bookings() == []


def test_a_killed_call_reports_killed_and_its_record_ends_at_the_kill():
    from rhapsody_graph.backends.base import KILLED, OK, Call, Completions
    from rhapsody_graph.resources import Resources
    sim = SimulatedBackend(hosts=1, cpus=2, gpus=0, duration=seconds_of)
    hub = Completions()
    sim.attach(hub)
    step = rhapsody.task(cpus=1)(boom)
    short, long = step(5), step(50)
    for tid, node in ((1, short), (2, long)):
        placement = sim.ledger.allocate(Resources(cpus=1))
        sim.submit(Call(tid, node.key, sim.prepare(node), [], [placement], None, None))
    [(tid, status, payload, seconds)] = hub.wait(None)
    assert (tid, status, sim.decode(payload), seconds) == (1, OK, None, 5.0)
    assert sim.clock == 5.0
    sim.kill(2)
    assert hub.wait(None) == [(2, KILLED, None, 0.0)]
    assert hub.wait(0) == []  # nothing more is due: the clock stays
    assert sim.clock == 5.0
    assert [(r.key, r.start, r.end) for r in sim.records] == [(short.key, 0.0, 5.0),
                                                             (long.key, 0.0, 5.0)]
    sim.attach(None)
    hub.close()
    sim.shutdown()


def test_double_bookings_are_found_from_records_alone():
    a = Placement("n0", (0, 1), (2,))
    records = [Record("x", 0.0, 4.0, [a]), Record("y", 4.0, 6.0, [a]),
               Record("z", 5.0, 7.0, [Placement("n0", (3,), (2,))]),
               Record("w", 1.0, 1.0, [a])]  # held for no time
    assert double_bookings(records) == [(("n0", "gpu", 2), (4.0, 6.0, "y"), (5.0, 7.0, "z"))]
    assert timeline(records, 0.0, 8.0, bins=4) == [(0.0, 2.0, 1.0), (2.0, 2.0, 1.0),
                                                  (4.0, 2.5, 1.5), (6.0, 0.5, 0.5)]


@pytest.mark.parametrize("kwargs, error, text", [
    ({"hosts": 0}, ValueError, "hosts must be >= 1, got 0"),
    ({"hosts": "many"}, TypeError, "hosts must be a count or a list of Host, got 'many'"),
    ({"hosts": [Host("a", cpus=1)], "cpus": 4}, TypeError, "not both"),
    ({"duration": -1}, ValueError, "duration must be a finite number of seconds >= 0, got -1"),
    ({"name": ""}, TypeError, "name must be a non-empty string"),
])
def test_bad_arguments_are_refused_naming_the_value(kwargs, error, text):
    with pytest.raises(error, match=text):
        SimulatedBackend(**kwargs)


def test_a_bad_modelled_duration_names_the_node():
    sim = SimulatedBackend(hosts=1, cpus=1, gpus=0, duration=lambda node: "soon")
    with rhapsody.Session(backends=[sim], progress=False) as s:
        with pytest.raises(ValueError, match=r"node 'boom-.*duration modelled for it must be a "
                                             r"finite number of seconds >= 0, got 'soon'"):
            s.compute(rhapsody.task(boom)(1))


def test_an_impossible_request_fails_before_anything_runs():
    sim = SimulatedBackend(hosts=2, cpus=8, gpus=2)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        with pytest.raises(rhapsody.UnsatisfiableError, match="largest host 'sim0' has 8 cpus, 2 gpus"):
            s.compute(rhapsody.task(gpus=4)(boom)(1))
    assert sim.records == []


@pytest.mark.timeout(120)
def test_twenty_thousand_nodes_on_a_hundred_hosts():
    sim = SimulatedBackend(hosts=100, cpus=64, gpus=8, duration=seconds_of)
    nodes = mixed_graph(20_000)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        values, = s.compute(nodes)
    assert len(values) == len(nodes) and set(values) == {None}
    assert len(sim.records) == len(nodes)
    assert sim.double_bookings() == []
    assert sim.ledger.idle()
    assert sim.utilisation()["cores"] > 0


def test_calls_queued_on_a_lease_come_back_dropped_and_the_lease_frees_early():
    from rhapsody_graph.backends.base import DROPPED, OK, Call, Completions, Lease
    from rhapsody_graph.resources import Resources
    sim = SimulatedBackend(hosts=1, cpus=1, gpus=0, duration=seconds_of)
    hub = Completions()
    sim.attach(hub)
    step = rhapsody.task(cpus=1)(boom)
    lease = Lease(sim.ledger.allocate(Resources(cpus=1)), 3, ("k", False))
    nodes = [step(4), step(6), step(8)]
    for tid, node in enumerate(nodes, 1):
        sim.submit(Call(tid, node.key, sim.prepare(node), [], [lease.placement], lease, None))
    sim.drop_queued()  # at clock 0 the first runs; the two behind it never started
    assert sorted(c[:2] for c in hub.wait(None)) == [(2, DROPPED), (3, DROPPED)]
    assert [c[:2] for c in hub.wait(None)] == [(1, OK)]
    later = step(1)
    sim.submit(Call(4, later.key, sim.prepare(later), [], [lease.placement], lease, None))
    assert [c[:2] for c in hub.wait(None)] == [(4, OK)]
    assert [(r.start, r.end) for r in sim.records] == [(0.0, 4.0), (4.0, 5.0)]
    sim.attach(None)
    hub.close()
    sim.shutdown()


def test_what_the_simulation_keeps_is_left_alone_by_the_cyclic_collector():
    """At a million nodes Python's collector walking the backend's own bookkeeping over
    and over cost more than the placement decisions it interrupted (docs/scaling.md):
    a prepared call and the record of an ended call are tuples of scalars it stops
    tracking, so a finished run leaves nothing for it to walk."""
    import gc
    sim = SimulatedBackend(hosts=4, cpus=16, gpus=8, duration=seconds_of)
    prepared = sim.prepare(mixed_graph(1)[0])
    gc.collect()
    assert not gc.is_tracked(prepared)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        first = mixed_graph(100)
        s.compute(first)  # what a first run imports is not what it keeps
        nodes = mixed_graph(500)
        gc.collect()
        tracked = len(gc.get_objects())
        values, = s.compute(nodes)
        del values
        for _ in range(5):  # a pass per level of nesting in a record, in the worst order
            gc.collect()
        assert len(gc.get_objects()) - tracked < 50  # 4 per call before: 2,200 here
    assert len(sim.records) == len(first) + len(nodes) and sim.double_bookings() == []


def test_a_backend_used_again_after_its_session_closed_leaves_the_programs_files_alone():
    """Its wake-up pipe was closed at shutdown but its numbers kept: the next session
    read, wrote and closed whatever the program had opened under them since."""
    import os
    sim = SimulatedBackend(hosts=1, cpus=2, gpus=0, duration=10.0)
    node = rhapsody.task(boom)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        s.compute([node(i) for i in range(2)])
    read, write = os.pipe()  # likely the numbers the backend's pipe had
    try:
        with rhapsody.Session(backends=[sim], progress=False) as s:
            assert s.compute([node(i) for i in range(4)]) == ([None] * 4,)
        assert sim.clock == 30.0
        os.write(write, b"mine")
        assert os.read(read, 4) == b"mine"
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("end, bins", [(0.1, 7), (21696.0, 300), (4143.0, 300)])
def test_a_timeline_loses_no_busy_time_at_bin_edges(end, bins):
    always = [Record("a", -1.0, 1e9, [Placement("n0", (0,), (0,))])]
    levels = timeline(always, 0.0, end, bins=bins)
    assert len(levels) == bins
    assert all(c == pytest.approx(1.0) and g == pytest.approx(1.0) for _, c, g in levels)


def test_work_a_done_callback_submits_starts_at_the_simulated_time_of_the_result():
    work = rhapsody.task(boom)
    sim = SimulatedBackend(hosts=1, cpus=4, gpus=0, duration=seconds_of)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        first = s.submit(work(10))
        s.submit([work(50), work(90)])
        first.add_done_callback(lambda _: s.submit(work(5)))
        s.wait()
    assert sorted((r.start, r.end) for r in sim.records) == [(0, 10), (0, 50), (0, 90), (10, 15)]


def test_a_failing_duration_names_the_node_and_no_records_means_no_figures():
    sim = SimulatedBackend(hosts=1, cpus=1, gpus=0, duration=lambda node: {}[node.args[0]],
                           record=False)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        with pytest.raises(KeyError) as info:
            s.compute(rhapsody.task(boom)("large"))
    assert "for node 'boom-" in "".join(info.value.__notes__)
    with pytest.raises(RuntimeError, match="record=False"):
        sim.utilisation()


def test_two_simulated_backends_in_one_session_are_warned_of_each_keeping_its_own_clock():
    # a node on one "ran" before its input on the other had ended, silently
    a = rhapsody.SimulatedBackend(hosts=1, cpus=4, gpus=0, name="cpu", duration=1)
    b = rhapsody.SimulatedBackend(hosts=1, cpus=4, gpus=2, name="gpu", duration=1)
    with pytest.warns(RuntimeWarning, match="SimulatedBackend 'gpu' joins a session with "
                                            "simulated backend\\(s\\) 'cpu': each keeps its own "
                                            "clock"):
        rhapsody.Session(backends=[a, b], progress=False).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rhapsody.Session(backends=[b], progress=False) as s:  # alone: no warning
            assert s.compute(rhapsody.task(abs)(-1)) == (None,)
