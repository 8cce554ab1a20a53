"""The shared component lifecycle (daq_backend.component)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from daq_backend.component import Component


class _Counter(Component):
    thread_name = "counter"

    def __init__(self) -> None:
        super().__init__()
        self.loops = 0
        self.released = 0

    def run(self) -> None:
        while not self.stopping:
            self.loops += 1
            self.wait_stopped(0.01)

    def release(self) -> None:
        self.released += 1


def test_start_stop_join_close_once() -> None:
    component = _Counter()
    thread = component.start()
    assert thread.name == "counter"
    component.stop()
    assert component.join(30)
    component.close()
    component.close()
    assert component.released == 1 and component.closed


def test_context_manager_stops_joins_and_closes() -> None:
    with _Counter() as component:
        component.start()
    assert component.stopping and component.closed and component.released == 1
    assert component.join(0)


def test_run_service_stops_on_sigterm_and_closes(tmp_path) -> None:
    marker = tmp_path / "closed"
    script = textwrap.dedent(f"""
        import os, sys
        from daq_backend.component import Component, run_service

        class Waiter(Component):
            def run(self):
                print("running", flush=True)
                while not self.stopping:
                    self.wait_stopped(1.0)

            def release(self):
                open({str(marker)!r}, "w").write("closed")

        sys.exit(run_service(Waiter()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[3])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert marker.read_text() == "closed"
