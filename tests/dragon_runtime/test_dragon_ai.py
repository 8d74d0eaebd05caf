"""AI nodes on the Dragon backend: the inference server is a Dragon process placed by
the ledger (tests/backends/test_dragon.py runs this under the real launcher)."""
import os
import re
import threading

import pytest

import rhapsody_graph as rhapsody

from ..ai.test_nodes import killer, serving

pytestmark = pytest.mark.timeout(180)


def keeper_of(server: int) -> int:
    """The pid of the server's parent, which must be a service host (the keeper that
    Dragon placed): found by ancestry, so another run's service hosts never count."""
    with open(f"/proc/{server}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{parent}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"rhapsody_graph.backends.service_host" in argv, f"the server's parent is {argv}"
    return parent


def watch_server(backend, model: str) -> dict:
    """Once ``model``'s server answers, note its pid, placement, cores and environment."""
    seen: dict = {}

    def watch():
        service = serving(backend, model)
        pid = service.server.pid
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        seen.update(pid=pid, placement=service.placement, url=service.client.base_url,
                    cores=os.sched_getaffinity(pid), cuda=env.get(b"CUDA_VISIBLE_DEVICES"),
                    keeper=keeper_of(pid))

    seen["thread"] = threading.Thread(target=watch)
    seen["thread"].start()
    return seen


def test_a_compute_node_feeds_an_ai_node_that_feeds_a_placed_node(dragon_backend):
    rhapsody.model("smollm2-dragon", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)
    country = rhapsody.task(lambda: "France")()
    answer = rhapsody.ai("What is the capital of {}? Answer in one word.", country,
                         model="smollm2-dragon", temperature=0, max_tokens=16)
    shout = rhapsody.task(str.upper).options(cpus=1)
    text, loud = rhapsody.compute(answer, shout(answer), backend=dragon_backend)
    assert "Paris" in text and "PARIS" in loud


def test_the_server_runs_on_its_services_cores_and_gpu_and_is_gone_after_compute(dragon_backend):
    rhapsody.model("smollm2-gpu", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1,
                   gpus=1)
    seen = watch_server(dragon_backend, "smollm2-gpu")
    answers = rhapsody.ai([f"Name the capital of {c}. One word." for c in ("France", "Italy")] * 4,
                          model="smollm2-gpu", temperature=0, max_tokens=16)
    assert "Paris" in answers.compute(backend=dragon_backend)[0]
    seen["thread"].join()
    placement = seen["placement"]
    assert placement.host == dragon_backend.inventory.hosts[0].name
    assert seen["cores"] == set(placement.cpus) and len(placement.cpus) == 1
    assert seen["cuda"] == str(placement.gpus[0]).encode() and len(placement.gpus) == 1
    assert seen["url"].startswith("http://127.0.0.1:")  # the driver's host: loopback
    assert not os.path.exists(f"/proc/{seen['pid']}"), "the server outlived compute()"
    assert not os.path.exists(f"/proc/{seen['keeper']}"), "the service host outlived compute()"
    assert dragon_backend.ledger.idle(), "the service kept its cores or GPU"


def test_a_killed_server_fails_its_nodes_with_its_log_and_leaves_no_process(dragon_backend):
    rhapsody.model("smollm2-doomed", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)
    seen = watch_server(dragon_backend, "smollm2-doomed")
    thread = killer(dragon_backend, "smollm2-doomed")
    stories = [rhapsody.ai(f"Write a long story about knight number {i}.", model="smollm2-doomed",
                           temperature=0, max_tokens=256) for i in range(4)]
    with pytest.raises(RuntimeError, match=r"smollm2-doomed.*died.*last lines of \S+:/") as info:
        rhapsody.compute(*stories, backend=dragon_backend)
    os.unlink(re.search(r"last lines of \S+?:(/\S+):", str(info.value))[1])  # kept: remove it
    thread.join()
    seen["thread"].join()
    assert not os.path.exists(f"/proc/{seen['pid']}")
    assert not os.path.exists(f"/proc/{seen['keeper']}"), "the service host outlived compute()"
