"""Receiver scheduling priority (daq_backend.priority) and how the receiver's main applies it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from daq_backend import priority
from daq_backend.config import parse_config

CHILD = """
import os, sys
from daq_backend.priority import apply_rt_priority, current_policy
print(apply_rt_priority(int(sys.argv[1]), "test"))
policy, prio = current_policy()
print(policy == os.SCHED_FIFO, prio)
"""


def _in_child(prio: int) -> list[str]:
    """Run in a fresh process: SCHED_FIFO must not leak into the test runner's own thread."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(prio)], capture_output=True, text=True, check=True,
                         timeout=60)
    return out.stdout.splitlines()


def test_zero_keeps_normal_scheduling() -> None:
    described, policy = _in_child(0)
    assert "normal scheduling" in described
    assert policy.startswith("False")


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE (CI runs as root)")
def test_fifo_priority_is_in_force() -> None:
    described, policy = _in_child(10)
    assert described == "SCHED_FIFO priority 10"
    assert policy == "True 10"


def test_refusal_is_a_warning_with_the_fix(monkeypatch, caplog) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(priority.os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="daq_backend.priority"):
        described = priority.apply_rt_priority(10, "receiver-0")
    assert described == "normal scheduling (SCHED_FIFO refused)"
    assert "CAP_SYS_NICE" in caplog.text and "limits.conf" in caplog.text


def test_out_of_range_priority_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside 1..99"):
        priority.apply_rt_priority(100, "receiver-0")


def test_config_default_and_bounds() -> None:
    base = {"detector_name": "P", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
            "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": 50000}
    assert parse_config(base).receiver_rt_priority == priority.DEFAULT_RT_PRIORITY
    assert parse_config({**base, "receiver_rt_priority": 0}).receiver_rt_priority == 0
    with pytest.raises(ValueError, match="receiver_rt_priority"):
        parse_config({**base, "receiver_rt_priority": 100})
