"""Claims on a cell's work (`records.claim`): exclusive, heartbeated, released on SIGTERM/SIGINT, taken over when
stale (a dead process on this host, or no heartbeat for `claim_timeout_s` from any host) or with force=true."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from foca_bench import REPO_DIR
from foca_bench.records import claim, claim_file


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _other_host_lock(path, beat: float, pid: int = 4242) -> None:
    lock = claim_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": "node-17.cluster", "pid": pid, "token": "theirs", "started": beat - 50,
                                "beat": beat}))


def test_a_claim_from_another_host_is_taken_over_only_after_the_timeout(tmp_path, caplog):
    path = tmp_path / "toy_fid" / "abc.json"
    clock = FakeClock()
    _other_host_lock(path, beat=clock.now)
    clock.now += 599  # a beat 599 s old: still live under a 600 s timeout
    with claim(path, timeout_s=600, clock=clock) as holder:
        assert holder["host"] == "node-17.cluster" and holder["pid"] == 4242
        assert holder["lock"] == str(claim_file(path))
    assert json.loads(claim_file(path).read_text())["token"] == "theirs"  # untouched
    clock.now += 2  # 601 s: stale
    with caplog.at_level(logging.WARNING, logger="foca_bench"):
        with claim(path, timeout_s=600, clock=clock) as holder:
            assert holder is None
            mine = json.loads(claim_file(path).read_text())
            assert mine["pid"] == os.getpid() and mine["beat"] == clock.now and mine["started"] == clock.now
    message = caplog.text
    assert "Taking over the claim" in message and str(claim_file(path)) in message
    assert "node-17.cluster" in message and "pid 4242" in message and "claim_timeout_s=600" in message
    assert not claim_file(path).exists()  # released


def test_a_sigkilled_jobs_claim_on_this_host_is_taken_over_at_once_and_force_takes_a_live_one(tmp_path):
    path = tmp_path / "abc.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    claim_file(path).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "beat": time.time()}))
    with claim(path) as holder:
        assert holder is None
    _other_host_lock(path, beat=time.time())  # live
    with claim(path) as holder:
        assert holder is not None
    with claim(path, force=True) as holder:
        assert holder is None
    assert not claim_file(path).exists()


def test_an_unreadable_lock_ages_by_its_file_time(tmp_path):
    path = tmp_path / "abc.json"
    claim_file(path).write_text("{not json")
    clock = FakeClock(claim_file(path).stat().st_mtime + 10)
    with claim(path, timeout_s=600, clock=clock) as holder:
        assert holder is not None and holder["unreadable"]
    clock.now += 600
    with claim(path, timeout_s=600, clock=clock) as holder:
        assert holder is None


def test_the_heartbeat_keeps_a_claim_live_and_stops_when_it_is_taken_over(tmp_path, caplog):
    path = tmp_path / "abc.json"
    clock = FakeClock()
    lock = claim_file(path)
    with caplog.at_level(logging.WARNING, logger="foca_bench"):
        with claim(path, timeout_s=600, clock=clock, beat_every_s=0.02) as holder:
            assert holder is None
            for _ in range(3):  # an hour passes in steps shorter than the timeout: the beat follows
                clock.now += 500
                deadline = time.time() + 5
                while json.loads(lock.read_text())["beat"] != clock.now and time.time() < deadline:
                    time.sleep(0.01)
                assert json.loads(lock.read_text())["beat"] == clock.now
                with claim(path, timeout_s=600, clock=clock) as other:
                    assert other["pid"] == os.getpid()  # live: not taken over
            clock.now += 10_000
            with claim(path, timeout_s=1, clock=clock, beat_every_s=60) as other:  # a job with a short timeout
                assert other is None
                theirs = json.loads(lock.read_text())["token"]
                time.sleep(0.2)  # our heartbeat sees the other token and stops
                assert json.loads(lock.read_text())["token"] == theirs  # ... without overwriting it
        assert "was taken over by another job" in caplog.text


def test_claim_is_exclusive_and_released_on_error(tmp_path):
    path = tmp_path / "x" / "abc.json"
    with claim(path) as holder:
        assert holder is None
        with claim(path) as other:
            assert other["pid"] == os.getpid()
    with pytest.raises(RuntimeError):
        with claim(path) as holder:
            assert holder is None
            raise RuntimeError("job failed")
    with claim(path) as holder:
        assert holder is None  # the failed job left no lock behind


HOLD = """
import signal, sys, time
from pathlib import Path
from foca_bench.records import claim
signal.signal(signal.SIGINT, signal.default_int_handler)  # SIGINT ignored in a background shell job
with claim(Path(sys.argv[1])) as holder:
    assert holder is None
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_job_leaves_no_claim(tmp_path, signum):
    path = tmp_path / "abc.json"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_DIR)})
    assert proc.stdout.readline().strip() == "held"
    assert claim_file(path).exists()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    # SIGTERM exits with 143 (128 + 15) after unwinding; an uncaught KeyboardInterrupt ends Python by SIGINT
    assert proc.returncode == (128 + signum if signum == signal.SIGTERM else -signum), err
    assert not claim_file(path).exists()
    assert not list(tmp_path.iterdir())  # no temporary file either
