"""AI nodes against a real llama.cpp server with the packaged SmolLM2 model (no fakes)."""
import os
import re
import threading
import time
import traceback

import pytest

import rhapsody_graph as rhapsody

from ..conftest import child_pids
from ..test_scheduler import still_alive


def remove_kept_logs(error: BaseException) -> None:
    """The server logs a failure message points at exist (they are kept for the user to
    read); a test removes them once checked, so runs leave nothing in the temp folder."""
    logs = set(re.findall(r"last lines of (\S+):", str(error)))
    assert logs and all(os.path.isfile(log) for log in logs), (logs, str(error))
    for log in logs:
        os.unlink(log)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def backend():
    rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)
    with rhapsody.LocalBackend(cpus=2) as b:
        yield b


@rhapsody.task
def country():
    return "France"


@rhapsody.task
def shout(answer):
    return answer.upper()


def test_compute_node_feeds_an_ai_node_that_feeds_a_compute_node(backend):
    answer = rhapsody.ai("What is the capital of {}? Answer in one word.", country(),
                         model="smollm2", temperature=0, max_tokens=16)
    upper = shout(answer)
    text, loud = rhapsody.compute(answer, upper, backend=backend)
    assert "Paris" in text and "PARIS" in loud


def test_fan_out_of_sixteen_prompts_returns_sixteen_answers_in_order(backend):
    cities = ["France", "Italy", "Spain", "Germany"] * 4
    node = rhapsody.ai([f"Name the capital of {c}. One word." for c in cities],
                       model="smollm2", temperature=0, max_tokens=8)
    answers = node.compute(backend=backend)
    assert len(answers) == 16 and all(isinstance(a, str) and a for a in answers)
    assert answers[0] == answers[4] == answers[8]  # greedy: same prompt, same answer


def test_chat_with_system_and_plain_completion_both_work(backend):
    chat = rhapsody.ai("What is the capital of France?", model="smollm2", temperature=0,
                       max_tokens=16, system="Answer in one word.")
    plain = rhapsody.ai("The capital of France is", model="smollm2", chat=False,
                        temperature=0, max_tokens=4)
    c, p = rhapsody.compute(chat, plain, backend=backend)
    assert "Paris" in c and "Paris" in p


def test_per_node_max_tokens_is_honoured(backend):
    text = "Write a long story about a dragon."
    short = rhapsody.ai(text, model="smollm2", temperature=0, max_tokens=2)
    long = rhapsody.ai(text, model="smollm2", temperature=0, max_tokens=32)
    s, l = rhapsody.compute(short, long, backend=backend)
    assert len(s.split()) <= 2 < len(l.split())


def test_prompt_decorator_builds_the_prompt_from_values_and_parse_shapes_the_value(backend):
    @rhapsody.prompt(model="smollm2", temperature=0, max_tokens=8, parse=str.strip)
    def capital(name):
        return f"What is the capital of {name}? Answer in one word."

    assert "Paris" in capital(country()).compute(backend=backend)
    nodes = rhapsody.map(capital, ["Italy"])  # used to make function nodes that failed
    assert [n.kind for n in nodes] == ["ai"] and "Rome" in rhapsody.compute(nodes)[0][0]
    with pytest.raises(TypeError, match="@prompt function"):
        rhapsody.task(capital)
    with pytest.raises(TypeError, match="options are set by @prompt"):
        rhapsody.map(capital, ["Italy"], gpus="all")


def test_unknown_model_fails_before_anything_runs(backend, tmp_path):
    marker = tmp_path / "ran"
    early = rhapsody.executable(["touch", str(marker)])
    node = rhapsody.ai("{}", early, model="no-such-model")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*declare it"):
        node.compute(backend=backend)
    assert not marker.exists()


def test_missing_weights_fail_before_anything_runs(backend, tmp_path):
    rhapsody.model("ghost", engine="llama_cpp", path=str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="weights of model 'ghost'"):
        rhapsody.ai("hi", model="ghost").compute(backend=backend)


def test_a_hub_id_for_path_is_refused_saying_to_download_it_first(backend):
    rhapsody.model("hub", engine="llama_cpp", path="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face hub id: download it "
                                                "first .*huggingface-cli download"):
        rhapsody.ai("hi", model="hub").compute(backend=backend)


def services(backend):
    """The inference services of the session that computes on ``backend`` (its implicit
    :class:`InferenceBackend`, placed on ``backend``)."""
    return rhapsody.api.get_session(backend).backends["inference"].services


def serving(backend, model: str, seconds: float = 120):
    """``model``'s service once its server answers (None if not within ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        service = services(backend).running.get(model)
        if service is not None and service.client is not None:
            return service
        time.sleep(0.02)
    return None


def killer(backend, model: str, seconds: float = 120) -> threading.Thread:
    """A started thread that kills ``model``'s server once it serves requests."""
    def kill_when_serving():
        service = serving(backend, model, seconds)
        if service is not None:
            time.sleep(0.5)  # requests in flight
            os.killpg(service.server.pid, 9)

    thread = threading.Thread(target=kill_when_serving)
    thread.start()
    return thread


def test_server_killed_mid_run_fails_the_node_with_its_log_and_leaves_no_process(backend):
    before = child_pids()
    fan_out = rhapsody.ai(["Write a long story about dragon number %d." % i for i in range(8)],
                          model="smollm2", temperature=0, max_tokens=256)
    singles = [rhapsody.ai(f"Write a long story about knight number {i}.", model="smollm2",
                           temperature=0, max_tokens=256) for i in range(8)]
    thread = killer(backend, "smollm2")
    with pytest.raises(RuntimeError, match="smollm2.*died.*last lines of") as info:
        rhapsody.compute(fan_out, *singles, backend=backend)
    thread.join()
    remove_kept_logs(info.value)
    assert not child_pids() - before



def test_a_server_that_died_between_nodes_is_started_anew_for_the_next_with_a_warning(
        backend):
    """In a session kept busy, every later node failed with "died while serving this
    node": the dead service stayed until the run ended."""
    before = child_pids()
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)], progress=False) as s:
        busy = s.submit(rhapsody.task(time.sleep)(120))  # the run goes on throughout
        assert s.submit(rhapsody.ai("Say hi.", model="smollm2", max_tokens=3)).result(240)
        service = s.backends["inference"].services.running["smollm2"]
        os.killpg(service.server.pid, 9)
        assert service.server.wait(30) is not None
        with pytest.warns(RuntimeWarning, match="smollm2' died; a new one starts") as caught:
            later = s.submit(rhapsody.ai("Say hi.", model="smollm2", max_tokens=3))
            assert isinstance(later.result(timeout=240), str)
        assert s.backends["inference"].services.running["smollm2"] is not service
        busy.cancel()
    remove_kept_logs(caught[0].message)
    assert not child_pids() - before

def test_only_vllm_or_a_url_model_declared_with_lists_gets_one_list_request():
    assert rhapsody.model("v", engine="vllm", path="x").takes_lists
    assert not rhapsody.model("l", engine="llama_cpp", path="x").takes_lists
    assert not rhapsody.model("u", url="http://127.0.0.1:1/v1").takes_lists
    assert rhapsody.model("u", url="http://127.0.0.1:1/v1", lists=True).takes_lists


@pytest.mark.parametrize("kwargs, text", [
    ({"engine": "llama_cpp"}, "needs path="),
    ({"engine": "torch", "path": "x"}, "engine must be one of"),
    ({"url": "http://127.0.0.1:1/v1", "path": "x"}, "not both"),
    ({"url": "http://127.0.0.1:1/v1", "concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"url": "http://127.0.0.1:1/v1", "timeout": 0},
     "timeout must be a finite number of seconds > 0"),
    ({"url": "http://127.0.0.1:1/v1", "timeout": float("inf")},
     "timeout must be a finite number of seconds > 0, got inf"),
    ({"url": "http://127.0.0.1:1/v1", "gpus": 1}, "gpus= apply to a server this project starts"),
    ({"url": "http://127.0.0.1:1/v1", "cpus": 4, "args": ["-v"]},
     "cpus, args= apply to a server this project starts"),
    ({"url": "http://"}, "url= must be an http:// or https:// address"),
    ({"engine": "llama_cpp", "path": 123}, "path= must be a file or directory path"),
    ({"url": "http://127.0.0.1:1/v1", "host": "n1"}, "host= must be a host name.*not with url="),
    ({"engine": "llama_cpp", "path": "x", "host": 3}, "host= must be a host name"),
    ({"url": "http://127.0.0.1:1/v1", "lists": "yes"}, "lists= must be True or False"),
    ({"engine": "llama_cpp", "path": "x", "args": "--verbose"},
     "args= must be a list of strings .*got '--verbose'"),
    ({"url": ""}, "url= must be an http:// or https:// address"),
    ({"url": "ftp://x/v1"}, "url= must be an http:// or https:// address"),
    ({"url": 5}, "url= must be an http:// or https:// address"),
    ({"url": "http://127.0.0.1:1/v1", "api_key": 3}, "api_key= must be a non-empty string"),
])
def test_bad_model_declarations_are_refused(kwargs, text):
    with pytest.raises(ValueError, match=text):
        rhapsody.model("bad", **kwargs)


def test_bad_ai_node_arguments_are_refused_where_written():
    with pytest.raises(TypeError, match="unknown sampling option"):
        rhapsody.ai("hi", model="smollm2", temprature=0)
    with pytest.raises(TypeError, match="prompt must be a template string"):
        rhapsody.ai(42, model="smollm2")
    with pytest.raises(ValueError, match="system= needs a chat request"):
        rhapsody.ai("hi", model="smollm2", system="be brief", chat=False)
    for template, text in [("Capital of {country}?", "names {country}"),
                           ("{} and {}", "placeholder for input 1, but 1 input"),
                           (["{0}", "{1[0]}"], "placeholder for input 1"),
                           ("a } b", "is not a format string"),
                           ("Say {0!x}", "unknown conversion !x"),
                           ("{} and {0}", "mixes {} and numbered placeholders"),
                           ("{:{}}", "placeholder for input 1, but 1 input"),
                           ("{0:>{1}}", "placeholder for input 1, but 1 input")]:
        with pytest.raises(ValueError, match=text):  # not at run time, after upstream ran
            rhapsody.ai(template, country(), model="smollm2")
    with pytest.raises(TypeError, match="chat= must be True or False, got 0"):
        rhapsody.ai("hi", model="smollm2", system="be brief", chat=0)  # dropped system=
    with pytest.raises(TypeError, match="system= must be a string, got 123"):
        rhapsody.ai("hi", model="smollm2", system=123)

    @rhapsody.prompt(model="smollm2")
    def one(x):
        return f"about {x}"
    for inputs in [(country(), country()), ()]:  # not at run time, after upstream ran
        with pytest.raises(TypeError, match=r"ai node 'one': .*argument.*\(x\)"):
            one(*inputs)
    assert rhapsody.ai("{0} {0!r:>9} {0[0]} {{literal}}", "x", model="smollm2").kind == "ai"
    assert rhapsody.ai("{0:>{1}}", "x", 9, model="smollm2").kind == "ai"  # a nested width



@pytest.mark.parametrize("sampling, text", [
    ({"temperature": float("nan")}, "temperature= must be a finite number >= 0, got nan"),
    ({"temperature": "hot"}, "temperature= must be a finite number >= 0, got 'hot'"),
    ({"max_tokens": -5}, "max_tokens= must be an integer >= -1 .*got -5"),
    ({"top_k": -2}, "top_k= must be an integer >= -1 .*got -2"),
    ({"top_p": 1.5}, "top_p= must be a number from 0 to 1"),
    ({"stop": 3}, "stop= must be a string or a list of strings, got 3"),
    ({"seed": True}, "seed= must be an integer, got True"),
])
def test_sampling_values_a_server_would_refuse_are_refused_where_the_node_is_declared(
        sampling, text):
    # were accepted, failing only at run time, after the upstream nodes had run
    with pytest.raises(ValueError, match=text):
        rhapsody.ai("hi {}", country(), model="smollm2", **sampling)
    with pytest.raises(ValueError, match=text):
        rhapsody.prompt(model="smollm2", **sampling)


def test_sampling_values_the_servers_take_for_no_limit_are_accepted():
    # llama.cpp's server takes max_tokens 0 or -1 (no limit), vLLM top_k -1 (every token)
    for sampling in ({"max_tokens": 0}, {"max_tokens": -1}, {"top_k": -1}):
        assert rhapsody.ai("hi", model="smollm2", **sampling).kind == "ai"


def test_prompt_without_a_model_or_on_a_non_function_says_how_to_write_it():
    with pytest.raises(TypeError, match=r'@prompt needs the model to ask: @prompt\(model="name"\)'):
        @rhapsody.prompt
        def plan(x):
            return f"hi {x}"
    with pytest.raises(TypeError, match="decorates a function that builds the prompt, got 's'"):
        rhapsody.prompt(model="smollm2")("s")
    with pytest.raises(TypeError, match="unknown sampling option"):  # before a function
        rhapsody.prompt(model="smollm2", temprature=1)
    with pytest.raises(ValueError, match="option 'name' must not be empty"):
        rhapsody.ai("hi", model="smollm2", name="")


def test_a_running_endpoint_declared_by_url_is_used_as_is(backend):
    from rhapsody_graph.ai.service import Service
    server = Service(lookup_model("smollm2"))
    try:
        client = server.start()
        rhapsody.model("remote-smollm2", url=client.base_url)
        answer = rhapsody.ai("What is the capital of France? Answer in one word.",
                             model="remote-smollm2", temperature=0, max_tokens=8)
        assert "Paris" in answer.compute(backend=backend)
        assert not server.died()  # ours to stop, not the run's
    finally:
        server.stop()


def lookup_model(name):
    from rhapsody_graph.ai.models import lookup
    return lookup(name, "test")


@rhapsody.task
def number(i):
    return i


def test_inputs_nested_in_containers_reach_the_prompt_as_values(backend):
    @rhapsody.prompt(model="smollm2", temperature=0, max_tokens=4)
    def total(parts):
        assert parts == [1, 2, 3], parts  # values, not nodes
        return f"What is {' + '.join(map(str, parts))}? Answer with a number."

    assert isinstance(total([number(1), number(2), number(3)]).compute(backend=backend), str)


def test_an_ai_node_waits_for_the_cores_its_service_needs_while_other_nodes_hold_them(backend):
    rhapsody.model("wide", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=2)
    hog = rhapsody.executable(["sleep", "3"], cpus=1)  # holds one of the two cores
    answer = rhapsody.ai("What is the capital of {}? Answer in one word.", country(),
                         model="wide", temperature=0, max_tokens=8)
    start = time.monotonic()
    done, text = rhapsody.compute(hog, answer, backend=backend)  # before: "held by running nodes"
    assert done.returncode == 0 and "Paris" in text
    assert time.monotonic() - start >= 3  # the service started once the hog was done
    everything = backend.ledger.allocate(rhapsody.Resources(cpus=2))
    assert everything is not None  # the service's cores were given back
    backend.ledger.release(everything)


def test_an_idle_service_gives_its_cores_to_a_service_a_ready_node_waits_for(backend):
    rhapsody.model("wide", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=2)
    rhapsody.model("narrow", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)
    first = rhapsody.ai("Capital of {}? One word.", "France", model="wide", max_tokens=4)
    second = rhapsody.ai("Capital of Italy? One word. {}", first, model="narrow", max_tokens=4)
    third = rhapsody.ai("Capital of Spain? One word. {}", second, model="wide", max_tokens=4)
    answers = rhapsody.compute(first, second, third, backend=backend)  # before: a stall
    assert all(isinstance(a, str) and a for a in answers)


def test_an_idle_service_gives_its_cores_to_a_plain_node_after_its_ai_node():
    """The ready node is the compute backend's own, not the inference backend's: the
    run used to fail as a stall with the service holding the only core."""
    rhapsody.model("one_core", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1)
    answer = rhapsody.ai("Say hi", model="one_core", max_tokens=4, temperature=0)
    with rhapsody.LocalBackend(cpus=1) as b:
        text, = rhapsody.compute(rhapsody.task(cpus=1)(str.upper)(answer), backend=b)
        assert text and text == text.upper()
        assert b.ledger.idle()


def test_a_timed_out_ai_node_stops_waiting_for_its_request(backend):
    story = rhapsody.ai("Write a very long story about a dragon.", model="smollm2",
                        max_tokens=2048, timeout=2, name="story")
    seen = {}

    def watch():  # the story's launch thread, while another node keeps the run going
        time.sleep(5)
        seen["threads"] = [t.name for t in threading.enumerate()]

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(rhapsody.NodeTimeoutError, match="story"):
        rhapsody.compute(story, rhapsody.executable(["sleep", "7"]), backend=backend,
                         fail_fast=False)
    watcher.join()
    assert not [n for n in seen["threads"] if "story" in n], seen["threads"]


def test_a_service_must_fit_on_the_host_its_model_names_before_anything_runs(tmp_path):
    rhapsody.model("big", engine="llama_cpp", path=rhapsody.smollm2_path(), gpus=2, host="here")
    marker = tmp_path / "ran"
    hosts = [rhapsody.Host("here", cpus=2, gpus=0), rhapsody.Host("there", cpus=2, gpus=4)]
    with rhapsody.LocalBackend(hosts=hosts) as backend:
        node = rhapsody.ai("{}", rhapsody.executable(["touch", str(marker)]), model="big")
        with pytest.raises(rhapsody.UnsatisfiableError, match="model 'big'.*on host='here'"):
            node.compute(backend=backend)
    assert not marker.exists()


def test_ai_example_mixes_cpu_gpu_and_ai_nodes():
    import pathlib
    import subprocess
    import sys
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "ai_workflow.py"
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                         timeout=240, check=True).stdout
    assert "train ran on GPU 0" in out and "advice:" in out and "labels: [" in out


def test_prompt_function_returning_no_text_or_raising_fails_before_its_server_starts(backend):
    # a server that cannot start: were it started first, its failure would be reported
    # (after its start-up; minutes with vLLM) instead of the prompt function's own error
    rhapsody.model("unstartable", engine="llama_cpp", path=rhapsody.smollm2_path(),
                   args=["--no-such-flag"])

    @rhapsody.prompt(model="unstartable", max_tokens=4)
    def empty(x):
        return []

    @rhapsody.prompt(model="unstartable", max_tokens=4)
    def buggy(x):
        return {}[x]

    with pytest.raises(TypeError, match="non-empty list of strings, got \\[\\]"):
        empty(1).compute(backend=backend)
    with pytest.raises(KeyError, match="'word'") as info:
        buggy("word").compute(backend=backend)
    assert "return {}[x]" in "".join(traceback.format_exception(info.value))


def test_ctrl_c_during_an_ai_node_kills_its_inference_server(tmp_path):
    import signal
    import subprocess
    import sys
    script = tmp_path / "driver.py"
    script.write_text(
        "import rhapsody_graph as r\n"
        "r.model('smollm2', engine='llama_cpp', path=r.smollm2_path())\n"
        "prompts = ['Write a long story about dragon %d.' % i for i in range(8)]\n"
        "print(r.ai(prompts, model='smollm2', max_tokens=512).compute())\n")
    driver = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        server = None
        while server is None and time.monotonic() < deadline:
            for pid in child_pids(driver.pid):
                try:
                    with open(f"/proc/{pid}/cmdline") as f:
                        if "llama_cpp.server" in f.read():
                            server = pid
                except FileNotFoundError:
                    pass
            time.sleep(0.2)
        assert server is not None, "the inference server never started"
        time.sleep(2)  # serving
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=30)
        assert "KeyboardInterrupt" in err
        assert not os.path.exists(f"/proc/{server}")  # killed and reaped by the driver
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_server_that_cannot_start_fails_its_nodes_with_its_log(backend):
    rhapsody.model("broken", engine="llama_cpp", path=rhapsody.smollm2_path(),
                   args=["--no-such-flag"], ready_timeout=60)
    nodes = [rhapsody.ai("hi {}", i, model="broken") for i in range(3)]
    start = time.monotonic()
    with pytest.raises(RuntimeError,
                       match="(?s)'broken' exited before it was ready.*no-such-flag") as info:
        rhapsody.compute(*nodes, backend=backend, fail_fast=False)
    assert time.monotonic() - start < 30
    remove_kept_logs(info.value)
    with pytest.warns(RuntimeWarning, match="3 node"):
        errors = rhapsody.compute(*nodes, backend=backend, on_error="continue")
    remove_kept_logs(errors[0])
    notes = [e.__notes__ for e in errors]  # each its own, naming its node (one object had all)
    assert len({id(e) for e in errors}) == 3
    assert all(len(n) == 1 and node.key in n[0] for n, node in zip(notes, nodes)), notes


def test_cancelling_an_ai_node_abandons_its_request_and_its_dependents(backend):
    session = rhapsody.api.get_session(backend)
    story = session.submit(rhapsody.ai("Write a very long story about a dragon.", model="smollm2",
                                       temperature=0, max_tokens=2048))
    after = session.submit(shout(story))
    service = serving(backend, "smollm2")
    assert service is not None and story.running()
    pid = service.server.pid
    assert story.cancel()
    assert story.cancelled() and after.cancelled()
    session.wait()  # idle: the run's inference service is stopped, its cores given back
    assert not still_alive([pid]) and backend.ledger.idle()
    assert session.submit(shout("done")).result(timeout=60) == "DONE"
