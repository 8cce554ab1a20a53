"""Nobody writes where they should not: the output roots of ``std-daq up``, through REST and the broker.

Once measured: with the default ``std-daq up`` (no ``--output-root``) a ``write_async`` with
``overwrite: true`` replaced an existing text file outside any data folder with HDF5. Now, with no
``--output-root``, files go only into the default data root ``$XDG_DATA_HOME/std-daq`` (created when
first needed; a relative name goes there); a file outside it, a ``..`` or a symlink that leads out,
and ``overwrite`` of anything but an HDF5 file this DAQ wrote are refused with the reason, by the REST
API (403/422) and by the writer agent for a request that comes straight from the broker
(``request_fail``). ``--output-root`` (repeatable) reaches every process that decides where a file
goes. Real processes (``std-daq up`` on RabbitMQ), a simulated detector over UDP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.broker.protocol import Action
from daq_backend.messages import FAULT_BOUND, ImageAccounting
from daq_backend.testing import wait_for
from daq_backend.testing.up import Detector
from daq_backend.writer import layout
from tests.fault.up_fixtures import Up, running_up

ROOT_ENV = "STD_DAQ_OUTPUT_ROOTS"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("confine")


@pytest.fixture(scope="module")
def default_up(home: Path) -> Iterator[Up]:
    """``std-daq up`` as a new user runs it: no ``--output-root``, no ``STD_DAQ_OUTPUT_ROOTS``; the
    data root ``$XDG_DATA_HOME/std-daq`` does not exist yet."""
    with running_up(home, env={"XDG_DATA_HOME": str(home / "xdg")}, unset=[ROOT_ENV]) as up:
        yield up


def data_root(home: Path) -> Path:
    return home / "xdg" / "std-daq"


def check_agree(up: Up, request_id: str, path: Path, n_images: int) -> dict[str, Any]:
    """The file, REST and the broker status say the same about a completed request, and every image is
    accounted for."""
    final = up.rest_final(request_id)
    with h5py.File(path, "r") as h5:
        attrs = dict(h5.attrs)
        status = h5[layout.STATUS][:]
    accounting = ImageAccounting(n_requested=n_images, n_written=int(attrs["n_written"]),
                                 n_good=int(np.sum(status == 0)), n_incomplete=final["n_incomplete_images"],
                                 n_lost=final["n_missing_images"])
    assert accounting.balanced(), accounting
    assert final["state"] == attrs["status"] == "completed", (final, attrs)
    assert final["n_written"] == attrs["n_written"] == n_images
    assert final["output_file"] == str(path) and attrs["creator"] == layout.CREATOR
    return final


def test_by_default_files_go_into_the_data_root_created_on_demand(default_up: Up, home: Path) -> None:
    root = data_root(home)
    assert not root.exists()  # nothing is created before a request needs it
    with Detector(default_up.config, rate=50.0):
        r = default_up.post("/write_sync", {"output_file": "run1.h5", "n_images": 5, "timeout": 60})
        assert r.status_code == 200, r.text
        done = time.monotonic()
        check_agree(default_up, r.json()["request_id"], root / "run1.h5", 5)
        assert time.monotonic() - done <= FAULT_BOUND
        # the same through the broker, bypassing the REST API: the agent takes it into the root too
        with default_up.broker() as (client, aggregator):
            action, message = default_up.broker_final(client, aggregator,
                                                      {"output_file": "run2.h5", "n_images": 3})
    assert action is Action.SUCCESS and message["output_file"] == str(root / "run2.h5"), message
    assert message["n_written"] == 3 and message["status"] == "completed"
    assert sorted(p.name for p in root.iterdir()) == ["run1.h5", "run2.h5"]


def outside_cases(home: Path) -> dict[str, Path]:
    """Paths that lead out of the data root, each with the file it would have replaced."""
    root = data_root(home)
    root.mkdir(parents=True, exist_ok=True)
    outside = home / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / "notes.txt"
    victim.write_text("the user's notes")
    if not (root / "escape").is_symlink():
        (root / "escape").symlink_to(outside)
    return {
        str(victim): victim,
        str(root / ".." / ".." / "outside" / "notes.txt"): victim,
        str(root / "escape" / "notes.txt"): victim,
        "escape/notes.txt": victim,
        "../../outside/notes.txt": victim,
    }


def test_a_file_outside_the_root_is_refused_by_rest_and_by_the_agent(default_up: Up, home: Path) -> None:
    root = data_root(home)
    cases = outside_cases(home)
    for output_file, victim in cases.items():
        for endpoint in ("/write_async", "/write_sync"):
            r = default_up.post(endpoint, {"output_file": output_file, "n_images": 1, "overwrite": True})
            assert r.status_code == 403, (output_file, r.text)
            detail = r.json()["detail"]
            assert f"is outside the folders this DAQ writes to ({root})" in detail, detail
            assert "--output-root FOLDER" in detail
        body = {"output_file": output_file, "n_images": 1, "overwrite": True}
        r = default_up.post("/writer/write_async", body)
        assert r.status_code == 200 and r.json()["status"] == "error", r.text
        assert "is outside the folders this DAQ writes to" in r.json()["message"]
        assert victim.read_text() == "the user's notes"
    # straight on the broker: the writer agent refuses them itself
    with default_up.broker() as (client, aggregator):
        for output_file, victim in cases.items():
            action, message = default_up.broker_final(
                client, aggregator, {"output_file": output_file, "n_images": 1, "overwrite": True})
            assert action is Action.FAIL, (output_file, message)
            assert f"is outside the folders this DAQ writes to ({root})" in message, message
            assert "--output-root FOLDER" in message
            assert victim.read_text() == "the user's notes"
    assert sorted(p.name for p in (home / "outside").iterdir()) == ["notes.txt"]
    assert default_up.services()["h5-writer"]["restarts"] == 0


def test_overwrite_replaces_only_a_file_this_daq_wrote(default_up: Up, home: Path) -> None:
    root = data_root(home)
    root.mkdir(parents=True, exist_ok=True)
    text = root / "notes.h5"
    text.write_text("not data")
    foreign = root / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = np.arange(3)
    reasons = {text: "it is not an HDF5 file", foreign: "it is an HDF5 file of another program"}
    for path, reason in reasons.items():
        r = default_up.post("/write_async", {"output_file": str(path), "n_images": 1, "overwrite": True})
        assert r.status_code == 422, r.text
        assert f"cannot replace {path}: overwrite replaces only an HDF5 file this DAQ wrote, and {reason}" \
            in r.json()["detail"]
    with default_up.broker() as (client, aggregator):
        for path, reason in reasons.items():
            action, message = default_up.broker_final(
                client, aggregator, {"output_file": path.name, "n_images": 1, "overwrite": True})
            assert action is Action.FAIL and reason in message, message
    assert text.read_text() == "not data"
    with h5py.File(foreign, "r") as h5:
        assert list(h5["x"]) == [0, 1, 2]
    # a file of this DAQ is replaced
    with Detector(default_up.config, rate=50.0):
        first = default_up.post("/write_sync", {"output_file": "again.h5", "n_images": 2, "timeout": 60})
        assert first.status_code == 200, first.text
        r = default_up.post("/write_sync", {"output_file": "again.h5", "n_images": 4, "timeout": 60,
                                            "overwrite": True})
        assert r.status_code == 200, r.text
    check_agree(default_up, r.json()["request_id"], root / "again.h5", 4)
    assert not [p for p in root.iterdir() if p.name.endswith(".creating")]


def test_output_roots_reach_every_writing_process(tmp_path: Path) -> None:
    """``up --output-root A --output-root B``: a relative name goes into A, B is allowed too, and the
    default data root is not. The REST API, the writer agent and the h5 writer all apply the same roots
    (a request straight on the broker is served into B, so the agent and h5 writer have B)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    xdg = tmp_path / "xdg"
    with running_up(tmp_path, "--output-root", str(first), "--output-root", str(second),
                    env={"XDG_DATA_HOME": str(xdg)}, unset=[ROOT_ENV]) as up:
        with Detector(up.config, rate=50.0):
            r = up.post("/write_sync", {"output_file": "rel.h5", "n_images": 2, "timeout": 60})
            assert r.status_code == 200, r.text
            check_agree(up, r.json()["request_id"], first / "rel.h5", 2)
            with up.broker() as (client, aggregator):
                action, message = up.broker_final(client, aggregator,
                                                  {"output_file": str(second / "b.h5"), "n_images": 2})
                assert action is Action.SUCCESS and message["n_written"] == 2, message
                elsewhere = {"output_file": str(xdg / "std-daq" / "c.h5"), "n_images": 1}
                action, message = up.broker_final(client, aggregator, elsewhere)
                assert action is Action.FAIL and f"({first}, {second})" in message, message
        r = up.post("/write_async", {"output_file": str(xdg / "std-daq" / "c.h5"), "n_images": 1})
        assert r.status_code == 403 and f"({first}, {second})" in r.json()["detail"], r.text
    assert (second / "b.h5").exists() and not xdg.exists()


def test_the_h5_writer_status_shows_no_failure(default_up: Up) -> None:
    services = wait_for(lambda: (s := default_up.services()) and all(x["alive"] for x in s.values()) and s,
                        "every process alive", 30)
    assert all(s["restarts"] == 0 for s in services.values()), services
