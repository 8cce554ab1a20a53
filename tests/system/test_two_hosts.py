"""One detector over two readout hosts: ``std-daq up CONFIG --host daq-a`` and ``--host daq-b`` on
this machine, each "host" with its own ipc directory and ``/dev/shm`` prefix, both on one RabbitMQ.

The UDP stream crosses loopback (each module its own port; no network namespaces: creating them
needs root). One write request through the first host's REST API reaches both hosts' writer agents;
each writes its part (its modules' partial image), the first host's agent writes the master. The
master reads pixel-exact against what the simulator sent, and a packet dropped on one of daq-b's
modules is flagged in the master for that image only, in daq-b's per-image status and the combined
one, never in daq-a's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests

from daq_backend.config import ConfigError, DetectorConfig
from daq_backend.formats import ImageStatus
from daq_backend.messages import FAULT_BOUND, ImageAccounting
from daq_backend.rest.backend import UNSTARTED_BOUND
from daq_backend.simulator.pattern import expected_image
from daq_backend.supervisor import read_status
from daq_backend.testing import free_tcp_port, healthy, make_config, pid_alive, wait_for
from daq_backend.writer import layout, master

CLI = (sys.executable, "-m", "daq_backend.cli")
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
HOSTS = {"daq-a": [0, 1], "daq-b": [2, 3]}
N_IMAGES = 6
#: image 3 loses packet 5 of module 2 (daq-b's first module): its rows 20..23, image rows 1044..1047
DROP = (3, 2, 5)


def test_readout_hosts_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="module 3 is on both"):
        make_config("jungfrau", n_modules=4, readout_hosts={"a": [0, 1, 3], "b": [2, 3]})
    with pytest.raises(ConfigError, match=r"module\(s\) 3 on no host"):
        make_config("jungfrau", n_modules=4, readout_hosts={"a": [0, 1], "b": [2]})
    with pytest.raises(ConfigError, match="contains module 1 of b"):
        make_config("jungfrau", n_modules=4, readout_hosts={"a": [0, 2], "b": [1, 3]})
    config = make_config("jungfrau", n_modules=4, readout_hosts=HOSTS)
    share = config.for_host("daq-b")
    assert share.image_shape == (1024, 1024) and share.required_modules == (2, 3)
    assert share.host_regions == {"daq-a": (0, 0, 1024, 1024), "daq-b": (1024, 0, 1024, 1024)}
    assert share.full_image_shape == (2048, 1024)
    with pytest.raises(ConfigError, match="not one of the config's readout_hosts"):
        config.for_host("daq-c")


def test_up_of_a_split_detector_needs_its_host(tmp_path: Path) -> None:
    config = make_config("jungfrau", n_modules=4, readout_hosts=HOSTS)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    for args, message in (([], "give --host NAME on each"), (["--host", "daq-c"], "not one of")):
        done = subprocess.run([*CLI, "up", str(path), "--rest-port", "0", *args], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, STD_DAQ_IPC_DIR=str(tmp_path)))
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_combined_status_is_the_worst_of_the_hosts(tmp_path: Path) -> None:
    """The master's per-image status after the request: the worst host's per row, ``ID_MISMATCH``
    where the hosts wrote different image ids, 255 (not written) where a host has no row; the missing
    packets summed; each host's own datasets stay readable under ``/entry/data/parts/<host>``."""
    config = make_config("jungfrau", n_modules=2, readout_hosts={"daq-a": [0], "daq-b": [1]})
    output = tmp_path / "run.h5"
    host_parts = {host: [master.Part(master.part_file_name(output, 0, host), 0, 1,
                                     region=config.host_region(host))] for host in config.readout_hosts}
    master.create_master(output, [p for mine in host_parts.values() for p in mine],
                         image_shape=config.image_shape, image_dtype=config.image_dtype, n_images=4,
                         status_parts=host_parts["daq-a"], host_parts=host_parts)
    rows = {"daq-a": [(1, 0, 0), (2, 1, 3), (3, 0, 0), (4, 0, 0)],  # (image id, status, missing)
            "daq-b": [(1, 1, 2), (2, 0, 0), (7, 0, 0)]}  # daq-b wrote another id in row 2, no row 3
    for host, written in rows.items():
        share = config.for_host(host)
        part = layout.ImageFile.create(output.parent / host_parts[host][0].file, share, n_images=4)
        for image_id, status, missing in written:
            part.append(image_id, status, missing,
                        part.encode(np.zeros(share.image_shape, dtype=share.image_dtype)))
        part.close(layout.FILE_COMPLETED)
    with h5py.File(output, "r", swmr=True) as h5:  # while writing: the first host's per-image status
        assert list(h5[layout.STATUS][:]) == [0, 1, 0, 0]
    assert master.combine_hosts(output) == 4
    assert master.finish_master(output, layout.FILE_COMPLETED) == 3  # daq-b's part has 3 rows
    with h5py.File(output, "r") as h5:
        assert list(h5[layout.STATUS][:]) == [1, 1, ImageStatus.ID_MISMATCH, layout.STATUS_NOT_WRITTEN]
        assert list(h5[layout.N_MISSING_PACKETS][:]) == [2, 3, 0, 0]
        assert list(h5[layout.IMAGE_ID][:]) == [1, 2, 3, 4]
        assert list(h5[master.host_dataset("daq-b", layout.IMAGE_ID)][:]) == [1, 2, 7]
        assert list(h5[master.host_dataset("daq-a", layout.STATUS)][:]) == [0, 1, 0, 0]
    counts = master.master_accounting(output)
    assert counts == {"n_written": 3, "n_good": 0, "n_lost": 0, "n_incomplete": 3}


def test_a_request_of_several_hosts_ends_when_every_host_did() -> None:
    """The REST tracker: one host's success does not end the request; its numbers are the first
    (master-writing) host's agent's."""
    from daq_backend.broker.aggregator import StatusMessage
    from daq_backend.broker.protocol import Action
    from daq_backend.messages import RequestState
    from daq_backend.rest.backend import RequestTracker
    from daq_backend.writer.request import writer_services

    tracker = RequestTracker()
    first, second = writer_services(["daq-a", "daq-b"])
    assert (first, second) == ("writer_agent@daq-a", "writer_agent@daq-b")
    tracker.register("r1", {"n_images": 5, "output_file": "/x/run.h5"}, expected_services=(first, second))

    def status(source: str, action: Action, message: Any) -> StatusMessage:
        return StatusMessage(request_id="r1", source=source, action=action, message=message,
                             request={"n_images": 5})

    tracker.on_status(status(first, Action.START, None))
    tracker.on_status(status(first, Action.SUCCESS, {"n_written": 4, "status": "completed"}))
    record = tracker.get("r1")
    assert record is not None and record.state is RequestState.RUNNING
    tracker.on_status(status(second, Action.START, None))
    tracker.on_status(status(second, Action.SUCCESS, {"n_written": 5, "status": "completed"}))
    record = tracker.get("r1")
    assert record is not None and record.state is RequestState.COMPLETED and record.n_written == 4

    # a host that never ends the request: failed, naming it, once the first host's agent ended it and
    # nothing came for the bound
    tracker.register("r2", {"n_images": 5}, expected_services=(first, second))
    for action, message in ((Action.START, None), (Action.SUCCESS, {"n_written": 5})):
        tracker.on_status(StatusMessage(request_id="r2", source=first, action=action, message=message,
                                        request={"n_images": 5}))
    assert tracker.fail_unstarted("detector", 3600) == []
    assert tracker.fail_unstarted("detector", 0.0) == ["r2"]
    record = tracker.get("r2")
    assert record is not None and record.state is RequestState.FAILED
    assert record.message is not None and record.message.startswith("writer_agent@daq-b did not end")


class SplitDaq:
    """``std-daq up CONFIG --host H`` for each of ``hosts`` (each its own ipc directory and
    ``/dev/shm`` prefix; the first host has the REST API), on RabbitMQ."""

    def __init__(self, config: DetectorConfig, tmp_path: Path, hosts: list[str]) -> None:
        self.config = config
        self.path = tmp_path / "detector.json"
        self.path.write_text(json.dumps(config.to_json_dict()))
        self.out_dir = tmp_path / "data"
        self.out_dir.mkdir()
        self.url = f"http://127.0.0.1:{free_tcp_port()}"
        self.hosts: dict[str, dict[str, Any]] = {}
        for host in hosts:
            ipc_dir = tempfile.mkdtemp(prefix="sdq", dir="/tmp")
            prefix = f"{host}-{uuid.uuid4().hex[:6]}-"
            env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_dir, STD_DAQ_SHM_PREFIX=prefix)
            self.hosts[host] = {"ipc": ipc_dir, "prefix": prefix, "env": env}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.child_pids: list[int] = []

    def _up(self, host: str, rest: bool) -> list[int] | None:
        status_path = Path(self.hosts[host]["ipc"]) / f"std-daq-{self.config.detector_name}-status.json"
        if not status_path.exists():
            return None
        services = read_status(str(status_path))["services"]
        wanted = {f"receiver-{m}" for m in self.config.readout_hosts[host]}
        wanted |= {"assembler", "h5-writer", "writer-agent"} | ({"rest"} if rest else set())
        if {s["name"] for s in services} == wanted and all(
                s["alive"] and (s["counters"] or s["name"] == "rest") for s in services):
            return [s["pid"] for s in services]
        return None

    def __enter__(self) -> SplitDaq:
        try:
            for k, (host, h) in enumerate(self.hosts.items()):
                rest = ["--rest-port", self.url.rsplit(":", 1)[1] if k == 0 else "0"]
                self.procs.append(subprocess.Popen(
                    [*CLI, "up", str(self.path), "--host", host, *rest, "--broker-url", RABBITMQ_URL,
                     f"--output-root={self.out_dir}", "--status-interval", "0.2", "--log-level", "WARNING"],
                    env=h["env"]))
            for k, host in enumerate(self.hosts):
                self.child_pids += wait_for(lambda host=host, k=k: self._up(host, k == 0),
                                            f"{host}: every service alive", 240)
            wait_for(lambda: healthy(self.url), "the first host's REST API healthy", 120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def send(self, n_images: int, *args: str) -> None:
        """The simulator sends every module of the detector (to each module's port)."""
        first = next(iter(self.hosts.values()))
        sender = subprocess.run([*CLI, "simulate", str(self.path), "--rate", "10", "--n-images",
                                 str(n_images), *args, "--no-progress"], env=first["env"],
                                stdout=subprocess.DEVNULL, timeout=120)
        assert sender.returncode == 0

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        for h in self.hosts.values():
            for name in os.listdir("/dev/shm"):
                if name.startswith(h["prefix"]):
                    os.unlink(f"/dev/shm/{name}")
            shutil.rmtree(h["ipc"], ignore_errors=True)

    def stopped_cleanly(self) -> bool:
        return all(p.returncode == 0 for p in self.procs) and bool(self.child_pids) and not any(
            pid_alive(p) for p in self.child_pids)


def test_two_hosts_one_write_request_one_master_file(tmp_path: Path) -> None:
    config = make_config("jungfrau", n_modules=4, readout_hosts=HOSTS, frame_ring_slots=64,
                         image_ring_slots=64)
    with SplitDaq(config, tmp_path, list(HOSTS)) as daq:
        url, out_dir = daq.url, daq.out_dir
        # the write request takes the images from id 1 on (also those already in each host's ring),
        # so both hosts write the same ids whatever the moment their agent got the request
        daq.send(N_IMAGES, "--drop-packet", ":".join(map(str, DROP)))
        output = out_dir / "run.h5"
        answer = requests.post(f"{url}/write_sync", json={"output_file": str(output), "n_images": N_IMAGES,
                                                          "start_id": 1, "timeout": 60}, timeout=240)
        assert answer.status_code == 200, answer.text
        response = answer.json()["response"]
        assert response["state"] == "completed", json.dumps(response)
        assert response["n_written"] == N_IMAGES
        record = requests.get(f"{url}/requests/{answer.json()['request_id']}", timeout=30)
        assert record.status_code == 200, record.text
        tracked = record.json()
        # the request ended only once both hosts' agents did; its counts are the master's
        assert tracked["services"] == {"writer_agent@daq-a": "request_success",
                                       "writer_agent@daq-b": "request_success"}, tracked
        assert (tracked["n_written"], tracked["n_missing_images"], tracked["n_incomplete_images"]) == (
            N_IMAGES, 0, 1)

        names = sorted(p.name for p in out_dir.iterdir())
        assert names == ["run.h5", "run_daq-a_part0.h5", "run_daq-b_part0.h5"]
        with h5py.File(output, "r") as h5:
            assert master.is_master(h5) and master.master_hosts(h5) == ["daq-a", "daq-b"]
            assert h5.attrs["status"] == layout.FILE_COMPLETED
            assert int(h5.attrs["n_written"]) == N_IMAGES
            ids = h5[layout.IMAGE_ID][:]
            assert list(ids) == list(range(1, N_IMAGES + 1))
            data = h5[layout.DATA]
            assert data.shape == (N_IMAGES, 2048, 1024)
            for row, image_id in enumerate(ids):
                expected = expected_image(config, int(image_id))
                if image_id == DROP[0]:  # the lost packet's 4 rows of module 2 stay 0
                    lost = slice(1024 + 4 * DROP[2], 1024 + 4 * DROP[2] + 4)
                    assert not data[row, lost].any()
                    expected[lost] = 0
                np.testing.assert_array_equal(data[row], expected)
            bad = ids == DROP[0]
            status, missing = h5[layout.STATUS][:], h5[layout.N_MISSING_PACKETS][:]
            assert list(status[bad]) == [ImageStatus.MISSING_PACKETS] and not status[~bad].any()
            assert list(missing[bad]) == [1] and not missing[~bad].any()
            b_status = h5[master.host_dataset("daq-b", layout.STATUS)][:]
            b_missing = h5[master.host_dataset("daq-b", layout.N_MISSING_PACKETS)][:]
            assert list(b_status[bad]) == [ImageStatus.MISSING_PACKETS] and not b_status[~bad].any()
            assert list(b_missing[bad]) == [1] and not b_missing[~bad].any()
            assert not h5[master.host_dataset("daq-a", layout.STATUS)][:].any()
            assert not h5[master.host_dataset("daq-a", layout.N_MISSING_PACKETS)][:].any()
            assert list(h5[master.host_dataset("daq-b", layout.IMAGE_ID)][:]) == list(ids)
        # accounting: written + not written = requested, the rows' statuses add up, REST agrees
        counts = master.master_accounting(output)
        assert ImageAccounting(n_requested=N_IMAGES, n_written=counts["n_written"], n_good=counts["n_good"],
                               n_incomplete=counts["n_incomplete"], n_lost=counts["n_lost"],
                               n_not_written=N_IMAGES - tracked["n_written"]).balanced()
        assert counts["n_written"] == N_IMAGES
        assert (counts["n_good"], counts["n_incomplete"]) == (N_IMAGES - 1, 1)
        for host in HOSTS:  # no host held the full image: each part is its host's region
            with h5py.File(out_dir / master.part_file_name(output, 0, host), "r") as part:
                assert part[layout.DATA].shape == (N_IMAGES, 1024, 1024)
    assert daq.stopped_cleanly()


def test_a_host_that_is_down_fails_the_request_naming_it(tmp_path: Path) -> None:
    """Only daq-a runs: its agent writes its part and the master, waits ``FAULT_BOUND`` for daq-b's
    part, finishes the master ``interrupted`` naming it; REST fails the request naming daq-b's
    writer agent. File and REST agree: no leading row is complete in every part."""
    config = make_config("jungfrau", n_modules=4, readout_hosts=HOSTS, frame_ring_slots=64,
                         image_ring_slots=64)
    with SplitDaq(config, tmp_path, ["daq-a"]) as daq:
        daq.send(N_IMAGES)
        output = daq.out_dir / "run.h5"
        answer = requests.post(f"{daq.url}/write_async", json={"output_file": str(output),
                                                               "n_images": N_IMAGES, "start_id": 1})
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]

        def final() -> dict[str, Any] | None:
            state = requests.get(f"{daq.url}/requests/{request_id}", timeout=30).json()
            return state if state["state"] in ("completed", "failed", "interrupted") else None

        bound = UNSTARTED_BOUND + 2 * FAULT_BOUND + 60  # the master's wait, REST's bound, a loaded machine
        tracked = wait_for(final, "the request final", bound)
        assert tracked["state"] == "failed", tracked
        assert "writer_agent@daq-b did not end the request" in tracked["message"], tracked
        assert tracked["services"] == {"writer_agent@daq-a": "request_success"}, tracked
        with h5py.File(output, "r") as h5:
            assert h5.attrs["status"] == layout.FILE_INTERRUPTED
            assert "run_daq-b_part0.h5 of another readout host is missing" in h5.attrs["end_reason"]
            assert int(h5.attrs["n_written"]) == 0  # no row is in every part
            assert list(h5[master.host_dataset("daq-a", layout.IMAGE_ID)][:]) == list(range(1, N_IMAGES + 1))
            assert list(h5[layout.STATUS][:]) == [layout.STATUS_NOT_WRITTEN] * N_IMAGES
        counts = master.master_accounting(output)
        assert (tracked["n_written"], counts["n_written"]) == (0, 0)
        assert ImageAccounting(n_requested=N_IMAGES, n_written=counts["n_written"], n_good=counts["n_good"],
                               n_incomplete=counts["n_incomplete"], n_lost=counts["n_lost"],
                               n_not_written=N_IMAGES - tracked["n_written"]).balanced()
    assert daq.stopped_cleanly()
