"""Resources, Inventory and Ledger: allocation, release, round-robin GPUs, ranks."""
import os
import subprocess
import sys

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
    with pytest.raises(UnsatisfiableError, match="asks for 9 ranks of 1 cpus.*only 6 such "
                                                 "ranks fit on the whole inventory at once"):
        inv.check(Resources(cpus=1, ranks=9), "node 'job'")  # each fits: not "no host can"
    inv.check(Resources(cpus=1, ranks=6), "node 'job'")  # 2 + 4 cores


def test_an_impossible_memory_request_shows_both_sizes_in_units_a_reader_can_compare():
    inv = Inventory([Host("n0", cpus=2, memory=24 << 30)])
    with pytest.raises(UnsatisfiableError, match=r"asks for 1 cpus, 0 gpus, 68719476736 bytes "
                       r"\(64\.0 GiB\) of memory.*has 2 cpus, 0 gpus and 25769803776 bytes "
                       r"\(24\.0 GiB\) of memory"):
        inv.check(Resources(cpus=1, memory=64 << 30), "node 'load'")


def test_detect_host_reads_affinity_and_honours_declared_counts():
    import os
    h = detect_host()
    assert set(h.cpus) == os.sched_getaffinity(0)
    d = detect_host(cpus=len(h.cpus) + 2, gpus=4)
    assert len(d.cpus) == len(h.cpus) + 2 and d.gpus == (0, 1, 2, 3)


def test_detect_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_host().gpus == (2, 3)
    for hidden in ("-1", "NoDevFiles", ""):  # "no GPU": -1 used to be one GPU named "-1"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert detect_host().gpus == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at an invalid entry
    assert detect_host().gpus == (0,)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")  # read when asked, not once
    assert detect_host().gpus == (0, 1)


def test_gpus_named_by_uuid_are_numbered_and_placed_processes_see_their_uuid():
    """Slurm and MIG set CUDA_VISIBLE_DEVICES to UUIDs: they used to be dropped (0 GPUs,
    every GPU node unsatisfiable). A real run in a fresh process, where the variable is
    read before anything sets it."""
    uuids = "GPU-8f1c2d3e-aaaa-bbbb-cccc-1234567890ab,MIG-1a2b3c4d-0000-1111-2222-3333444455"
    program = """
import os, rhapsody_graph as r
if __name__ == "__main__":
    with r.LocalBackend(cpus=2) as b:
        print(b.inventory.hosts[0].gpus)
        seen = r.task(gpus=1)(lambda: (os.environ["CUDA_VISIBLE_DEVICES"],
                                       r.current_placement().gpus))
        run = r.executable(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], gpus=2)
        function, program = r.compute(seen(), run, backend=b)
        print(function[0] == uuids.split(",")[function[1][0]], program.stdout.strip())
"""
    program += """
        os.environ["CUDA_VISIBLE_DEVICES"] = "GPU-other"  # changed mid-run: b keeps its own
        both = r.compute(r.map(lambda i: os.environ["CUDA_VISIBLE_DEVICES"], range(2),
                               gpus="all"), backend=b)[0]
        print(sorted(both) == sorted(uuids.split(",")))
"""
    out = subprocess.run([sys.executable, "-c", f"uuids = {uuids!r}\n" + program],
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": uuids},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["(0, 1)", f"True {uuids}", "True"]


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


def test_more_pinned_ranks_than_hosts_with_those_ids_are_refused_saying_so():
    inv = Inventory([Host("n0", cpus=2), Host("n1", cpus=2)])
    inv.check(Resources(cpus=1, ranks=2, cpu_ids=(0,)), "node 'job'")  # one per host
    with pytest.raises(UnsatisfiableError, match=r"3 ranks on cpu_affinity=\[0\], but ranks "
                       "pinned to the same ids take one host each, and only 2 host"):
        inv.check(Resources(cpus=1, ranks=3, cpu_ids=(0,)), "node 'job'")  # said "2 cpus"


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
    on_b = ledger.allocate(Resources(cpus=1))
    assert on_b.host == "b"
    assert ledger.allocate(Resources(cpus=1)) is None
    assert ledger.holds(on_b) and not ledger.holds(first)
    ledger.remove_host("b")
    assert not ledger.holds(on_b)
    with pytest.raises(UnsatisfiableError, match="has no host now"):
        ledger.inventory.check(Resources(cpus=1), "node 'x'")


def test_an_inventory_of_one_host_not_in_a_list_says_to_pass_a_list():
    with pytest.raises(TypeError, match="hosts must be a list of Host"):
        Inventory(Host("a", cpus=1))  # was: 'Host' object is not iterable


def test_a_request_that_does_not_fit_says_whether_it_lacks_cores_or_gpus():
    ledger = Ledger(Inventory([Host("a", cpus=2, gpus=1), Host("b", cpus=2, gpus=0)]))
    gpu = Resources(cpus=1, gpus=1)
    held = ledger.allocate(Resources(cpus=2, gpus=0), avoid=("b",))  # a's cores
    assert ledger.allocate(gpu) is None and ledger.short_of_cpus(gpu)  # a's GPU is free
    ledger.release(held)
    ledger.allocate(gpu)
    assert ledger.allocate(gpu) is None and not ledger.short_of_cpus(gpu)  # no GPU free
    assert ledger.short_of_cpus(Resources(cpus=4))  # cores are what a CPU request lacks
    assert not ledger.short_of_cpus(gpu, avoid=("a",))


def test_a_placement_released_would_let_a_request_fit_on_its_host_or_not():
    ledger = Ledger(Inventory([Host("a", cpus=4, gpus=1), Host("b", cpus=4, gpus=0)]))
    one = ledger.allocate(Resources(cpus=1), avoid=("b",))
    three = ledger.allocate(Resources(cpus=3), avoid=("b",))
    trainer = Resources(cpus=2, gpus=1)
    assert ledger.fits_after_release(trainer, three)
    assert not ledger.fits_after_release(trainer, one)  # a single core is not enough
    assert not ledger.fits_after_release(trainer, three, avoid=("a",))
    b = ledger.allocate(Resources(cpus=4), avoid=("a",))
    assert not ledger.fits_after_release(trainer, b)  # b has no GPU
    pinned = Resources(cpus=1, cpu_ids=(three.cpus[0],))
    assert ledger.fits_after_release(pinned, three) and not ledger.fits_after_release(pinned, one)


# -- the free-capacity index against a brute-force reference ---------------------------

class Reference:
    """The ledger's rules by brute force: every host (and every GPU of the ring) looked
    at on every ask. First fit for cores, round-robin over all GPUs for GPU asks."""

    def __init__(self, hosts):
        self.hosts = []
        self.cursor = 0  # a position in the ring of (host, gpu) of every host in order
        for h in hosts:
            self.add(h)

    def add(self, h):
        self.hosts.append({"h": h, "cpus": sorted(h.cpus), "gpus": set(h.gpus), "mem": h.memory})
        self.cursor = 0

    def remove(self, name):
        self.hosts = [s for s in self.hosts if s["h"].name != name]
        self.cursor = 0

    @staticmethod
    def fits(s, req):
        return ((req.cpu_ids is None or set(req.cpu_ids) <= set(s["cpus"]))
                and (req.gpu_ids is None or set(req.gpu_ids) <= s["gpus"])
                and len(s["cpus"]) >= req.cpus and len(s["gpus"]) >= req.gpus
                and s["mem"] >= req.memory)

    @staticmethod
    def named(s, req):
        return ((req.host is None or s["h"].name == req.host)
                and (req.host_id is None or s["h"].id == req.host_id))

    def take(self, s, req, gpus):
        cpus = tuple(req.cpu_ids) if req.cpu_ids is not None else tuple(s["cpus"][:req.cpus])
        if gpus is None:
            gpus = tuple(req.gpu_ids) if req.gpu_ids is not None else tuple(sorted(s["gpus"])[:req.gpus])
        s["cpus"] = [c for c in s["cpus"] if c not in cpus]
        s["gpus"] -= set(gpus)
        s["mem"] -= req.memory
        return (s["h"].name, cpus, gpus)

    def allocate(self, req, avoid=()):
        hosts = [s for s in self.hosts if s["h"].name not in avoid and self.named(s, req)]
        if req.host is None and req.host_id is None and not req.cpu_ids and not req.gpu_ids \
                and req.gpus:
            ring = [(s, g) for s in self.hosts for g in s["h"].gpus]
            for step in range(len(ring)):
                pos = (self.cursor + step) % len(ring)
                s, g = ring[pos]
                if s in hosts and g in s["gpus"] and self.fits(s, req):
                    after = [(k, g2) for k, (s2, g2) in enumerate(ring[pos:] + ring[:pos])
                             if s2 is s and g2 in s["gpus"]][:req.gpus]
                    self.cursor = (pos + after[-1][0] + 1) % len(ring)
                    return self.take(s, req, tuple(g2 for _, g2 in after))
            return None
        for s in hosts:
            if self.fits(s, req):
                return self.take(s, req, None)
        return None

    def allocate_ranks(self, req, avoid=()):
        if req.ranks == 1:
            one = self.allocate(req, avoid)
            return None if one is None else [one]
        saved = [(s, list(s["cpus"]), set(s["gpus"]), s["mem"]) for s in self.hosts]
        hosts = [s for s in self.hosts if self.named(s, req) and s["h"].name not in avoid]
        placed = []
        if req.distribution == "round_robin":
            while len(placed) < req.ranks and any(self.fits(s, req) for s in hosts):
                for s in hosts:
                    if len(placed) < req.ranks and self.fits(s, req):
                        placed.append(self.take(s, req, None))
        else:
            for s in hosts:
                while len(placed) < req.ranks and self.fits(s, req):
                    placed.append(self.take(s, req, None))
        if len(placed) < req.ranks:
            for s, cpus, gpus, mem in saved:
                s["cpus"], s["gpus"], s["mem"] = cpus, gpus, mem
            return None
        return placed

    def release(self, placed):
        for name, cpus, gpus, *mem in placed:
            for s in self.hosts:
                if s["h"].name == name:
                    s["cpus"] = sorted(s["cpus"] + list(cpus))
                    s["gpus"] |= set(gpus)
                    s["mem"] += mem[0] if mem else 0


def _requests(rng, hosts):
    """A random ask: plain shapes mostly, then named hosts, pinned ids, memory, ranks."""
    h = rng.choice(hosts)
    pick = rng.random()
    if pick < 0.35:
        return Resources(cpus=rng.choice([1, 1, 2, 4, 8]))
    if pick < 0.6:
        return Resources(cpus=rng.choice([0, 1, 4]), gpus=rng.choice([1, 1, 2, 4, 8]))
    if pick < 0.68:
        return Resources(cpus=1, gpus=rng.choice([0, 1]), host=h.name)
    if pick < 0.72:
        return Resources(cpus=1, host_id=h.id)
    if pick < 0.78:
        return Resources(cpus=1, cpu_ids=(rng.choice(h.cpus),))
    if pick < 0.82 and h.gpus:
        return Resources(cpus=1, gpus=1, gpu_ids=(rng.choice(h.gpus),))
    if pick < 0.86:
        return Resources(cpus=1, memory=rng.choice([100, 400]))
    return Resources(cpus=rng.choice([1, 2]), gpus=rng.choice([0, 0, 1]),
                     ranks=rng.choice([2, 3, 8, 24]),
                     distribution=rng.choice(["block", "round_robin"]))


def _host(rng, name):
    return Host(name, cpus=rng.choice([1, 2, 4, 8]), gpus=rng.choice([0, 1, 2, 4, 8]),
                memory=1000)


def _shown(placements):
    return [(p.host, p.cpus, p.gpus) for p in placements]


@pytest.mark.parametrize("hosts", [1, 3, 17, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_indexed_ledger_places_as_a_brute_force_scan_does(hosts, seed):
    import random
    rng = random.Random(seed * 1000 + hosts)
    declared = [_host(rng, f"n{i}") for i in range(hosts)]
    lg = Ledger(Inventory(declared))
    ref = Reference(lg.inventory.hosts)
    held = []  # (placements, what the reference gave)
    joined = hosts
    for step in range(1500):
        op = rng.random()
        if op < 0.55:
            req = _requests(rng, lg.inventory.hosts)
            avoid = ()
            if rng.random() < 0.1:
                avoid = {rng.choice(lg.inventory.hosts).name}
            if req.ranks == 1:
                got = lg.allocate(req, avoid=avoid)
                got = None if got is None else [got]
                want = ref.allocate(req, avoid)
                want = None if want is None else [want]
            else:
                got = lg.allocate_ranks(req, avoid)
                want = ref.allocate_ranks(req, avoid)
            assert (got and _shown(got)) == want, (step, req, avoid)
            if got:
                held.append((got, req.memory))
        elif op < 0.93 and held:
            placements, memory = held.pop(rng.randrange(len(held)))
            for p in placements:
                lg.release(p)
            ref.release([(p.host, p.cpus, p.gpus, p.memory) for p in placements])
        elif op < 0.965:
            host = _host(rng, f"n{joined}")
            joined += 1
            lg.add_host(host)
            ref.add(host)
        elif len(lg.inventory.hosts) > 1:
            name = rng.choice(lg.inventory.hosts).name
            lg.remove_host(name)
            ref.remove(name)
    for placements, _ in held:
        for p in placements:
            lg.release(p)
    assert lg.idle()
    assert all(lg.allocate(Resources(cpus=len(h.cpus), gpus=len(h.gpus), host=h.name))
               for h in lg.inventory.hosts)


def test_failing_asks_on_a_full_ledger_take_nothing():
    lg = ledger(*[Host(f"n{i}", cpus=4, gpus=2) for i in range(50)])
    held = [lg.allocate(Resources(cpus=4, gpus=2)) for _ in range(50)]
    assert all(held)
    for req in (Resources(cpus=1), Resources(gpus=1), Resources(cpus=1, ranks=64),
                Resources(cpus=1, host="n7"), Resources(cpus=1, gpu_ids=(0,))):
        assert lg.allocate_ranks(req) is None
    lg.release(held[-1])
    assert lg.allocate_ranks(Resources(cpus=1, ranks=5)) is None  # 4 cores free: none taken
    assert [p.host for p in lg.allocate_ranks(Resources(cpus=1, ranks=4))] == ["n49"] * 4


def test_inventory_totals_follow_hosts_that_join_and_leave():
    inv = Inventory([Host("a", range(4), [0, 1]), Host("b", range(8), [])])
    assert (inv.total_cpus, inv.total_gpus) == (12, 2)
    inv.add(Host("c", range(2), [0, 1, 2, 3]))
    assert (inv.total_cpus, inv.total_gpus) == (14, 6)
    inv.remove("a")
    inv.remove("no such host")
    assert (inv.total_cpus, inv.total_gpus) == (10, 4)
    assert inv.total_cpus == sum(len(h.cpus) for h in inv.hosts)


def test_bad_hosts_and_core_counts_are_refused_naming_what_was_given():
    with pytest.raises(TypeError, match="a host's name must be a non-empty str, got 5"):
        Host(5, cpus=1)
    with pytest.raises(TypeError, match=r"hosts must be Host\(name, cpus=\.\.\., gpus=\.\.\.\) "
                                        r"objects, got 'a'"):
        Inventory(["a"])
    with pytest.raises(ValueError, match=r"cpus must be a count >= 0 or a list of ids >= 0, "
                                         r"got -1"):
        detect_host(cpus=-1)  # LocalBackend(cpus=-1): the -1 it was given, not "[]"


def test_host_ids_given_and_left_out_never_collide_and_duplicates_are_refused():
    """A host left without an id got its index: 1, the id given to the one before, and
    a node pinned to host_id=1 then stalled ("please report this")."""
    a, b = Host("a", cpus=2, id=1), Host("b", cpus=8)
    inventory = Inventory([a, b])
    assert (a.id, b.id) == (1, 0)
    p = Ledger(inventory).allocate(Resources(cpus=4, host_id=0))
    assert p is not None and p.host == "b"
    with pytest.raises(ValueError, match="host ids must be unique, got \\[3, 3\\]"):
        Inventory([Host("c", cpus=1, id=3), Host("d", cpus=1, id=3)])
    with pytest.raises(ValueError, match="host ids must be unique: 1 .'e'. is already here"):
        inventory.add(Host("e", cpus=1, id=1))



def test_a_placement_on_a_host_that_left_and_came_back_is_not_given_back_to_its_new_coming():
    """A Dask worker that leaves and rejoins under its address is a new host: releasing
    what its first coming held put core 0 back while a new node held it (two nodes on
    one core), or twice into its free list."""
    ledger = Ledger(Inventory([Host("w", cpus=2, gpus=1)]))
    old = ledger.allocate(Resources(cpus=1, gpus=1))
    ledger.remove_host("w")
    ledger.add_host(Host("w", cpus=2, gpus=1))
    new = ledger.allocate(Resources(cpus=1, gpus=1))
    assert new.cpus == old.cpus and new.gpus == old.gpus
    assert ledger.holds(new) and not ledger.holds(old)  # a lease on old is closed, not used
    assert not ledger.fits_after_release(Resources(cpus=2, gpus=1), old)
    ledger.release(old)  # a late release of the first coming's placement: nothing
    assert ledger.allocate(Resources(cpus=1, gpus=1)) is None  # its GPU is still held
    other = ledger.allocate(Resources(cpus=1))
    assert other.cpus != new.cpus and ledger.allocate(Resources(cpus=1)) is None
    ledger.release(new)
    ledger.release(other)
    assert ledger.idle()
    stale = ledger.allocate(Resources(cpus=2))
    ledger.reset()  # every process killed: what they held is free at once
    ledger.release(stale)
    assert ledger.allocate(Resources(cpus=2)) is not None
    assert ledger.allocate(Resources(cpus=1)) is None  # not four cores of two
