"""The seed's placement vocabulary on the real Dragon runtime: what the Policy and the
process carry for each option, with the ledger doing the accounting."""
import os

import pytest
from dragon.infrastructure.policy import Policy

import rhapsody_graph as rhapsody

from .test_dragon_backend import seen

pytestmark = pytest.mark.timeout(120)


def test_explicit_cpu_and_gpu_affinity_are_reserved_and_applied(dragon_backend):
    host = dragon_backend.inventory.hosts[0]
    node = rhapsody.task(seen).options(cpu_affinity=[host.cpus[-1]], gpu_affinity=[3, 2])()
    v = rhapsody.compute(node, backend=dragon_backend)[0]
    assert v["placement"].cpus == (host.cpus[-1],) and v["placement"].gpus == (3, 2)
    assert v["affinity"] == [host.cpus[-1]] and v["cuda"] == "3,2"
    policy = dragon_backend.policy(node, v["placement"])
    assert policy.placement == Policy.Placement.HOST_NAME
    assert (policy.cpu_affinity, policy.gpu_affinity) == ([host.cpus[-1]], [3, 2])


def test_host_name_and_host_id_pin_the_node_to_that_host(dragon_backend):
    host = dragon_backend.inventory.hosts[0]
    by_name = rhapsody.task(seen).options(host=host.name)()
    by_id = rhapsody.task(seen).options(host_id=host.id)()
    a, b = rhapsody.compute(by_name, by_id, backend=dragon_backend)
    assert a["placement"].host == b["placement"].host == host.name
    policy = dragon_backend.policy(by_id, b["placement"])
    assert (policy.placement, policy.host_id) == (Policy.Placement.HOST_ID, host.id)


def test_default_and_anywhere_let_dragon_choose_and_do_not_pin(dragon_backend):
    anywhere = rhapsody.task(seen).options(placement="anywhere")()
    bare = rhapsody.task(seen)()
    a, d = rhapsody.compute(anywhere, bare, backend=dragon_backend)
    all_cores = sorted(dragon_backend.inventory.hosts[0].cpus)
    assert a["affinity"] == d["affinity"] == all_cores
    assert dragon_backend.policy(anywhere, a["placement"]).placement == Policy.Placement.ANYWHERE


def test_raw_policy_and_process_template_pass_through(dragon_backend, tmp_path):
    host = dragon_backend.inventory.hosts[0]
    raw = Policy(placement=Policy.Placement.HOST_NAME, host_name=host.name,
                 cpu_affinity=[host.cpus[0]])

    def where():
        return os.getcwd(), os.environ.get("STAGE"), sorted(os.sched_getaffinity(0)), \
            rhapsody.current_placement().cpus

    node = rhapsody.task(where).options(
        policy=raw, process_template={"cwd": str(tmp_path), "env": {"STAGE": "two"}})()
    cwd, stage, affinity, cpus = rhapsody.compute(node, backend=dragon_backend)[0]
    assert (cwd, stage) == (str(tmp_path), "two")
    assert affinity == [host.cpus[0]] and cpus == (host.cpus[0],)  # the ledger took that core
    assert dragon_backend.policy(node, None) is raw


def test_process_templates_give_each_group_of_ranks_its_own_arguments(dragon_backend):
    def role():
        return os.environ["RANK"], os.environ["ROLE"]

    groups = [(1, {"env": {"ROLE": "leader"}}), (1, {"env": {"ROLE": "follower"}})]
    node = rhapsody.task(role).options(process_templates=groups, distribution="ROUNDROBIN")()
    assert rhapsody.compute(node, backend=dragon_backend)[0] == [("0", "leader"), ("1", "follower")]


def test_each_group_of_ranks_runs_on_the_cores_its_own_policy_pins(dragon_backend):
    host = dragon_backend.inventory.hosts[0]
    first, last = host.cpus[0], host.cpus[-1]

    def where():
        p = rhapsody.current_placement()
        print("rank", os.environ["RANK"], "on", sorted(os.sched_getaffinity(0)))
        return os.environ["ROLE"], sorted(os.sched_getaffinity(0)), p.cpus

    def group(role, core):
        policy = Policy(placement=Policy.Placement.HOST_NAME, host_name=host.name,
                        cpu_affinity=[core])
        return (1, {"policy": policy, "env": {"ROLE": role}})

    node = rhapsody.task(where).options(process_templates=[group("a", first), group("b", last)])()
    fut = rhapsody.submit(node, backend=dragon_backend)
    assert fut.result(timeout=100) == [("a", [first], (first,)), ("b", [last], (last,))]
    assert fut.where.stdout == f"rank 0 on [{first}]\nrank 1 on [{last}]\n"
    assert dragon_backend.ledger.idle()


def test_the_ranks_of_a_group_share_the_cores_their_policy_pins(dragon_backend):
    host = dragon_backend.inventory.hosts[0]
    pinned = Policy(placement=Policy.Placement.HOST_NAME, host_name=host.name,
                    cpu_affinity=[host.cpus[0]])
    node = rhapsody.task(seen).options(process_templates=[(2, {"policy": pinned})])()
    ranks = rhapsody.compute(node, backend=dragon_backend)[0]
    assert [r["affinity"] for r in ranks] == [[host.cpus[0]]] * 2
    assert [r["placement"].cpus for r in ranks] == [(host.cpus[0],)] * 2
    assert dragon_backend.ledger.idle()


def test_a_job_of_more_ranks_than_batch_starts_is_refused_before_anything_runs(dragon_backend):
    cores = sum(len(h.cpus) for h in dragon_backend.inventory.hosts)
    shared = Policy(cpu_affinity=[dragon_backend.inventory.hosts[0].cpus[0]])
    node = rhapsody.task(seen).options(process_templates=[(cores + 1, {"policy": shared})])()
    with pytest.raises(ValueError, match=rf"{cores + 1} ranks.*at most one rank per core"):
        rhapsody.submit(node, backend=dragon_backend)
    assert dragon_backend.ledger.idle()


def test_a_template_that_cannot_start_is_refused_before_anything_runs_and_the_backend_goes_on(
        dragon_backend, tmp_path):
    """A missing cwd (or a stream or options of the wrong type) made a Batch call that
    never started: after its start timeout, every later node failed the same way."""
    missing = rhapsody.task(seen).options(process_template={"cwd": str(tmp_path / "gone")})()
    with pytest.raises(ValueError, match="process template's cwd .*gone' is not a directory"):
        rhapsody.compute(missing, backend=dragon_backend)
    for bad, text in [({"stdout": 42.0}, "stdout must be one of Dragon's Popen constants"),
                      ({"options": 42}, "options must be a Dragon ProcessOptions")]:
        with pytest.raises(TypeError, match=text):
            rhapsody.task(seen).options(process_template=bad)
    assert rhapsody.compute(rhapsody.task(seen).options(cpus=1)(), backend=dragon_backend)
    assert dragon_backend.ledger.idle()


def test_hosts_the_allocation_does_not_have_and_a_bad_start_timeout_are_refused(dragon_backend):
    with pytest.raises(ValueError, match="host 'bogus' is not a host of this Dragon allocation"):
        rhapsody.DragonBackend(hosts=[rhapsody.Host("bogus", [0, 1])], name="bogus")
    with pytest.raises(ValueError, match="start_timeout must be a finite number of seconds > 0"):
        rhapsody.DragonBackend(start_timeout=0, name="instant")
    declared = dragon_backend.inventory.hosts[0]
    mine = rhapsody.DragonBackend(hosts=[rhapsody.Host(declared.name, declared.cpus[:1])],
                                  name="declared")
    try:
        assert mine.inventory.hosts[0].id == declared.id  # Dragon's id for its name
    finally:
        mine.shutdown()
