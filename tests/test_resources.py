"""Resources, Inventory and Ledger: allocation, release, round-robin GPUs, ranks."""
import pytest

from rhapsody_graph.errors import UnsatisfiableError
from rhapsody_graph.resources import Host, Inventory, Ledger, Resources, detect_host


def ledger(*hosts):
    return Ledger(Inventory(hosts))


def test_cores_are_taken_lowest_first_and_given_back():
    lg = ledger(Host("n0", cpus=4))
    a = lg.allocate(Resources(cpus=2))
    b = lg.allocate(Resources(cpus=2))
    assert (a.cpus, b.cpus) == ((0, 1), (2, 3))
    assert lg.allocate(Resources(cpus=1)) is None
    lg.release(a)
    assert lg.allocate(Resources(cpus=1)).cpus == (0,)


def test_one_gpu_requests_go_round_robin_over_every_gpu_of_every_host():
    lg = ledger(Host("a", cpus=8, gpus=2), Host("b", cpus=8, gpus=2))
    got = []
    for _ in range(8):
        p = lg.allocate(Resources(cpus=1, gpus=1))
        got.append((p.host, p.gpus))
        lg.release(p)
    assert got == [("a", (0,)), ("a", (1,)), ("b", (0,)), ("b", (1,))] * 2


def test_a_gpu_is_never_granted_twice_while_held():
    lg = ledger(Host("a", cpus=8, gpus=3))
    held = [lg.allocate(Resources(gpus=1)) for _ in range(3)]
    assert sorted(p.gpus[0] for p in held) == [0, 1, 2]
    assert lg.allocate(Resources(gpus=1)) is None


def test_multi_gpu_request_stays_on_one_host():
    lg = ledger(Host("a", cpus=4, gpus=1), Host("b", cpus=4, gpus=2))
    p = lg.allocate(Resources(cpus=1, gpus=2))
    assert (p.host, p.gpus) == ("b", (0, 1))


def test_ranks_block_fill_a_host_then_the_next():
    lg = ledger(Host("a", cpus=2), Host("b", cpus=2))
    ps = lg.allocate_ranks(Resources(cpus=1, ranks=3, distribution="block"))
    assert [(p.host, p.cpus, p.rank, p.world_size) for p in ps] == [
        ("a", (0,), 0, 3), ("a", (1,), 1, 3), ("b", (0,), 2, 3)]


def test_ranks_round_robin_alternate_hosts():
    lg = ledger(Host("a", cpus=2), Host("b", cpus=2))
    ps = lg.allocate_ranks(Resources(cpus=1, ranks=4, distribution="round_robin"))
    assert [p.host for p in ps] == ["a", "b", "a", "b"]


def test_ranks_are_all_or_nothing():
    lg = ledger(Host("a", cpus=2))
    assert lg.allocate_ranks(Resources(cpus=1, ranks=3)) is None
    assert lg.idle()


def test_memory_is_accounted():
    lg = ledger(Host("a", cpus=4, memory=1000))
    p = lg.allocate(Resources(cpus=1, memory=600))
    assert lg.allocate(Resources(cpus=1, memory=600)) is None
    lg.release(p)
    assert lg.allocate(Resources(cpus=1, memory=600)) is not None


def test_impossible_request_names_node_request_and_largest_host():
    inv = Inventory([Host("small", cpus=2, gpus=1), Host("big", cpus=4, gpus=2)])
    with pytest.raises(UnsatisfiableError, match=r"node 'train-1' asks for 1 cpus, 8 gpus.*"
                                                  r"largest host 'big' has 4 cpus, 2 gpus"):
        inv.check(Resources(cpus=1, gpus=8), "node 'train-1'")
    with pytest.raises(UnsatisfiableError, match="x 9 ranks"):
        inv.check(Resources(cpus=1, ranks=9), "node 'job'")
    inv.check(Resources(cpus=1, ranks=6), "node 'job'")  # 2 + 4 cores


def test_detect_host_reads_affinity_and_honours_declared_counts():
    import os
    h = detect_host()
    assert set(h.cpus) == os.sched_getaffinity(0)
    d = detect_host(cpus=len(h.cpus) + 2, gpus=4)
    assert len(d.cpus) == len(h.cpus) + 2 and d.gpus == (0, 1, 2, 3)


def test_detect_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_host().gpus == (2, 3)


def test_local_rank_counts_ranks_per_host():
    lg = ledger(Host("a", cpus=2), Host("b", cpus=2))
    ps = lg.allocate_ranks(Resources(cpus=1, ranks=4, distribution="round_robin"))
    assert [(p.host, p.rank, p.local_rank) for p in ps] == [
        ("a", 0, 0), ("b", 1, 0), ("a", 2, 1), ("b", 3, 1)]
    assert ps[2].env()["LOCAL_RANK"] == "1" and ps[2].env()["RANK"] == "2"


def test_single_rank_requests_of_any_kind_share_the_gpu_round_robin():
    lg = ledger(Host("a", cpus=4, gpus=2))
    first = lg.allocate_ranks(Resources(gpus=1))[0]
    lg.release(first)
    assert lg.allocate_ranks(Resources(gpus=1))[0].gpus != first.gpus


@pytest.mark.parametrize("kwargs, text", [
    ({"cpus": 2, "gpus": -1}, "gpus must be a count >= 0"),
    ({"cpus": [0, 0]}, "cpus ids must be distinct"),
    ({"cpus": 0}, "needs at least one core"),
    ({"cpus": 2, "gpus": [1, -2]}, "gpus must be a count >= 0 or a list of ids"),
    ({"cpus": 1.5}, r"cpus must be a count >= 0 or a list of ids >= 0, got 1.5"),
    ({"cpus": True}, "cpus must be a count"),
    ({"cpus": 2, "gpus": 1.5}, "gpus must be a count"),
    ({"cpus": 2, "memory": -1}, "memory must be a number of bytes >= 0, got -1"),
])
def test_declared_hosts_are_validated(kwargs, text):
    with pytest.raises(ValueError, match=text):
        Host("h", **kwargs)


@pytest.mark.parametrize("kwargs, text", [
    ({"cpus": 1.5}, "cpus must be a count >= 0 or a list of ids >= 0, got 1.5"),
    ({"memory": -1}, "memory must be a number of bytes >= 0, got -1"),
])
def test_local_backend_counts_are_validated_where_written(kwargs, text):
    import rhapsody_graph as rhapsody
    with pytest.raises(ValueError, match=text):
        rhapsody.LocalBackend(**kwargs)


def test_local_backend_refuses_hosts_together_with_counts():
    import rhapsody_graph as rhapsody
    with pytest.raises(TypeError, match="not both"):
        rhapsody.LocalBackend(hosts=[Host("a", cpus=1)], memory=10)


def test_host_and_host_id_constrain_where_the_ledger_places():
    inv = Inventory([Host("n0", cpus=2), Host("n1", cpus=2, id=7)])
    lg = Ledger(inv)
    assert lg.allocate(Resources(cpus=1, host="n1")).host == "n1"
    assert lg.allocate(Resources(cpus=1, host_id=7)).host == "n1"
    assert lg.allocate(Resources(cpus=1, host="n1")) is None  # n1 is full, n0 is not asked
    assert inv.hosts[0].id == 0  # hosts without an id are numbered by position


def test_explicit_affinity_reserves_exactly_those_ids():
    lg = Ledger(Inventory([Host("n0", cpus=4, gpus=4)]))
    p = lg.allocate(Resources(cpus=2, gpus=2, cpu_ids=(1, 3), gpu_ids=(2, 0)))
    assert (p.cpus, p.gpus) == ((1, 3), (2, 0))
    assert lg.allocate(Resources(cpus=1, cpu_ids=(3,))) is None  # taken
    assert lg.allocate(Resources(cpus=2)).cpus == (0, 2)  # the rest, lowest first
    lg.release(p)
    assert lg.allocate(Resources(cpus=1, gpus=1, cpu_ids=(3,), gpu_ids=(2,))).gpus == (2,)


def test_impossible_host_or_ids_are_refused_naming_the_node_and_the_hosts():
    inv = Inventory([Host("n0", cpus=2, gpus=1)])
    for req in (Resources(host="n9"), Resources(host_id=3), Resources(cpu_ids=(5,)),
                Resources(gpus=1, gpu_ids=(4,))):
        with pytest.raises(UnsatisfiableError, match=r"node 'sim-1' asks for .*no host matches.*'n0'"):
            inv.check(req, "node 'sim-1'")


def test_a_request_too_big_for_the_host_it_names_is_refused_naming_that_host():
    inv = Inventory([Host("a", cpus=2, gpus=0), Host("b", cpus=2, gpus=4)])
    with pytest.raises(UnsatisfiableError,
                       match="2 gpus on host='a', but no host can hold it: the largest such "
                             "host 'a' has 2 cpus, 0 gpus"):
        inv.check(Resources(cpus=0, gpus=2, host="a"), "node 'svc'")


def test_ranks_with_requests_of_their_own_are_placed_each_by_its_own_or_not_at_all():
    lg = ledger(Host("n0", cpus=4, gpus=2))
    groups = Resources(cpus=1, ranks=3, per_rank=(
        Resources(cpus=2, cpu_ids=(2, 3), host="n0"), Resources(cpus=1, gpus=1, gpu_ids=(1,)),
        Resources(cpus=1)))
    placed = lg.allocate_ranks(groups)
    assert [(p.cpus, p.gpus, p.rank, p.world_size) for p in placed] == [
        ((2, 3), (), 0, 3), ((0,), (1,), 1, 3), ((1,), (), 2, 3)]
    assert lg.allocate_ranks(groups) is None  # all or nothing: no rank is left holding cores
    for p in placed:
        lg.release(p)
    assert lg.idle()


def test_ranks_that_can_never_fit_together_are_refused_naming_the_rank_and_the_hosts():
    inv = Inventory([Host("n0", cpus=2)])
    fits = Resources(ranks=2, per_rank=(Resources(cpu_ids=(0,)), Resources(cpu_ids=(1,))))
    inv.check(fits, "node 'job'")
    assert inv.ranks_that_fit(fits) == 2
    with pytest.raises(UnsatisfiableError, match=r"node 'job': rank 1 of 2 asks for 2 cpus, 0 "
                                                 r"gpus on cpu_affinity=\[0, 1\].*'n0' \(cpus \[0, 1\]"):
        inv.check(Resources(ranks=2, per_rank=(Resources(cpus=1), Resources(cpus=2, cpu_ids=(0, 1)))),
                  "node 'job'")


def test_a_host_that_joins_is_placed_on_and_one_that_leaves_is_not():
    ledger = Ledger(Inventory([Host("a", cpus=1, gpus=1)]))
    first = ledger.allocate(Resources(cpus=1, gpus=1))
    assert first.host == "a" and ledger.allocate(Resources(cpus=1)) is None
    ledger.add_host(Host("b", cpus=2, gpus=1))
    assert [h.name for h in ledger.inventory.hosts] == ["a", "b"]
    assert ledger.inventory.hosts[1].id == 1
    assert ledger.allocate(Resources(cpus=1, gpus=1)).host == "b"
    with pytest.raises(ValueError, match="'b' is already here"):
        ledger.add_host(Host("b", cpus=1))
    ledger.remove_host("a")
    ledger.release(first)  # its host left: nothing to give back
    assert ledger.allocate(Resources(cpus=1)).host == "b"
    assert ledger.allocate(Resources(cpus=1)) is None
    ledger.remove_host("b")
    with pytest.raises(UnsatisfiableError, match="has no host now"):
        ledger.inventory.check(Resources(cpus=1), "node 'x'")
