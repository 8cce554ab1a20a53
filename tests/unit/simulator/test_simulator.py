"""The UDP detector simulator over real loopback UDP, its pattern, its CLI and the simulated detector
control."""

from __future__ import annotations

import json
import random
import selectors
import socket
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daq_backend.config import DetectorConfig, load_config, parse_config
from daq_backend.control.base import DetectorControl, DetectorStateError, ParameterError
from daq_backend.control.simulated import SimulatedDetectorControl
from daq_backend.detectors import layout_for, unpack_12bit
from daq_backend.simulator.pattern import module_datagrams, pattern_source
from daq_backend.simulator.sender import DetectorSimulator, main
from daq_backend.testing import wait_for

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TIMEOUT = 60.0


class Collector:
    """Binds ``n`` consecutive UDP ports on 127.0.0.1 and records every datagram as (module, bytes)."""

    def __init__(self, n: int) -> None:
        self.socks = self._bind(n)
        self.base = self.socks[0].getsockname()[1]
        self.received: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(n: int) -> list[socket.socket]:
        for _ in range(200):
            base = random.randrange(20000, 60000 - n)
            socks: list[socket.socket] = []
            try:
                for port in range(base, base + n):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s)
                    try:
                        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 64 << 20)
                    except OSError:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
                    s.bind(("127.0.0.1", port))
                return socks
            except OSError:
                for s in socks:
                    s.close()
        raise RuntimeError(f"no {n} consecutive free UDP ports")

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        for module, s in enumerate(self.socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, module)
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                while True:
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    self.received.append((key.data, data))
        sel.close()

    def wait_for(self, n: int) -> list[tuple[int, bytes]]:
        wait_for(lambda: len(self.received) >= n, f"{n} datagrams (have {len(self.received)})")
        time.sleep(0.05)  # anything extra (duplicates, garbage) arrives with the rest
        return list(self.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_port(config: DetectorConfig, port: int) -> DetectorConfig:
    return parse_config(
        {**config.to_json_dict(), "start_udp_port": port, "detector_name": f"t{uuid.uuid4().hex[:8]}"}
    )


def jf(n_modules: int = 1, **fields: Any) -> DetectorConfig:
    return parse_config(
        {
            "detector_name": "T",
            "detector_type": "jungfrau",
            "n_modules": n_modules,
            "bit_depth": 16,
            "image_pixel_height": 512 * n_modules,
            "image_pixel_width": 1024,
            "start_udp_port": 50000,
            **fields,
        }
    )


def packet_sequence(
    config: DetectorConfig, received: list[tuple[int, bytes]]
) -> dict[tuple[int, int], list[int]]:
    """(image id, module) -> packet indices in arrival order, for valid datagrams."""
    layout = layout_for(config)
    out: dict[tuple[int, int], list[int]] = {}
    for module, data in received:
        info = layout.parse(data)
        if info is not None:
            out.setdefault((layout.image_id(info), module), []).append(info.packet_index)
    return out


# -- pattern ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,modulus,factor",
    [
        ("jungfrau_4m", 16381, 1),
        ("eiger_500k_16", 65521, 1),
        ("eiger_500k_32", 65521, 65537),
        ("gigafrost_2016", 4093, 1),
    ],
)
def test_pattern_formula(name: str, modulus: int, factor: int) -> None:
    config = load_config(CONFIGS / f"{name}.json")
    source = pattern_source(config)
    for image_id, module in ((1, 0), (5000, 1), (2**31 + 7, config.n_modules - 1)):
        values = source.module_values(module, image_id).reshape(-1)
        for p in (0, 1, 511, 512, values.size - 1):
            assert values[p] == (7 * image_id + 131 * module + p) % modulus * factor
        frame = source.frame_bytes(module, image_id)
        assert frame.size == layout_for(config).frame_nbytes
        if config.detector_type.value == "gigafrost":
            assert np.array_equal(unpack_12bit(frame), values)
        else:
            assert np.array_equal(frame.view(values.dtype), values)


def test_pattern_converted_jungfrau_uses_every_gain_code(tmp_path: Path) -> None:
    config = jf(pedestal_gain_file=str(tmp_path / "unused.h5"))
    values = pattern_source(config).module_values(0, 3).reshape(-1)
    v = (7 * 3 + np.arange(values.size)) % 16381
    assert np.array_equal(values & 0x3FFF, v)
    assert np.array_equal(values >> 14, v % 4)
    assert set(np.unique(values >> 14).tolist()) == {0, 1, 2, 3}


def test_module_datagram_headers() -> None:
    config = jf(2)
    datagrams = module_datagrams(config, 1, 42)
    assert len(datagrams) == 128 and all(len(d) == 8240 for d in datagrams)
    head = np.frombuffer(b"".join(d[:48] for d in datagrams), dtype=layout_for(config).header_dtype)
    assert np.all(head["framenum"] == 42) and head["packetnum"].tolist() == list(range(128))
    assert np.all(head["bunchid"] == 0) and np.all(head["module_id"] == 1)
    assert np.all(head["detector_type"] == 3) and np.all(head["header_version"] == 2)
    by_pulse = jf(2, image_id_source="pulse_id")
    head = np.frombuffer(module_datagrams(by_pulse, 0, 42)[0][:48], dtype=layout_for(config).header_dtype)
    assert head["bunchid"][0] == 42.0
    custom = np.frombuffer(
        module_datagrams(config, 0, 42, frame_number=9, pulse_id=1000)[0][:48],
        dtype=layout_for(config).header_dtype,
    )
    assert custom["framenum"][0] == 9 and custom["bunchid"][0] == 1000.0


# -- sending over loopback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,use_sendmmsg",
    [
        ("jungfrau_1m", True),
        ("eiger_500k_32", True),
        ("gigafrost_128x480", True),
        ("gigafrost_128x480", False),
    ],
)
def test_simulator_sends_exact_datagrams_to_module_ports(name: str, use_sendmmsg: bool) -> None:
    base = load_config(CONFIGS / f"{name}.json")
    n_images = 3
    with Collector(base.n_modules) as collector:
        config = with_port(base, collector.base)
        with DetectorSimulator(
            config, rate_hz=0, n_images=n_images, start_id=10, use_sendmmsg=use_sendmmsg
        ) as sim:
            assert sim.uses_sendmmsg is use_sendmmsg
            sim.run()
            layout = layout_for(config)
            total = n_images * config.n_modules * layout.packets_per_frame
            assert (sim.n_sent_images, sim.n_sent_packets, sim.last_sent_id) == (n_images, total, 12)
            received = collector.wait_for(total)
    expected = Counter(
        (m, d)
        for image_id in (10, 11, 12)
        for m in config.required_modules
        for d in module_datagrams(config, m, image_id)
    )
    assert Counter(received) == expected
    # packets of one module frame arrive in order
    assert all(
        seq == list(range(layout.packets_per_frame)) for seq in packet_sequence(config, received).values()
    )


@pytest.mark.parametrize("name", ["jungfrau_1m", "eiger_500k_32", "gigafrost_128x480"])
def test_frame_addresses_point_at_frame_bytes(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.json")
    source = pattern_source(config)
    ids = np.array([0, 1, 2, 7, 12345, 2**31 + 3])
    for m in config.required_modules:
        expected = [source.frame_bytes(m, int(i)).__array_interface__["data"][0] for i in ids]
        assert source.frame_addresses(m, ids).tolist() == expected
    modules = tuple(config.required_modules)
    table = source.address_table(modules, ids)
    assert table.shape == (len(ids), len(modules))
    assert all(table[:, k].tolist() == source.frame_addresses(m, ids).tolist() for k, m in enumerate(modules))


@pytest.mark.parametrize("max_batch", [1, 2, None])
def test_batches_send_the_same_datagrams_around_a_faulty_image(max_batch: int | None) -> None:
    """Images batched into one sendmmsg, split around an image with a fault, with pulse ids."""
    data = jf(2).to_json_dict()
    data["image_id_source"] = "pulse_id"
    base = parse_config(data)
    with Collector(2) as collector:
        config = with_port(base, collector.base)
        with DetectorSimulator(config, n_images=7, start_id=20, drop_frames={(23, 1)},
                               max_batch=max_batch) as sim:
            assert sim.max_batch == (max_batch or 4)  # 1024 datagrams // 256 per image
            sim.run()
        n_expected = 7 * 2 * 128 - 128
        assert (sim.n_sent_images, sim.n_sent_packets, sim.last_sent_id) == (7, n_expected, 26)
        received = collector.wait_for(n_expected)
    expected = Counter(
        (m, d) for image_id in range(20, 27) for m in config.required_modules
        if (image_id, m) != (23, 1) for d in module_datagrams(config, m, image_id)
    )
    assert Counter(received) == expected


def test_high_rates_send_the_images_due_together_and_never_run_ahead() -> None:
    with Collector(8) as collector:
        config = with_port(load_config(CONFIGS / "gigafrost_128x480.json"), collector.base)
        with DetectorSimulator(config, rate_hz=20000, n_images=400, start_id=1) as sim:
            sim.run()
            assert sim.n_sent_images == 400
            assert sim.elapsed >= 399 / 20000  # deadlines only move later, never earlier
        collector.wait_for(400 * 16)


def test_drop_duplicate_and_reorder() -> None:
    with Collector(2) as collector:
        config = with_port(jf(2), collector.base)
        sim = DetectorSimulator(
            config,
            n_images=3,
            start_id=1,
            drop_packets={(1, 0, 0), (1, 0, 64), (1, 1, 127)},
            drop_frames={(2, 1)},
            duplicate={(2, 0, 5)},
            out_of_order={(1, 1)},
        )
        with sim:
            sim.run()
        n_expected = 3 * 2 * 128 - 3 - 128 + 1
        assert sim.n_sent_packets == n_expected
        assert (sim.n_dropped_packets, sim.n_duplicated_packets) == (3 + 128, 1)
        seq = packet_sequence(config, collector.wait_for(n_expected))
    assert sum(len(s) for s in seq.values()) == n_expected
    assert seq[(1, 0)] == [i for i in range(128) if i not in (0, 64)]
    assert seq[(1, 1)] == [0, *range(126, 0, -1)]  # reversed middle; the last packet was dropped
    assert seq[(2, 0)] == [0, 1, 2, 3, 4, 5, 5, *range(6, 128)]
    assert (2, 1) not in seq
    assert seq[(3, 0)] == seq[(3, 1)] == list(range(128))


def test_drop_packets_callable() -> None:
    with Collector(1) as collector:
        config = with_port(jf(), collector.base)
        with DetectorSimulator(
            config, n_images=2, drop_packets=lambda img, mod, pkt: img == 2 and pkt % 10 == 0
        ) as sim:
            sim.run()
        seq = packet_sequence(config, collector.wait_for(256 - 13))
    assert sim.n_dropped_packets == 13
    assert seq[(1, 0)] == list(range(128))
    assert seq[(2, 0)] == [i for i in range(128) if i % 10]


@pytest.mark.parametrize("name", ["jungfrau_1m", "gigafrost_128x480"])
def test_garbage_every(name: str) -> None:
    base = load_config(CONFIGS / f"{name}.json")
    with Collector(base.n_modules) as collector:
        config = with_port(base, collector.base)
        layout = layout_for(config)
        n_valid = 4 * config.n_modules * layout.packets_per_frame
        with DetectorSimulator(config, n_images=4, garbage_every=7) as sim:
            sim.run()
        assert sim.n_garbage == n_valid // 7
        received = collector.wait_for(n_valid + n_valid // 7)
    garbage = [d for _, d in received if layout.parse(d) is None]
    assert len(garbage) == n_valid // 7
    sizes = Counter(len(d) for d in garbage)
    assert set(sizes) == {17, layout.max_datagram + 100, layout.datagram_size(0)}
    seq = packet_sequence(config, received)
    assert (
        all(s == list(range(layout.packets_per_frame)) for s in seq.values())
        and len(seq) == 4 * config.n_modules
    )


def test_rate_pacing_never_runs_ahead() -> None:
    with Collector(1) as collector:
        config = with_port(jf(), collector.base)
        with DetectorSimulator(config, rate_hz=200, n_images=6, start_id=100) as sim:
            sim.run()
            # deadlines are absolute: image k is not sent before t0 + k / rate
            assert sim.elapsed >= 5 / 200
            assert 0 < sim.achieved_rate <= 6 / (5 / 200)
        seq = packet_sequence(config, collector.wait_for(6 * 128))
    assert sorted(seq) == [(i, 0) for i in range(100, 106)]


def test_thread_mode_start_stop() -> None:
    with Collector(1) as collector:
        config = with_port(jf(), collector.base)
        sim = DetectorSimulator(config, rate_hz=100, n_images=None)
        try:
            sim.start()
            assert sim.running
            with pytest.raises(RuntimeError, match="already running"):
                sim.start()
            wait_for(lambda: len(collector.received) >= 3 * 128, "three images")
            sim.stop()
            assert not sim.running and sim.error is None
            sent = sim.n_sent_images
            assert sent >= 3
            collector.wait_for(sent * 128)
            time.sleep(0.1)
            assert sim.n_sent_images == sent  # nothing more after stop
        finally:
            sim.close()


def test_simulator_validates_arguments() -> None:
    with pytest.raises(ValueError, match="rate_hz"):
        DetectorSimulator(jf(), rate_hz=-1)
    with pytest.raises(ValueError, match="max_batch"):
        DetectorSimulator(jf(), max_batch=0)
    with pytest.raises(ValueError, match="drop_packets"):
        DetectorSimulator(jf(), drop_packets=[(1, 2)])
    gf = load_config(CONFIGS / "gigafrost_128x480.json")
    with pytest.raises(ValueError, match="32 bit"):
        DetectorSimulator(gf, n_images=2, start_id=2**32 - 1)


# -- command line ----------------------------------------------------------------------------------


def test_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Collector(1) as collector:
        path = tmp_path / "jf.json"
        path.write_text(json.dumps(with_port(jf(), collector.base).to_json_dict()))
        code = main(
            [
                str(path),
                "--rate",
                "0",
                "--n-images",
                "2",
                "--start-id",
                "5",
                "--drop-packet",
                "5:0:3",
                "--duplicate",
                "6:0:0",
                "--no-progress",
            ]
        )
        assert code == 0
        assert "sent 2 images" in capsys.readouterr().out
        seq = packet_sequence(load_config(path), collector.wait_for(256))
    assert seq[(5, 0)] == [i for i in range(128) if i != 3]
    assert seq[(6, 0)] == [0, *range(128)]
    assert main([str(tmp_path / "missing.json"), "--n-images", "1"]) == 2
    assert "cannot read detector config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--n-images", "1", "--drop-packet", "5:0"])
    assert exc.value.code == 2


# -- simulated detector control --------------------------------------------------------------------


def test_simulated_control_settings() -> None:
    control = SimulatedDetectorControl(jf())
    try:
        assert isinstance(control, DetectorControl)
        cfg = control.get_config()
        assert list(cfg) == [
            "det_name",
            "triggers",
            "timing",
            "frames",
            "period",
            "exptime",
            "dr",
            "speed",
            "tengiga",
            "threshold",
        ]
        assert cfg["det_name"] == "T" and cfg["timing"] == "timingMode.AUTO_TIMING" and cfg["dr"] == 16
        new = control.set_config(
            {"frames": 3, "triggers": 2, "period": 0.002, "timing": "timingMode.TRIGGER_EXPOSURE"}
        )
        assert (new["frames"], new["triggers"], new["period"], new["timing"]) == (
            3,
            2,
            0.002,
            "timingMode.TRIGGER_EXPOSURE",
        )
        with pytest.raises(ParameterError, match="Parameter not valid: bogus"):
            control.set_config({"frames": 5, "bogus": 1})
        with pytest.raises(ParameterError, match="frames"):
            control.set_config({"frames": 0})
        with pytest.raises(ParameterError, match="dr"):
            control.set_config({"dr": 8})  # a Jungfrau only does 16 bit
        assert control.get_config()["frames"] == 3  # a rejected request changed nothing
        eiger = SimulatedDetectorControl(load_config(CONFIGS / "eiger_500k_16.json"))
        assert eiger.set_config({"dr": 32})["dr"] == 32
        with pytest.raises(ParameterError, match="dr"):
            eiger.set_config({"dr": 4})
        eiger.close()
    finally:
        control.close()


def test_simulated_control_acquisitions_continue_ids() -> None:
    with Collector(2) as collector:
        control = SimulatedDetectorControl(jf(2), start_udp_port=1)
        try:
            with pytest.raises(ParameterError, match="start_udp_port"):
                control.configure_receiver("127.0.0.1", 65535)
            control.configure_receiver("127.0.0.1", collector.base)
            assert control.status() == "IDLE"
            with pytest.raises(DetectorStateError, match="not running"):
                control.stop()
            control.set_config({"frames": 2, "triggers": 2, "period": 0.001})
            control.start()
            assert control.wait(TIMEOUT)
            assert control.status() == "IDLE" and control.next_image_id == 5
            control.set_config({"frames": 3, "triggers": 1})
            control.start()
            assert control.wait(TIMEOUT)
            seq = packet_sequence(jf(2), collector.wait_for(7 * 2 * 128))
            assert sorted({img for img, _ in seq}) == list(range(1, 8))
            assert all(s == list(range(128)) for s in seq.values())

            control.set_config({"frames": 1_000_000, "period": 0.01})
            control.start()
            assert control.status() == "RUNNING"
            with pytest.raises(DetectorStateError, match="already running"):
                control.start()
            with pytest.raises(DetectorStateError, match="running"):
                control.set_config({"frames": 1})
            wait_for(lambda: len(collector.received) >= 8 * 2 * 128, "the third acquisition's first image")
            control.stop()
            assert control.status() == "IDLE"
            assert control.next_image_id > 8
        finally:
            control.close()
        control.close()  # idempotent
        with pytest.raises(DetectorStateError, match="closed"):
            control.start()


def test_parallel_processes_send_every_module_once_on_one_schedule() -> None:
    from daq_backend.simulator.sender import ParallelSimulator

    base = load_config(CONFIGS / "gigafrost_128x480.json")
    with Collector(base.n_modules) as collector:
        config = with_port(base, collector.base)
        sim = ParallelSimulator(config, 3, rate_hz=0, n_images=5, start_id=40, drop_frames={(42, 5)})
        assert [list(g) for g in sim.groups] == [[0, 3, 6], [1, 4, 7], [2, 5]]
        with sim:
            sim.run()
        n_expected = 5 * 8 * 2 - 2
        assert (sim.n_sent_images, sim.n_sent_packets, sim.n_dropped_packets) == (5, n_expected, 2)
        assert sim.last_sent_id == 44 and "from 3 processes" in sim.summary()
        received = collector.wait_for(n_expected)
    expected = Counter(
        (m, d) for image_id in range(40, 45) for m in config.required_modules
        if (image_id, m) != (42, 5) for d in module_datagrams(config, m, image_id)
    )
    assert Counter(received) == expected


def test_a_module_subset_is_checked() -> None:
    with pytest.raises(ValueError, match="subset"):
        DetectorSimulator(jf(2), modules=[2])
    with pytest.raises(ValueError, match="processes"):
        from daq_backend.simulator.sender import ParallelSimulator

        ParallelSimulator(jf(2), 0)


def test_cli_sends_from_several_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Collector(2) as collector:
        path = tmp_path / "jf2.json"
        path.write_text(json.dumps(with_port(jf(2), collector.base).to_json_dict()))
        assert main([str(path), "--rate", "0", "--n-images", "3", "--processes", "2", "--no-progress"]) == 0
        assert "sent 3 images (768 packets)" in capsys.readouterr().out
        seq = packet_sequence(load_config(path), collector.wait_for(768))
    assert sorted(seq) == [(i, m) for i in (1, 2, 3) for m in (0, 1)]
