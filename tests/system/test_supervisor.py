"""The supervisor with real child processes: start all, restart a killed one, stop leaving nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from daq_backend import ipc
from daq_backend.cli import main as cli_main
from daq_backend.config import DetectorConfig
from daq_backend.formats import ImageMetadata, ImageStatus
from daq_backend.ram_buffer import RingBuffer
from daq_backend.simulator.pattern import expected_image
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.supervisor import ServiceSpec, Supervisor, read_status
from daq_backend.testing import assert_no_leftovers, make_config, pid_alive, shm_segments, wait_for


def sleep_forever() -> None:
    """A ``target`` service (module level so a spawned interpreter can import it)."""
    while True:
        time.sleep(3600)


class SupervisorThread:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.thread = threading.Thread(target=supervisor.run, daemon=True)
        self.thread.start()

    def service(self, name: str) -> dict:
        status = self.supervisor.status()
        return next(s for s in status["services"] if s["name"] == name)

    def wait_running(self, names: list[str], timeout: float = 120.0) -> dict[str, int]:
        """Wait until every named service is alive and has reported stats from its current pid."""

        def ready() -> dict[str, int] | None:
            pids = {}
            for name in names:
                s = self.service(name)
                latest = (self.supervisor._collector.latest if self.supervisor._collector else {}).get(name)
                if not s["alive"] or latest is None or latest["pid"] != s["pid"]:
                    return None
                pids[name] = s["pid"]
            return pids

        return wait_for(ready, f"{names} running", timeout)

    def stop(self) -> None:
        self.supervisor.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def jf2(ipc_env: str) -> Iterator[tuple[DetectorConfig, str]]:
    config = make_config("jungfrau", n_modules=2)
    yield config, ipc_env
    assert_no_leftovers(config, ipc_env)


def send_and_check(config: DetectorConfig, ring: RingBuffer, start_id: int, n: int) -> None:
    with DetectorSimulator(config, rate_hz=20, n_images=n, start_id=start_id) as sim:
        sim.run()
    last = start_id + n - 1
    wait_for(lambda: ring.holds(last), f"image {last} in the ring", 120)
    for image_id in range(start_id, last + 1):
        meta = ImageMetadata.unpack(ring.meta(image_id, ImageMetadata.FORMAT.size))
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.GOOD, 0)
    image = ring.view(last).view("<u2").reshape(config.image_shape)
    np.testing.assert_array_equal(image, expected_image(config, last))


def test_supervisor_runs_restarts_a_killed_receiver_and_stops_cleanly(
    jf2: tuple[DetectorConfig, str],
) -> None:
    config, _ = jf2
    sup = SupervisorThread(Supervisor(config, backoff_initial=0.1, status_interval=0.2))
    names = ["receiver-0", "receiver-1", "assembler"]
    try:
        pids = sup.wait_running(names)
        ring = RingBuffer.attach(ipc.image_ring_name(config.detector_name), timeout=30)
        send_and_check(config, ring, 1, 3)
        if os.geteuid() == 0:  # receivers run realtime (config.receiver_rt_priority), the rest normal
            assert os.sched_getscheduler(pids["receiver-0"]) == os.SCHED_FIFO
            assert os.sched_getparam(pids["receiver-0"]).sched_priority == config.receiver_rt_priority
            assert os.sched_getscheduler(pids["assembler"]) == os.SCHED_OTHER

        os.kill(pids["receiver-1"], signal.SIGKILL)
        wait_for(lambda: sup.service("receiver-1")["restarts"] == 1, "receiver-1 restarted", 60)
        new_pids = sup.wait_running(names)
        assert new_pids["receiver-1"] != pids["receiver-1"]
        assert new_pids["receiver-0"] == pids["receiver-0"] and new_pids["assembler"] == pids["assembler"]
        send_and_check(config, ring, 4, 3)

        wait_for(lambda: read_status(ipc.status_file(config.detector_name))["services"][0]["counters"]
                 .get("frames", 0) >= 3, "receiver counters in the status file", 30)
        status = read_status(ipc.status_file(config.detector_name))
        assert not status["stale"]
        assert {s["name"]: s["restarts"] for s in status["services"]} == {
            "receiver-0": 0, "receiver-1": 1, "assembler": 0}
        ring.close()
    finally:
        sup.stop()
    assert not any(pid_alive(p) for p in {**pids, **new_pids}.values())
    assert not Path(ipc.status_file(config.detector_name)).exists()


def test_leftovers_of_a_killed_owner_are_removed_on_stop(jf2: tuple[DetectorConfig, str]) -> None:
    config, _ = jf2
    sup = SupervisorThread(Supervisor(config, backoff_initial=3600.0, status_interval=0.2))
    try:
        pids = sup.wait_running(["receiver-0", "receiver-1", "assembler"])
        os.kill(pids["assembler"], signal.SIGKILL)
        wait_for(lambda: not sup.service("assembler")["alive"], "assembler seen dead", 60)
        assert ipc.image_ring_name(config.detector_name) in shm_segments(config.detector_name)
    finally:
        sup.stop()
    assert sup.service("assembler")["exit_code"] == -signal.SIGKILL


def test_crashing_services_are_restarted_with_backoff_unless_told_not_to(ipc_env: str) -> None:
    config = make_config("jungfrau")
    services = [
        ServiceSpec("crasher", argv=(sys.executable, "-c", "import sys; sys.exit(3)")),
        ServiceSpec("one-shot", argv=(sys.executable, "-c", "import sys; sys.exit(4)"), restart=False),
        ServiceSpec("sleeper", target=sleep_forever),
    ]
    sup = SupervisorThread(Supervisor(config, extra_services=services, readout=False,
                                      backoff_initial=0.05, backoff_max=0.2, status_interval=0.2))
    try:
        wait_for(lambda: sup.service("crasher")["restarts"] >= 3, "three restarts", 120)
        wait_for(lambda: sup.service("one-shot")["exit_code"] == 4, "one-shot exit", 60)
        sleeper = wait_for(lambda: sup.service("sleeper")["alive"] and sup.service("sleeper")["pid"],
                           timeout=60)
        assert sup.service("one-shot")["restarts"] == 0 and not sup.service("one-shot")["alive"]
        assert sup.service("sleeper")["restarts"] == 0
    finally:
        sup.stop()
    assert not pid_alive(sleeper)


def test_service_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one of argv and target"):
        ServiceSpec("x")
    with pytest.raises(ValueError, match="unique"):
        Supervisor(make_config("jungfrau"), extra_services=[ServiceSpec("assembler", argv=("true",))])


def test_std_daq_up_status_and_sigterm(ipc_env: str, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config("jungfrau")
    path = Path(ipc_env) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    status_path = Path(ipc.status_file(config.detector_name))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daq_backend.cli", "up", str(path), "--status-interval", "0.2", "--no-writer",
         "--rest-port", "0"],
        env=dict(os.environ, STD_DAQ_IPC_DIR=ipc_env),
    )
    try:
        def all_up() -> dict | None:
            if not status_path.exists():
                return None
            status = read_status(status_path)
            services = status["services"]
            ok = all(s["alive"] and s["counters"] for s in services)
            return status if ok and len(services) == 2 else None

        status = wait_for(all_up, "std-daq up: every service alive and reporting", 120)
        child_pids = [s["pid"] for s in status["services"]]
        monkeypatch.setenv("COLUMNS", "250")
        assert cli_main(["status", str(path)]) == 0
        out = capsys.readouterr().out
        assert config.detector_name in out and "receiver-0" in out and "assembler" in out
        assert cli_main(["status", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [s["detector"] for s in listed] == [config.detector_name]
        # a second instance must not take the detector over
        assert cli_main(["up", str(path), "--no-writer", "--rest-port", "0"]) == 1
        assert "already up" in capsys.readouterr().err
        assert status_path.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert not any(pid_alive(p) for p in child_pids)
    assert not status_path.exists()
    assert cli_main(["status", str(path)]) == 1
    path.unlink()
    assert_no_leftovers(config, ipc_env)


def test_children_die_with_a_killed_supervisor_and_status_says_stale(
    ipc_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL skips the supervisor's clean-up: its children still stop (PR_SET_PDEATHSIG) and, as
    owners, unlink their rings; ``std-daq status`` tells the status file is stale."""
    config = make_config("jungfrau")
    path = Path(ipc_env) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    status_path = Path(ipc.status_file(config.detector_name))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daq_backend.cli", "up", str(path), "--status-interval", "0.2", "--no-writer",
         "--rest-port", "0"],
        env=dict(os.environ, STD_DAQ_IPC_DIR=ipc_env),
    )
    try:
        status = wait_for(
            lambda: status_path.exists() and all(s["alive"] for s in read_status(status_path)["services"])
            and read_status(status_path), "every service alive", 120,
        )
    finally:
        proc.kill()
        proc.wait(60)
    child_pids = [s["pid"] for s in status["services"]]
    wait_for(lambda: not any(pid_alive(p) for p in child_pids), "children gone", 60)
    wait_for(lambda: shm_segments(config.detector_name) == [], "rings unlinked by their owners", 30)
    assert read_status(status_path)["stale"]
    assert cli_main(["status", str(path)]) == 3
    assert "STALE" in capsys.readouterr().out


def test_simulate_subcommand_feeds_the_readout(ipc_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    from daq_backend.testing import InProcessReadout

    config = make_config("jungfrau")
    path = Path(ipc_env) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    with InProcessReadout(config) as readout:
        assert cli_main(["simulate", str(path), "--rate", "50", "--n-images", "3", "--no-progress"]) == 0
        readout.wait_images(3)
        assert readout.image(3)[0].status == ImageStatus.GOOD
    assert "sent 3 images" in capsys.readouterr().out


def test_stats_collector_keeps_latest_snapshot_and_rates(ipc_env: str) -> None:
    from daq_backend.stats import StatsCollector, StatsReporter

    collector = StatsCollector("x")
    try:
        collector.ingest(json.dumps({"service": "r", "pid": 1, "time": 10.0,
                                     "counters": {"frames": 100, "bytes": 1000}}).encode())
        collector.ingest(json.dumps({"service": "r", "pid": 1, "time": 12.0,
                                     "counters": {"frames": 300, "bytes": 5000}}).encode())
        collector.ingest(b"{not json")
        collector.ingest(json.dumps({"service": "r"}).encode())
        assert collector.latest["r"]["rates"] == {"frames": 100.0, "bytes": 2000.0}
        assert collector.latest["r"]["counters"]["frames"] == 300
        assert collector.bad_messages == 2
        collector.ingest(json.dumps({"service": "r", "pid": 2, "time": 13.0,
                                     "counters": {"frames": 5}}).encode())
        assert collector.latest["r"]["rates"] == {}  # a restarted process starts new counters

        counters = {"frames": 7}
        reporter = StatsReporter("x", "background", lambda: dict(counters), interval=0.05).start()
        def latest_frames() -> int | None:
            collector.drain()
            report = collector.latest.get("background")
            return None if report is None else report["counters"]["frames"]

        wait_for(lambda: latest_frames() == 7, "a background report", 30)
        counters["frames"] = 8
        reporter.close()  # sends a final snapshot
        wait_for(lambda: latest_frames() == 8, "the final report", 30)
        assert collector.latest["background"]["pid"] == os.getpid()
    finally:
        collector.close()
