"""The inference client against a real HTTP server that answers the way each case needs.

The server is a stdlib ``http.server`` in a thread of the test, on loopback: every
request gets what the test's ``answer(n, path)`` says (``n`` counts the requests).
"""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.ai.client import Client, Deadline, DeadlinePassed, ServerError, Unreachable
from rhapsody_graph.ai.service import Service

pytestmark = pytest.mark.timeout(60)

HANG, DROP = "hang", "drop"  # answers: wait for the test's end; close without an answer
TRICKLE = "trickle"  # an answer sent a byte every half second, until the test's end


def completion(text="ok"):
    return 200, json.dumps({"choices": [{"index": 0, "text": text,
                                         "message": {"role": "assistant", "content": text}}]})


class Server:
    """A real HTTP server on loopback, in a thread, answering with ``answer(n, path)``:
    ``(status, body)``, :data:`HANG` or :data:`DROP`; ``paths`` lists the requests."""

    def __init__(self, answer):
        self.paths, self.done, self.closed = [], threading.Event(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.paths.append(self.path)
                reply = answer(len(server.paths), self.path)
                if reply == HANG:
                    server.done.wait()
                elif reply == DROP:
                    self.close_connection = True
                elif reply == TRICKLE:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        while not server.done.wait(0.5):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                    except OSError:  # the client closed the connection
                        server.closed.set()
                else:
                    body = reply[1].encode()
                    self.send_response(reply[0])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.do_GET()

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.done.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve():
    """``serve(answer)``: a started :class:`Server`, closed after the test."""
    servers = []
    yield lambda answer: servers.append(Server(answer)) or servers[-1]
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def backend():
    with rhapsody.LocalBackend(cpus=1) as b:
        yield b


class Listening:
    """The server of a :class:`Service` (``spawn``'s product): one already listening at
    ``url``, our test server, so the readiness poll talks to it."""

    log = None

    def __init__(self, url):
        self.url = url

    def start(self, argv, env):
        return self.url

    def returncode(self):
        return None

    def wait(self, timeout):
        return None

    def tail(self, lines):
        return ""

    def stop(self, keep_log):
        pass


def start_service(url, ready_timeout):
    """Start a llama.cpp model's service whose server is the one at ``url``; return the
    error it raises and the seconds it took."""
    model = rhapsody.model("polled", engine="llama_cpp", path="/unused.gguf",
                           ready_timeout=ready_timeout, timeout=30)
    service = Service(model, None, lambda m, placement: Listening(url))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        service.start()
    return caught.value, time.monotonic() - t0


def test_a_request_that_times_out_waiting_for_the_answer_is_not_sent_again(serve, backend):
    server = serve(lambda n, path: HANG)
    rhapsody.model("slow", url=server.url, timeout=0.5, retries=2)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as caught:
        rhapsody.ai("hi", model="slow").compute(backend=backend)
    assert type(caught.value) is ServerError  # not Unreachable: the server was reached
    assert str(caught.value).startswith(
        f"POST {server.url}/chat/completions timed out after 0.5 s waiting for the answer")
    assert server.paths == ["/v1/chat/completions"]
    assert time.monotonic() - t0 < 5


def test_a_connection_dropped_before_the_answer_is_not_sent_again(serve, backend):
    server = serve(lambda n, path: DROP)
    rhapsody.model("dropping", url=server.url, retries=2)
    with pytest.raises(Unreachable, match=f"POST {server.url}/chat/completions failed: "):
        rhapsody.ai("hi", model="dropping").compute(backend=backend)
    assert len(server.paths) == 1


def test_a_5xx_answer_is_sent_again_up_to_retries_and_a_4xx_is_not(serve, backend):
    flaky = serve(lambda n, path: (503, "busy") if n < 3 else completion("third time"))
    rhapsody.model("flaky", url=flaky.url, retries=2)
    assert rhapsody.ai("hi", model="flaky").compute(backend=backend) == "third time"
    assert len(flaky.paths) == 3
    refusing = serve(lambda n, path: (401, '{"error": "bad key"}'))
    rhapsody.model("refusing", url=refusing.url, retries=2)
    with pytest.raises(ServerError, match=r"-> HTTP 401 \(the server says: bad key\)"):
        rhapsody.ai("hi", model="refusing").compute(backend=backend)
    assert len(refusing.paths) == 1


@pytest.mark.parametrize("chat, body, says", [
    (True, "<html>not json</html>", None),
    (True, '{"id": "x", "object": "chat.completion"}', None),
    (True, '{"error": {"message": "model overloaded", "code": 503}}', "model overloaded"),
    (True, '{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}',
     None),
    (False, '{"choices": []}', None),
    (True, '{"error": {"message": "", "code": 500}}', None),  # was "(the server says: )"
])
def test_a_200_answer_that_is_not_a_completion_raises_server_error_with_its_body(
        serve, backend, chat, body, says):
    server = serve(lambda n, path: (200, body))
    rhapsody.model("odd", url=server.url)
    for parse in (None, str.strip):  # parse= never sees a non-text
        node = rhapsody.ai("hi", model="odd", chat=chat, parse=parse)
        with pytest.raises(ServerError) as caught:
            node.compute(backend=backend)
        path = "chat/completions" if chat else "completions"
        told = "" if says is None else f" (the server says: {says})"
        assert str(caught.value) == (f"POST {server.url}/{path} -> HTTP 200, not a completion"
                                     f"{told}: {body}")


def test_the_readiness_poll_of_a_server_that_never_answers_ends_at_ready_timeout(serve):
    server = serve(lambda n, path: HANG)
    error, took = start_service(server.url, ready_timeout=1)
    assert 1 <= took < 3  # not the model's request timeout (30 s)
    assert str(error).startswith(
        f"the inference service for model 'polled' was not ready after 1 s "
        f"(GET {server.url}/models: no answer before the deadline (")


def test_the_readiness_poll_says_why_a_server_answering_no_model_list_is_not_ready(serve):
    server = serve(lambda n, path: (200, "<html>starting</html>"))
    error, took = start_service(server.url, ready_timeout=0.5)
    assert took < 3 and len(server.paths) > 1  # polled again until ready_timeout
    assert str(error).startswith(
        "the inference service for model 'polled' was not ready after 0.5 s "
        f"(GET {server.url}/models -> HTTP 200, not a model list: <html>starting</html>)")


def test_a_llama_cpp_model_whose_path_is_a_directory_is_refused_before_anything_runs(
        backend, tmp_path):
    marker = tmp_path / "ran"
    rhapsody.model("folder", engine="llama_cpp", path=str(tmp_path))
    node = rhapsody.ai("{}", rhapsody.executable(["touch", str(marker)]), model="folder")
    with pytest.raises(IsADirectoryError, match=re.escape(
            f"model 'folder' (engine 'llama_cpp') needs a GGUF file as path=, but "
            f"'{tmp_path}' is a directory")):
        node.compute(backend=backend)
    assert not marker.exists()


def test_a_cancelled_fan_out_sends_none_of_its_remaining_prompts(serve):
    """One prompt at a time (concurrency=1): cancel() used to let the other four go out."""
    first = threading.Event()

    def answer(n, path):
        first.set()
        return HANG if n == 1 else completion()  # the first holds the node until the end

    server = serve(answer)
    rhapsody.model("fan", url=server.url, concurrency=1)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], progress=False) as s:
        fut = s.submit(rhapsody.ai([f"prompt {i}" for i in range(5)], model="fan"))
        assert first.wait(30)
        assert fut.cancel()
        server.done.set()  # the first request ends now; the next one would be sent here
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                t.name.startswith("rhapsody-ai-") for t in threading.enumerate()):
            time.sleep(0.05)
    assert len(server.paths) == 1, server.paths


def test_a_model_declared_again_replaces_the_one_an_inference_backend_was_given(serve):
    first, second = serve(lambda n, path: completion("one")), serve(lambda n, p: completion("two"))
    model = rhapsody.model("again", url=first.url)
    cpu = rhapsody.LocalBackend(cpus=1, name="cpu")
    llm = rhapsody.InferenceBackend(name="llm", models=[model], on=cpu)
    with rhapsody.Session(backends=[cpu, llm], progress=False) as s:
        assert s.submit(rhapsody.ai("hi", model="again")).result(timeout=30) == "one"
        rhapsody.model("again", url=second.url)  # the backend kept the first one
        assert s.submit(rhapsody.ai("hi", model="again")).result(timeout=30) == "two"


def test_a_model_declared_again_lets_the_nodes_in_flight_finish_on_its_old_server(serve):
    """The old server (and its client) were closed under the running node."""
    asked, release = threading.Event(), threading.Event()

    def slow(n, path):
        asked.set()
        release.wait(30)
        return completion("old")

    old, new = serve(slow), serve(lambda n, path: completion("new"))
    rhapsody.model("moving", url=old.url)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], progress=False) as s:
        first = s.submit(rhapsody.ai("hi", model="moving"))
        assert asked.wait(30)
        rhapsody.model("moving", url=new.url)
        assert s.submit(rhapsody.ai("hi", model="moving")).result(timeout=30) == "new"
        release.set()
        assert first.result(timeout=30) == "old"


def test_requests_beyond_the_models_concurrency_wait_in_the_client_not_in_the_servers_queue(
        serve, backend):
    """A server that answers one request at a time (as llama.cpp's does), six nodes at
    once: every request was sent at once, and those behind ran out their timeout."""
    one_at_a_time, flight = threading.Lock(), {"now": 0, "most": 0}

    def answer(n, path):
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        with one_at_a_time:
            time.sleep(0.3)
        flight["now"] -= 1
        return completion(f"answer {n}")

    server = serve(answer)
    rhapsody.model("one-slot", url=server.url, timeout=1.0, retries=0, concurrency=1)
    answers = rhapsody.compute(*[rhapsody.ai(f"q{i}", model="one-slot") for i in range(6)],
                               backend=backend)
    assert sorted(answers) == [f"answer {n}" for n in range(1, 7)]
    assert flight["most"] == 1


def test_a_server_on_this_host_is_reached_directly_whatever_http_proxy_says(
        serve, backend, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = serve(lambda n, path: completion("direct"))
    rhapsody.model("behind-proxy", url=server.url, timeout=5.0, retries=0)
    assert rhapsody.ai("hi", model="behind-proxy").compute(backend=backend) == "direct"


def test_the_models_timeout_bounds_the_whole_answer_however_slowly_it_comes(serve, backend):
    """A server that sends a byte now and then never let a read time out: a timeout of
    1.5 s waited as long as the server kept trickling."""
    server = serve(lambda n, path: TRICKLE)
    rhapsody.model("trickling", url=server.url, timeout=1.5, retries=0)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="timed out after 1.5 s"):
        rhapsody.ai("hi", model="trickling").compute(backend=backend)
    assert time.monotonic() - t0 < 10
    assert server.closed.wait(10), "the connection was left open"


def test_a_cancelled_deadline_closes_its_request_in_flight_at_once(serve):
    server = serve(lambda n, path: HANG)
    client, deadline, outcome = Client(server.url, timeout=60), Deadline(), []

    def ask():
        try:
            client.chat([[{"role": "user", "content": "hi"}]], deadline)
        except DeadlinePassed as exc:
            outcome.append(exc)
    asking = threading.Thread(target=ask)
    asking.start()
    while not server.paths:
        time.sleep(0.01)
    t0 = time.monotonic()
    deadline.cancel()
    asking.join(10)
    assert not asking.is_alive() and time.monotonic() - t0 < 5
    assert "its node was cancelled" in str(outcome[0])
    client.close()
