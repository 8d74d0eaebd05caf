"""InferenceBackend: AI nodes served beside compute backends in one session, routed by
name or by the models each serves, their servers placed from the ledger they were
given (real llama.cpp server with SmolLM2, real worker processes)."""
import os
import time

import pytest

import rhapsody_graph as rhapsody

from ..conftest import child_pids

pytestmark = pytest.mark.timeout(180)


def country():
    return "France"


def shout(text):
    return text.upper()


@pytest.fixture(scope="module")
def smollm2():
    return rhapsody.model("smollm2-llm", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)


def capital_of(upstream, **options):
    return rhapsody.ai("What is the capital of {}? Answer in one word.", upstream,
                       model="smollm2-llm", temperature=0, max_tokens=16, **options)


def test_a_named_inference_backend_serves_ai_nodes_between_compute_nodes(smollm2):
    before = child_pids()
    cpu = rhapsody.LocalBackend(cpus=2, name="cpu")
    llm = rhapsody.InferenceBackend(name="llm", models=[smollm2], on=cpu)
    with rhapsody.Session(backends=[cpu, llm]) as s:
        answer = capital_of(rhapsody.task(country)(), backend="llm")
        loud = s.submit(rhapsody.task(shout)(answer))
        assert "PARIS" in loud.result(timeout=150)
        assert loud.where.backend == "cpu"
        again = s.submit(capital_of("Italy"))  # implicit: the backend serving the model
        assert "Rome" in again.result(timeout=150) and again.where.backend == "llm"
        assert again.where.host == cpu.inventory.hosts[0].name
        s.wait()  # idle: the server is stopped and its core is back in cpu's ledger
        assert cpu.ledger.idle() and not llm.services.running
    assert not child_pids() - before


def test_a_model_no_inference_backend_serves_is_refused_before_anything_runs(smollm2, tmp_path):
    other = rhapsody.model("other-llm", engine="llama_cpp", path=rhapsody.smollm2_path())
    cpu = rhapsody.LocalBackend(cpus=1, name="cpu")
    llm = rhapsody.InferenceBackend(name="llm", models=[smollm2], on=cpu)
    marker = tmp_path / "ran"
    early = rhapsody.executable(["touch", str(marker)])
    with rhapsody.Session(backends=[cpu, llm]) as s:
        with pytest.raises(ValueError, match="backend 'llm' does not serve model 'other-llm' "
                                             r"\(it serves: smollm2-llm\)"):
            s.submit(rhapsody.ai("{}", early, model=other.name))
        with pytest.raises(rhapsody.NoBackendError, match="asks for backend 'llm'"):
            s.submit(rhapsody.ai("{}", early, model=other.name, backend="llm"))
        with pytest.raises(ValueError, match="unknown model 'never-declared'"):
            s.submit(rhapsody.ai("{}", early, model="never-declared"))  # was: not served
    assert not marker.exists()


def test_an_inference_backend_placed_on_a_backend_outside_the_session_is_refused(smollm2):
    cpu = rhapsody.LocalBackend(cpus=1, name="cpu")
    with pytest.raises(ValueError, match="placed on backend 'cpu', which is not in this session"):
        rhapsody.Session(backends=[rhapsody.InferenceBackend(on=cpu)])
    cpu.shutdown()


def test_bad_inference_backend_arguments_are_refused_where_written(smollm2):
    with pytest.raises(TypeError, match="models= takes declared models"):
        rhapsody.InferenceBackend(models=["smollm2-llm"])
    with pytest.raises(TypeError, match="not both"):
        rhapsody.InferenceBackend(on=object(), cpus=2)


def wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return path


def test_an_inference_backend_with_its_own_inventory_places_its_server_there(smollm2, tmp_path):
    llm = rhapsody.InferenceBackend(name="llm", cpus=1)
    cpu = rhapsody.LocalBackend(cpus=1, name="cpu")
    go = tmp_path / "go"
    with rhapsody.Session(backends=[cpu, llm]) as s:
        held = s.submit(rhapsody.task(wait_for)(str(go)))  # keeps the session busy
        fut = s.submit(capital_of("Spain"))
        assert "Madrid" in fut.result(timeout=150) and fut.where.backend == "llm"
        service = llm.services.running["smollm2-llm"]
        assert service.placement.cpus == (0,) and not llm.ledger.idle()
        # cpu's one core is the held node's: the server's core came from llm's own inventory
        go.touch()
        assert held.result(timeout=60) == str(go)
        s.wait()
        assert llm.ledger.idle() and cpu.ledger.idle()


def test_a_stream_of_ai_futures_keeps_its_server_between_submissions(smollm2):
    """A session that catches up with its submissions (the adaptive loop of issue 10:
    submit, take the result, submit again) keeps its server warm; wait() rests it."""
    cpu = rhapsody.LocalBackend(cpus=2, name="cpu")
    llm = rhapsody.InferenceBackend(name="llm", models=[smollm2], on=cpu)
    with rhapsody.Session(backends=[cpu, llm]) as s:
        assert "Paris" in s.submit(capital_of("France")).result(timeout=150)
        server = llm.services.running["smollm2-llm"]
        assert "Rome" in s.submit(capital_of("Italy")).result(timeout=150)
        assert llm.services.running["smollm2-llm"] is server
        s.wait()
        assert not llm.services.running and cpu.ledger.idle()
