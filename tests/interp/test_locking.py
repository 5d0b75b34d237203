"""One writer per directory, across processes; a killed holder's lock is taken over."""
import os
import signal
import subprocess
import sys
import time

import pytest

from interp.locking import LockedError, directory_lock

HOLD = "import sys, time; from interp.locking import directory_lock\n" \
       "with directory_lock(sys.argv[1], 'holding it'):\n    print('held', flush=True); time.sleep(60)\n"


def test_second_process_is_refused_then_takes_over_a_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"{tmp_path} is in use by pid {holder.pid} on .*holding it"), \
                directory_lock(tmp_path, "second"):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (tmp_path / ".lock").read_text()  # left by the killed holder
    with directory_lock(tmp_path, "after the crash") as path:
        assert str(os.getpid()) in path.read_text()
    assert not (tmp_path / ".lock").exists()  # released on exit


def test_waiting_lock_names_the_holder_and_waits(tmp_path, capfd):
    script = HOLD.replace("time.sleep(60)", "time.sleep(2)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.time()
    with directory_lock(tmp_path, "after", wait=True):
        assert holder.poll() is not None or time.time() - started > 0.5
    holder.wait()
    assert f"waiting for pid {holder.pid}" in capfd.readouterr().err
