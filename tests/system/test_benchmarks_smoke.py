"""The benchmarks' machinery, fast and without the virtual detectors: the rmem_max save/restore (on a
stand-in sysctl file), result parsing, the report, the plot, the process monitor, the C drain over real
loopback UDP, the simulator-ceiling benchmark and the pipeline benchmark's orchestration end to end on
the built-in simulator, and that RESULTS.md and the README's benchmark table are exactly what
``benchmarks/report.py`` writes from the committed records (a hand edit fails here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _records  # noqa: E402
import _report  # noqa: E402
import _vmmem  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_sender  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
from _drain import DrainResult, UdpDrain  # noqa: E402
from _net import bound_udp_ports, free_udp_base, parse_ss  # noqa: E402
from _ours import H5Count  # noqa: E402
from _procmon import ProcessMonitor, Series  # noqa: E402
from _report import RunResult, parse_sender_report, ratios, render_markdown, summarize  # noqa: E402
from _rmem import (  # noqa: E402
    BenchmarkInterrupted,
    RmemMaxError,
    recover_stale_state,
    socket_buffer_cap,
)
from _sls import SLS_FRAME_HEADER, read_sls_files, sls_frames_on_disk  # noqa: E402

WAIT_S = 60.0


# -- VM memory: page reporting off and pages touched, restored after -----------------------------------


def test_touch_writes_and_removes_its_file(tmp_path: Path) -> None:
    result = _vmmem.touch(0.25, tmp_path)
    assert result.gib == 0.25 and result.seconds > 0
    assert result.describe().startswith("touched 0.25 GiB")
    assert list(tmp_path.iterdir()) == []


def test_backed_memory_switches_reporting_off_and_restores_it(tmp_path: Path, monkeypatch) -> None:
    param, state = tmp_path / "page_reporting_order", tmp_path / "state.json"
    param.write_text("9\n")
    monkeypatch.setattr(_vmmem, "PAGE_REPORTING_ORDER", param)
    monkeypatch.setattr(_vmmem, "STATE_PATH", state)
    with pytest.raises(ZeroDivisionError), _vmmem.backed_memory(0.25, tmp_path) as facts:
        assert param.read_text().strip() == str(_vmmem.REPORTING_OFF_ORDER)
        assert json.loads(state.read_text())["original"] == 9
        assert "free page reporting off" in facts
        1 / 0  # noqa: B018 - an error inside the block must still restore the machine's value
    assert param.read_text().strip() == "9"
    assert not state.exists()


def test_backed_memory_without_page_reporting_only_touches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_vmmem, "PAGE_REPORTING_ORDER", tmp_path / "absent")
    with _vmmem.backed_memory(0.25, tmp_path) as facts:
        assert facts.startswith("no free page reporting; touched")
    assert list(tmp_path.iterdir()) == []


# -- rmem_max save / restore ------------------------------------------------------------------------


@pytest.fixture
def sysctl(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for /proc/sys/net/core/rmem_max holding 4 MiB, and a private state file."""
    path = tmp_path / "rmem_max"
    path.write_text("4194304\n")
    return path, tmp_path / "state.json"


def test_cap_is_raised_inside_and_restored_after(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    with socket_buffer_cap(2**31 - 1, path, state) as cap:
        assert cap == 2**31 - 1
        assert path.read_text().strip() == str(2**31 - 1)
        assert json.loads(state.read_text())["original"] == 4194304
    assert path.read_text().strip() == "4194304"
    assert not state.exists()


def test_cap_is_restored_after_an_exception(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    with pytest.raises(ZeroDivisionError), socket_buffer_cap(1 << 30, path, state):
        _ = 1 / 0
    assert path.read_text().strip() == "4194304"
    assert not state.exists()


def test_cap_is_restored_on_sigterm_and_the_handler_put_back(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(BenchmarkInterrupted) as info, socket_buffer_cap(1 << 30, path, state):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(WAIT_S)  # the handler raises long before this ends
    assert info.value.signum == signal.SIGTERM
    assert path.read_text().strip() == "4194304"
    assert signal.getsignal(signal.SIGTERM) is before


def test_cap_is_restored_on_ctrl_c(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    with pytest.raises(KeyboardInterrupt), socket_buffer_cap(1 << 30, path, state):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(WAIT_S)
    assert path.read_text().strip() == "4194304"


def test_none_or_same_value_leaves_the_setting_alone(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    for value in (None, 4194304):
        with socket_buffer_cap(value, path, state) as cap:
            assert cap == 4194304
            assert not state.exists()
    assert path.read_text().strip() == "4194304"


def test_a_killed_benchmarks_value_is_restored_by_the_next(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(f"{2**31 - 1}\n")  # what the SIGKILLed benchmark left
    state.write_text(json.dumps({"original": 4194304, "pid": dead.pid}))
    assert recover_stale_state(path, state) == 4194304
    assert path.read_text().strip() == "4194304"
    assert not state.exists()


def test_a_live_benchmarks_state_is_not_touched(sysctl: tuple[Path, Path]) -> None:
    path, state = sysctl
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state.write_text(json.dumps({"original": 1000, "pid": alive.pid}))
        with pytest.raises(RmemMaxError, match="another benchmark"):
            recover_stale_state(path, state)
    finally:
        alive.kill()
        alive.wait()
    assert path.read_text().strip() == "4194304"


def test_bad_values_and_unwritable_sysctl_are_named(sysctl: tuple[Path, Path], tmp_path: Path) -> None:
    path, state = sysctl
    with pytest.raises(RmemMaxError, match="outside"), socket_buffer_cap(2**31, path, state):
        pass
    assert path.read_text().strip() == "4194304"
    missing = tmp_path / "missing"
    with pytest.raises(RmemMaxError, match="cannot read"), socket_buffer_cap(1 << 30, missing, state):
        pass


# -- parsing ----------------------------------------------------------------------------------------


def test_ss_output_is_parsed() -> None:
    out = ("UNCONN 4096   0          127.0.0.1:31276      0.0.0.0:*   \n"
           "\t skmem:(r4096,rb8388608,t0,tb212992,f0,w0,o0,bl0,d215)\n")
    stats = parse_ss(out)
    assert stats is not None
    assert (stats.recv_q, stats.rcvbuf, stats.drops) == (4096, 8388608, 215)
    assert parse_ss("") is None


def test_bound_ports_are_read_from_the_kernel_table() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] in bound_udp_ports()


def test_sender_report_is_parsed() -> None:
    text = ('a log line {not json\n{"sent": 500, "start": 100.25, "end": 101.5, "summary": "sent 500"}\n'
            "another log line\n")
    report = parse_sender_report(text)
    assert (report.sent, report.start, report.seconds) == (500, 100.25, 1.25)
    with pytest.raises(ValueError, match="no sender report"):
        parse_sender_report("Traceback ...")


def test_drain_result_is_parsed() -> None:
    line = ('{"packets": 256, "bytes": 2109440, "frames_seen": 2, "frames_complete": 2, "first": 10.5, '
            '"last": 10.75, "rcvbuf": 4194304}')
    result = DrainResult.parse(line)
    assert (result.packets, result.frames_complete, result.span) == (256, 2, 0.25)


def test_h5_counts_good_incomplete_missing_and_duplicates() -> None:
    ids = np.array([1, 2, 2, 4, 5, 99])
    status = np.array([0, 1, 0, 0, 3, 0])
    count = H5Count.from_arrays(ids, status, range(1, 7))
    assert count == H5Count(rows=6, good=3, incomplete=2, missing_ids=2, duplicate_ids=1,
                            bad_status={1: 1, 3: 1})


def test_sls_binary_files_are_counted(tmp_path: Path) -> None:
    frame_bytes = 64
    records = []
    for number, packets in ((1, 4), (2, 3), (3, 4)):
        header = struct.pack("<QII", number, 0, packets).ljust(SLS_FRAME_HEADER, b"\0")
        records.append(header + bytes(frame_bytes))
    (tmp_path / "run_d0_f0_0.raw").write_bytes(b"".join(records[:2]))
    (tmp_path / "run_d0_f1_0.raw").write_bytes(records[2] + b"partial")
    (tmp_path / "run_master_0.json").write_text("{}")
    files = read_sls_files(tmp_path, frame_bytes=frame_bytes, packets_per_frame=4)
    assert (files.frames, files.complete) == (3, 2)
    assert files.missing(range(1, 5)) == 1
    assert sls_frames_on_disk(tmp_path, frame_bytes=frame_bytes) == 3


# -- report and plot --------------------------------------------------------------------------------


def _run(variant: str, lost: int, cpu_s: float, repeat: int = 0, rate: float = 1000.0,
         buffer: str = "default") -> RunResult:
    frames = 1000
    procs = {"vserver": {"cpu_s": 0.8, "rss_start": 1, "rss_end": 1, "rss_max": 2},
             variant: {"cpu_s": cpu_s, "rss_start": 10_000_000, "rss_end": 11_000_000, "rss_max": 12_000_000}}
    return RunResult(case="jungfrau", variant=variant, buffer=buffer, rmem_max=4194304,
                     requested_rate_hz=rate, frames=frames, repeat=repeat, period_ms=1.0, frame_bytes=1 << 20,
                     send_wall_s=1.0, send_rate_hz=1000.0, caught=frames, written=frames - lost,
                     good=frames - lost, wall_s=1.0, procs=procs, kernel_drops=0, rcvbuf=8388608)


def _doc(runs: list[RunResult]) -> dict:
    return {
        "schema": _report.SCHEMA, "command": "python benchmarks/bench_pipeline.py --quick",
        "machine": {"date": "2026-01-01T00:00:00+00:00", "nproc": 2, "cpu_model": "test CPU",
                    "rmem_max": 4194304},
        "plan": {}, "runs": [r.to_dict() for r in runs], "notes": ["a note"],
        "multi": [{"detector": "gigafrost_128x480", "config": "configs/gigafrost_128x480.json",
                   "buffer": "default", "modules": 8, "image": "128x480x16bit",
                   "steps": [{"requested_rate_hz": 500.0, "frames": 500, "send_rate_hz": 499.0, "lost": 0,
                              "error": None},
                             {"requested_rate_hz": 1000.0, "frames": 1000, "send_rate_hz": 990.0, "lost": 7,
                              "error": None}],
                   "best": {"requested_rate_hz": 500.0, "send_rate_hz": 499.0, "gbps": 0.06,
                            "cpu_ms_per_frame": 0.5, "cores_per_gbps": 4.0},
                   "stopped_because": "7 frames lost at 1000 Hz", "sender_ceiling_hz": 21000.0}],
    }


def test_repeats_give_min_median_max_and_ratios() -> None:
    runs = [_run("slsReceiver", lost, 1.0, i) for i, lost in enumerate((290, 300, 310))]
    runs += [_run("ours", lost, cpu, i) for i, (lost, cpu) in enumerate(((3, 0.5), (1, 0.7), (2, 0.6)))]
    summary = summarize(runs)
    ours = summary[("jungfrau", 1000.0, False, "default", "ours")]
    assert (ours["lost"].lo, ours["lost"].med, ours["lost"].hi, ours["lost"].n) == (1, 2, 3, 3)
    assert ours["cpu_ms_per_frame"].med == pytest.approx(0.6)
    (row,) = ratios(summary)
    assert row["lost_ratio"] == pytest.approx(2 / 300)
    assert row["cpu_ratio"] == pytest.approx(0.6)
    assert runs[0].cores_per_gbps == pytest.approx(1.0 / (710 * (1 << 20) / 1e9))


def test_ratio_of_zero_losses_is_undefined_not_a_division_error() -> None:
    summary = summarize([_run("slsReceiver", 0, 1.0), _run("ours", 0, 0.5)])
    (row,) = ratios(summary)
    assert row["lost_ratio"] is None
    assert _report.fmt_ratio(row["lost_ratio"]) == "– (both 0)"


def test_markdown_has_every_table(tmp_path: Path) -> None:
    runs = [_run("drain", 0, 0.1), _run("slsReceiver", 290, 1.0), _run("ours", 2, 0.5),
            _run("ours", 0, 0.5, rate=0.0, buffer="large")]
    failed = _run("slsReceiver", 0, 1.0, repeat=1)
    failed.error = "RuntimeError: boom"
    doc = _doc([*runs, failed])
    text = render_markdown(doc)
    assert "| 1 kHz | default | ours | 1000 | 0.20 |" in text
    assert "| free-running (sender-paced) | large | ours |" in text
    assert "| 1 kHz | default | 1000 / 1000 | 2 / 290 | 0.01 |" in text
    assert "FAILED 1 kHz default slsReceiver repeat 1: RuntimeError: boom" in text
    assert ("| gigafrost_128x480 | 128x480x16bit | 8 | default | 21000 | 500→499 (0 lost); 1000→990 (7 lost) "
            "| 500 Hz |") in text
    json_path, md_path, markdown = _report.write_outputs(doc, tmp_path / "out" / "stamp")
    assert md_path.read_text() == markdown
    assert _report.load_doc(json_path)["runs"][0]["variant"] == "drain"


def test_plot_renders_from_a_result_file(tmp_path: Path) -> None:
    runs = []
    for rate in (100.0, 500.0, 1000.0, 0.0):
        for repeat in range(2):
            for buffer in ("default", "large"):
                runs += [_run("drain", 0, 0.1, repeat, rate, buffer),
                         _run("slsReceiver", 100 + repeat, 1.0, repeat, rate, buffer),
                         _run("ours", repeat, 0.5, repeat, rate, buffer)]
    sustained = _run("ours", 0, 5.0)
    sustained.sustained = True
    source = tmp_path / "result.json"
    source.write_text(json.dumps(_doc([*runs, sustained])))
    assert plot.main([str(source), "--out", str(tmp_path / "p.png")]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "p.png")
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert float(np.std(image)) > 0.01  # something was drawn


def test_plot_refuses_a_file_of_another_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "other.json"
    source.write_text(json.dumps({"schema": "something-else"}))
    assert plot.main([str(source)]) == 2
    assert "not a bench_pipeline result" in capsys.readouterr().err


# -- command line -----------------------------------------------------------------------------------


def test_quick_plan_and_bad_arguments() -> None:
    plan = bench_pipeline.make_plan(bench_pipeline.build_parser().parse_args(["--quick", "--periods", "2,0"]))
    assert (plan.frames, plan.sustained, plan.repeats, plan.periods_ms) == (200, 1000, 1, [2.0, 0.0])
    assert plan.points()[-1] == (1.0, 1000, True)
    assert [p[0] for p in plan.points()] == [2.0, 0.0, 1.0]
    with pytest.raises(SystemExit):
        bench_pipeline.build_parser().parse_args(["--variants", "ours,bogus"])
    with pytest.raises(SystemExit):
        bench_pipeline.build_parser().parse_args(["--periods", "1,-2"])
    with pytest.raises(SystemExit, match="--rcvbuf"):
        bench_pipeline.make_plan(bench_pipeline.build_parser().parse_args(["--rcvbuf", str(2**31)]))


# -- measuring instruments ---------------------------------------------------------------------------


def test_series_interpolates_cpu_between_samples() -> None:
    s = Series()
    for t, cpu, rss in ((0.0, 1.0, 10), (1.0, 2.0, 30), (2.0, 2.0, 20)):
        s.add(t, cpu, rss)
    assert s.cpu_at(0.5) == pytest.approx(1.5)
    assert s.cpu_at(-1.0) == 1.0 and s.cpu_at(9.0) == 2.0
    assert max(s.window(0.4, 1.2)) == 30


def test_monitor_sees_a_busy_child_use_cpu() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nwhile time.process_time() < 0.3: pass\ninput()"],
                             stdin=subprocess.PIPE)
    try:
        with ProcessMonitor(interval=0.02) as monitor:
            monitor.add("busy", child.pid)
            t0 = monitor.sample()
            deadline = time.monotonic() + WAIT_S
            usage = monitor.usage("busy", t0, monitor.sample())
            while usage is not None and usage.cpu_s < 0.2 and time.monotonic() < deadline:
                time.sleep(0.05)
                usage = monitor.usage("busy", t0, monitor.sample())
    finally:
        child.kill()
        child.wait()
    assert usage is not None and usage.cpu_s >= 0.2
    assert usage.rss_max > 1_000_000


def test_c_drain_counts_frames_over_loopback() -> None:
    port = free_udp_base(1)
    drain = UdpDrain(port, 1 << 20, packets_per_frame=2).start()
    try:
        assert drain.rcvbuf > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for frame in (7, 8, 9):
                packets = 1 if frame == 8 else 2  # frame 8 loses a packet
                for k in range(packets):
                    sock.sendto(struct.pack("<QII", frame, 0, k) + bytes(100), ("127.0.0.1", port))
        deadline = time.monotonic() + WAIT_S
        from _net import udp_socket_stats

        stats = udp_socket_stats(port)
        while stats is not None and stats.recv_q and time.monotonic() < deadline:
            time.sleep(0.02)
            stats = udp_socket_stats(port)
        result = drain.finish()
    finally:
        drain.kill()
    assert (result.packets, result.frames_seen, result.frames_complete) == (5, 3, 2)
    assert result.bytes == 5 * 116
    assert result.last >= result.first > 0


# -- records and the generated report --------------------------------------------------------------------


def test_results_and_readme_table_are_what_report_writes_from_the_committed_records() -> None:
    records = _records.load_records()
    assert records, "benchmarks/records/ holds no record"
    for record in records.values():
        assert record.commit and record.command.startswith("python benchmarks/")
        assert {"cpu_model", "cores", "kernel", "python"} <= set(record.machine)
    for path, expected in report.outputs().items():
        assert path.read_text() == expected, (
            f"{path.name} is not what benchmarks/report.py writes from benchmarks/records/: run "
            "`python benchmarks/report.py` (and never edit its figures by hand)")


def test_records_are_committed_not_ignored() -> None:
    proc = subprocess.run(["git", "-C", str(BENCH_DIR), "check-ignore", "-q", "records/bench_sender.json"],
                          capture_output=True)
    assert proc.returncode == 1  # 1 = not ignored


def test_a_record_round_trips_and_report_shows_it_and_what_is_missing(tmp_path: Path) -> None:
    table = _records.Table("T", ["a", "b"], [["x", 1.5], ["y|z", None]], caption="what a and b are")
    record = _records.Record("bench_writer", "python benchmarks/bench_writer.py --images 5", tables=[table],
                             figures={"headline": [["writer alone", "1.9 GB/s", "h5py 3.1 GB/s"]]},
                             notes=["the machine was shared"])
    path = _records.write_record(record, directory=tmp_path)
    assert path == tmp_path / "bench_writer.json"
    loaded = _records.load_records(tmp_path)["bench_writer"]
    assert loaded.commit and loaded.date and "loadavg_end" in loaded.machine
    text = report.render_results({"bench_writer": loaded})
    assert "| writer alone | 1.9 GB/s | h5py 3.1 GB/s | [bench_writer](records/bench_writer.json)" in text
    assert "| y\\|z | – |" in text and "- the machine was shared" in text
    assert "Command: `python benchmarks/bench_writer.py --images 5`" in text
    assert "## Not re-measured" in text and "`bench_pipeline.py`" in text
    readme = "intro\n<!-- bench-table:start -->\nold hand-typed row\n<!-- bench-table:end -->\nrest\n"
    new = report.replace_readme_table(readme, report.render_readme_table({"bench_writer": loaded}))
    assert "old hand-typed row" not in new and new.startswith("intro\n") and new.endswith("\nrest\n")
    assert "(benchmarks/records/bench_writer.json)" in new
    with pytest.raises(ValueError, match="markers"):
        report.replace_readme_table("no markers", "table")


def test_pipeline_record_renders_with_ratios_and_sender_ceiling() -> None:
    runs = [_run("slsReceiver", 0, 1.0), _run("ours", 0, 0.8), _run("ours", 0, 0.5, rate=0.0)]
    record = _records.Record("bench_pipeline", "python benchmarks/bench_pipeline.py --quick",
                             raw=_doc(runs), commit="abc", date="2026-01-01T00:00:00+00:00")
    rows = report.headline_rows({"bench_pipeline": record})
    assert any(r.what.startswith("CPU ms/frame, 1 kHz, default buffer") and "(sent/s ours / sls: 1000 / 1000)"
               in r.what
               and "ratio 0.80" in r.ours for r in rows)
    assert any("gigafrost_128x480" in r.what and r.peer == "sender ceiling 21000/s" for r in rows)
    text = report.render_results({"bench_pipeline": record})
    assert "free-running (sender-paced)" in text and "### Ours / slsReceiver (medians)" in text


def test_sender_benchmark_measures_and_records(tmp_path: Path) -> None:
    from daq_backend.config import load_config

    config = load_config(BENCH_DIR.parent / "configs" / "gigafrost_128x480.json")
    doc = {"points": []}
    for sink in bench_sender.SINKS:
        figures = bench_sender.measure(config, sink, None, 0.2)
        assert figures["images"] > 0 and figures["packets"] == 16 * figures["images"]
        assert figures["max_batch"] == 64
        if sink == "drained":
            assert 0 < figures["received_pct"] <= 100
        doc["points"].append({"detector": "gigafrost_128x480", "sink": sink, "batch": "default",
                              "modules": 8, "image_bytes": config.image_nbytes, **figures})
    figures = bench_sender.measure(config, "unread", None, 0.2, processes=2, n_images=200)
    assert figures["images"] == 200 and figures["processes"] == 2 and figures["packets"] == 3200
    doc["points"].append({"detector": "gigafrost_128x480", "sink": "unread", "batch": "default",
                          "modules": 8, "image_bytes": config.image_nbytes, **figures})
    record = bench_sender.to_record(doc, "python benchmarks/bench_sender.py", [])
    assert record.tables[0].rows[-1][3:5] == ["default", 2]
    assert record.tables[0].rows[0][:4] == ["gigafrost_128x480", 8, "unread", "default (64)"]
    (row,) = report.headline_rows({"bench_sender": record})
    assert row.what.startswith("simulator ceiling, gigafrost_128x480") and "images/s" in row.ours
    assert "2 processes: achieved" in row.peer


def test_pipeline_benchmark_runs_end_to_end_on_the_builtin_simulator(tmp_path: Path) -> None:
    """``--quick`` orchestration with our pipeline and the built-in simulator (no virtual detector)."""
    out = tmp_path / "out" / "run"
    code = bench_pipeline.main(["--quick", "--variants", "", "--multi", "gigafrost_128x480", "--multi-steps",
                                "1", "--buffers", "default", "--vm-memory", "as-is", "--workdir",
                                str(tmp_path), "--out", str(out)])
    assert code == 0
    doc = _report.load_doc(out.with_suffix(".json"))
    (entry,) = doc["multi"]
    assert entry["sender_ceiling_hz"] > 0
    (step,) = entry["steps"]
    assert step["error"] is None and step["frames"] >= 100
    (run,) = doc["runs"]
    assert run["written"] is not None and run["good"] + run["lost"] == run["frames"]
    assert "sender ceiling/s" in out.with_suffix(".md").read_text()


def test_baseline_runs_render_beside_ours_and_its_argv_repeats_the_points(tmp_path: Path) -> None:
    runs = [_run("slsReceiver", 0, 1.0), _run("ours", 0, 0.8), _run("baseline", 0, 1.6)]
    doc = _doc(runs)
    doc["baseline"] = {"rev": "main", "commit": "cafb3d4", "command": "python benchmarks/bench_pipeline.py"}
    text = render_markdown(doc)
    assert "## Ours / baseline main (`cafb3d4`) (medians)" in text
    assert "| 1 kHz | default | 1000 / 1000 | 0 / 0 | 0.800 / 1.600 | 0.50 |" in text
    rows = report.headline_rows({"bench_pipeline": _records.Record("bench_pipeline", "c", raw=doc)})
    assert any("against our pipeline at main" in r.what and "ratio 0.50" in r.ours and not r.readme
               for r in rows)
    args = bench_pipeline.build_parser().parse_args(["--periods", "10,0", "--frames", "300",
                                                     "--baseline", "main"])
    argv = bench_pipeline.baseline_argv(args, tmp_path / "b")
    assert argv[:3] == ["--variants", "ours", "--no-multi"] and "--baseline" not in argv
    assert argv[argv.index("--periods") + 1] == "10,0" and argv[argv.index("--frames") + 1] == "300"


def test_a_second_pipeline_record_renders_beside_the_first() -> None:
    """``--record-as bench_pipeline_asis``: e.g. the VM memory as-is run next to the backed one."""
    backed = _doc([_run("slsReceiver", 0, 1.0), _run("ours", 0, 0.8)])
    backed["machine"]["vm_memory"] = "free page reporting off, touched 8 GiB"
    asis = _doc([_run("slsReceiver", 0, 1.0), _run("ours", 300, 2.0)])
    asis["machine"]["vm_memory"] = "as the machine has it (no change)"
    records = {name: _records.Record(name, "python benchmarks/bench_pipeline.py", raw=doc, commit="abc",
                                     date="2026-01-01T00:00:00+00:00")
               for name, doc in (("bench_pipeline", backed), ("bench_pipeline_asis", asis))}
    assert report.script_of("bench_pipeline_asis") == "bench_pipeline"
    text = report.render_results(records)
    assert "## Pipeline: ours vs slsReceiver (`bench_pipeline.py`): record `bench_pipeline_asis`" in text
    rows = report.headline_rows(records)
    assert any("VM memory backed" in r.what and "0 of 1000" in r.ours for r in rows)
    assert any("VM memory as-is" in r.what and "300 of 1000" in r.ours for r in rows)
    with pytest.raises(SystemExit, match="--record-as"):
        bench_pipeline.main(["--record-as", "other"])
