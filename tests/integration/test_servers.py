"""The helpers for starting local servers: a free port, and a wait that stops when the process exits."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from slime_wf.servers import ProcessExited, free_port, wait_until


def test_a_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_until_returns_the_first_truthy_value():
    answers = iter([None, 0, "", {"up": True}])
    assert wait_until(lambda: next(answers), "an answer", timeout_s=600, interval_s=0) == {"up": True}


def test_wait_until_stops_when_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    # the deadline is far away: only the exit can end this wait
    with pytest.raises(ProcessExited, match="the server: the process exited with code 3") as err:
        wait_until(lambda: False, "the server", timeout_s=3600, process=proc)
    assert err.value.returncode == 3


def test_wait_until_names_what_it_waited_for_at_the_deadline():
    with pytest.raises(TimeoutError, match="still waiting for the moon after 0 s"):
        wait_until(lambda: False, "the moon", timeout_s=0, interval_s=0)
