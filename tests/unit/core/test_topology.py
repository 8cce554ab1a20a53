"""The topology: which processes one detector runs, with which arguments, and which of them a config
change restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.testing import make_config
from daq_backend.topology import Role, ServiceSpec, Topology, restart_set


def changed(config: DetectorConfig, **fields: object) -> DetectorConfig:
    return parse_config({**config.to_json_dict(), **fields})


def test_std_daq_up_runs_a_receiver_per_module_assembler_writers_rest_and_streams() -> None:
    config = make_config("jungfrau", n_modules=2)
    path = Path("/etc/det.json")
    topology = Topology(config, path, "embedded://x", rest_port=5000, stream_send="tcp://*:9000",
                        live_stream="tcp://*:9100", live_stream_args=("--mode", "periodic"),
                        receiver_args=("--rcvbuf", "4096"), log_level="warning")
    specs = {s.name: s for s in topology.services()}
    assert list(specs) == ["receiver-0", "receiver-1", "assembler", "h5-writer", "writer-agent",
                           "stream-send", "live-stream", "rest"]
    assert [s.role for s in specs.values()] == [
        Role.RECEIVER, Role.RECEIVER, Role.ASSEMBLER, Role.H5_WRITER, Role.WRITER_AGENT, Role.STREAM_SEND,
        Role.LIVE_STREAM, Role.REST]
    receiver = specs["receiver-1"]
    assert receiver.argv is not None and receiver.argv[1:] == (
        "-m", "daq_backend.readout.receiver", str(path), "1", "--rcvbuf", "4096", "--log-level", "WARNING")
    assert receiver.shm_names == (ipc.frame_ring_name(config.detector_name, 1),) and receiver.module == 1
    assert specs["assembler"].shm_names == (ipc.image_ring_name(config.detector_name),)
    agent = specs["writer-agent"].argv
    assert agent is not None and agent[3:7] == ("writer-agent", str(path), "--broker-url", "embedded://x")
    live = specs["live-stream"].argv
    assert live is not None and ("--mode", "periodic") == live[-4:-2]
    rest = specs["rest"].argv
    assert rest is not None and rest[3:9] == ("rest", str(path), "--rest-port", "5000", "--host", "127.0.0.1")
    assert all(s.reports_stats for s in specs.values() if s.role is not Role.REST)
    launched = Topology(config, path, "", writer=False, launcher=("/bin/sh", "-c", 'exec "$@"', "sh"))
    assert all(s.argv is not None and s.argv[:4] == ("/bin/sh", "-c", 'exec "$@"', "sh")
               for s in launched.services())
    assert [s.name for s in Topology(config, path, "", readout_processes=False, writer=False,
                                     rest_port=1).services()] == ["rest"]


@pytest.mark.parametrize(("fields", "restarted"), [
    ({"start_udp_port": 40000}, {"receiver-0", "receiver-1"}),
    ({"udp_host": "0.0.0.0"}, {"receiver-0", "receiver-1"}),
    ({"receiver_rt_priority": 0}, {"receiver-0", "receiver-1"}),
    ({"module_sync_timeout": 3.0}, {"assembler", "h5-writer", "writer-agent", "stream-send"}),
    ({"writer_user_id": 1000}, {"h5-writer", "writer-agent"}),
    ({"image_pixel_height": 1024, "image_pixel_width": 1024, "module_positions": {
        "0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023]}},
     {"receiver-0", "receiver-1", "assembler", "h5-writer", "writer-agent", "stream-send"}),
    ({"some_field_of_another_service": 1},
     {"receiver-0", "receiver-1", "assembler", "h5-writer", "writer-agent", "stream-send"}),
    ({}, set()),
], ids=["port", "host", "rt-priority", "sync-timeout", "writer-user", "geometry", "unknown", "nothing"])
def test_a_change_restarts_the_readers_of_its_fields(fields: dict[str, object], restarted: set[str]) -> None:
    config = make_config("jungfrau", n_modules=2)
    services = Topology(config, Path("x.json"), "", rest_port=1, stream_send="tcp://*:1").services()
    assert restart_set(config, changed(config, **fields), services) == restarted
    assert "rest" not in restart_set(config, changed(config, **fields), services)


def test_a_service_has_a_command_line_or_a_target() -> None:
    with pytest.raises(ValueError, match="exactly one of argv and target"):
        ServiceSpec("x")


def test_output_roots_go_to_every_process_that_decides_where_a_file_goes() -> None:
    import argparse

    from daq_backend.cli import add_up, up_topology

    config = make_config("jungfrau")
    parser = argparse.ArgumentParser()
    add_up(parser.add_subparsers())
    args = parser.parse_args(["up", "det.json", "--output-root", "/data/a", "--output-root", "~/b"])
    topology = up_topology(args, config, "embedded://x")
    roots = ("--output-root=/data/a", f"--output-root={Path('~/b').expanduser()}")
    for spec in topology.services():
        assert spec.argv is not None
        given = tuple(a for a in spec.argv if a.startswith("--output-root"))
        assert given == (roots if spec.role in (Role.H5_WRITER, Role.WRITER_AGENT, Role.REST) else ()), spec
    none = up_topology(parser.parse_args(["up", "det.json"]), config, "embedded://x")
    assert not [a for s in none.services() for a in s.argv or () if a.startswith("--output-root")]


def test_n_writers_runs_one_h5_writer_per_index_with_its_own_sockets() -> None:
    config = make_config("jungfrau", n_writers=3)
    det = config.detector_name
    specs = {s.name: s for s in Topology(config, Path("/etc/det.json"), "embedded://x").services()}
    assert [n for n in specs if n.startswith("h5-writer")] == ["h5-writer-0", "h5-writer-1", "h5-writer-2"]
    for k in range(3):
        spec = specs[f"h5-writer-{k}"]
        assert spec.role is Role.H5_WRITER and spec.writer_index == k and spec.reports_stats
        assert spec.argv is not None
        assert spec.argv[3:7] == ("h5-writer", "/etc/det.json", "--writer-index", str(k))
        assert spec.ipc_addresses == (ipc.writer_status_address(det, k),)
    assert set(specs["writer-agent"].ipc_addresses) == {ipc.writer_agent_address(det, k) for k in range(3)}
    assert len({ipc.writer_agent_address(det, k) for k in range(3)} | {ipc.writer_agent_address(det)}) == 4
    one = {s.name: s for s in Topology(make_config("jungfrau"), Path("x.json"), "").services()}
    assert "h5-writer" in one and one["h5-writer"].writer_index is None  # one writer: today's name
    assert "--writer-index" not in (one["h5-writer"].argv or ())
    services = [*one.values(), *specs.values()]
    assert restart_set(config, changed(config, n_writers=2), services) >= {"writer-agent", "h5-writer-0"}
    assert not restart_set(config, changed(config, n_writers=2), services) & {"receiver-0", "assembler"}


def test_n_writers_is_1_to_32() -> None:
    from daq_backend.config import ConfigError

    assert make_config("jungfrau").n_writers == 1
    for bad in (0, 33):
        with pytest.raises(ConfigError, match="n_writers"):
            make_config("jungfrau", n_writers=bad)
