"""Scheduling priority of a receiver process: packets must be read before the socket buffer fills.

Why: a module's socket buffer holds a few milliseconds of a burst (4 frames of 1 MiB with a 4 MiB
``net.core.rmem_max``). On a machine whose cores are shared with the assembler, the writer and the
file system, a receiver preempted for longer loses packets even when the pipeline keeps up on average
(measured on 2 cores: 37 % of 2000 free-running frames lost, every one a kernel drop, while the rings
were far from full). With ``SCHED_FIFO`` the receiver runs as soon as a datagram arrives; it sleeps in
``poll`` when the socket is empty, so it cannot take more than it needs (and the kernel's RT throttling,
``kernel.sched_rt_runtime_us``, keeps 5 % for everyone else even if it spun). The ring buffers behind
it absorb the work the lower-priority services are held back from.

Needs CAP_SYS_NICE (root, ``setcap cap_sys_nice+ep``, or ``rtprio`` in limits.conf); without it the
receiver runs at normal priority and says so once at start.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: The SCHED_FIFO priority receivers ask for by default: above normal tasks, below the kernel's own
#: threaded interrupt handlers (50), so the network stack still runs first.
DEFAULT_RT_PRIORITY = 10


def apply_rt_priority(priority: int, what: str) -> str:
    """Run the calling thread (and the threads it creates later) under ``SCHED_FIFO`` ``priority``.

    ``priority`` 0 leaves normal scheduling. Returns what is in force, for the start-up log line; a
    refusal is logged as a warning with the fix, never raised: a receiver at normal priority still
    works, it only loses packets sooner on a loaded machine."""
    if priority <= 0:
        return "normal scheduling (realtime priority off)"
    if not hasattr(os, "sched_setscheduler"):
        return "normal scheduling (no SCHED_FIFO on this platform)"
    high = os.sched_get_priority_max(os.SCHED_FIFO)
    if priority > high:
        raise ValueError(f"realtime priority: {priority} is outside 1..{high}")
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        log.warning(
            "%s: SCHED_FIFO priority %d refused (needs CAP_SYS_NICE): running at normal priority, so "
            "packets are lost sooner when the machine is busy; run as root, `setcap cap_sys_nice+ep` the "
            "Python binary, or allow `rtprio %d` in /etc/security/limits.conf", what, priority, priority)
        return "normal scheduling (SCHED_FIFO refused)"
    except OSError as exc:
        log.warning("%s: SCHED_FIFO priority %d failed (%s): running at normal priority", what, priority, exc)
        return f"normal scheduling (SCHED_FIFO failed: {exc.strerror})"
    return f"SCHED_FIFO priority {priority}"


def current_policy() -> tuple[int, int]:
    """(policy, priority) of the calling thread, for tests and status."""
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
