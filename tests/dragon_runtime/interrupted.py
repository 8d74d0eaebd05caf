"""A driver that is interrupted mid-run (tests/backends/test_dragon.py sends it Ctrl-C).

    dragon tests/dragon_runtime/interrupted.py PIDFILE

It computes a placed node and an executable that write their pids to PIDFILE and
then sleep, and an AI node whose Dragon-placed server's pid is written there once
it generates; the test interrupts the driver once the three pids are there.
"""
import os
import sys
import threading
import time

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1)
def sleeper(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(300)


def note_server(backend, model, path):
    """Append ``model``'s server pid to ``path`` once the server answers."""
    while True:
        service = rhapsody.api.get_session(backend).backends["inference"].services.running.get(model)
        if service is not None and service.client is not None:
            with open(path, "a") as f:
                f.write(f"{service.server.pid}\n")
            return
        time.sleep(0.05)


if __name__ == "__main__":
    pidfile = sys.argv[1]
    program = rhapsody.executable(["sh", "-c", f"echo $$ >> {pidfile}; exec sleep 300"])
    rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path())
    story = rhapsody.ai("Write a very long story about a dragon.", model="smollm2",
                        max_tokens=4096)
    with rhapsody.DragonBackend() as backend:
        threading.Thread(target=note_server, args=(backend, "smollm2", pidfile),
                         daemon=True).start()
        rhapsody.compute(sleeper(pidfile), program, story, backend=backend)
