"""The watchdog removes the files a driver registered when the driver is killed."""
import os
import signal
import subprocess
import sys

from ..conftest import wait_until

DRIVER = '''
import os, sys
from rhapsody_graph.backends import watchdog
removed, kept = sys.argv[1:3]
for path in (removed, kept):
    open(path, "w").close()
    watchdog.remove_at_end(path)
watchdog.keep_file(kept)  # the driver dealt with this one itself
print(watchdog.watchdog_pid(), flush=True)
os.kill(os.getpid(), 9)
'''


def test_a_sigkilled_drivers_registered_file_is_removed_and_a_kept_one_stays(tmp_path):
    removed, kept = tmp_path / "a log with spaces.log", tmp_path / "kept.log"
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(removed), str(kept)],
                            capture_output=True, text=True, timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    guard = int(driver.stdout)
    assert wait_until(lambda: not os.path.exists(f"/proc/{guard}"), 20), "watchdog lives on"
    assert not removed.exists()
    assert kept.exists()
