"""A driver that is interrupted mid-run (tests/backends/test_dragon.py sends it Ctrl-C).

    dragon tests/dragon_runtime/interrupted.py PIDFILE

It computes a placed node and an executable that write their pids to PIDFILE and
then sleep; the test interrupts the launch once both pids are there.
"""
import os
import sys
import time

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1)
def sleeper(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(300)


if __name__ == "__main__":
    pidfile = sys.argv[1]
    program = rhapsody.executable(["sh", "-c", f"echo $$ >> {pidfile}; exec sleep 300"])
    with rhapsody.DragonBackend() as backend:
        rhapsody.compute(sleeper(pidfile), program, backend=backend)
