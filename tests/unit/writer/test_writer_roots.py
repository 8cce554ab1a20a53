"""The output-root rules (daq_backend.writer.roots): which roots are in force, where a relative name
goes, what leads out of a root, the path limits, and the default data root made on demand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daq_backend.writer import roots


def test_the_roots_in_force_flags_then_environment_then_the_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(roots.OUTPUT_ROOTS_ENV, f"{tmp_path}/e1::{tmp_path}/e2")
    assert roots.output_roots([tmp_path / "a", str(tmp_path / "b"), tmp_path / "a"]) == [tmp_path / "a",
                                                                                          tmp_path / "b"]
    assert roots.output_roots() == [tmp_path / "e1", tmp_path / "e2"]
    monkeypatch.delenv(roots.OUTPUT_ROOTS_ENV)
    assert roots.output_roots() == [tmp_path / "xdg" / "std-daq"] == [roots.default_data_root()]
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # ignored, as the XDG rule says
    assert roots.default_data_root() == Path.home() / ".local" / "share" / "std-daq"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert roots.default_data_root() == Path.home() / ".local" / "share" / "std-daq"
    monkeypatch.chdir(tmp_path)
    assert roots.output_roots(["rel"]) == [tmp_path / "rel"]  # absolute, from where it was given


def test_relative_names_and_dot_dot(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert roots.resolve_output_path("a/b.h5", [first, second]) == str(first / "a" / "b.h5")
    assert roots.resolve_output_path("/x/../y/b.h5", [first]) == "/y/b.h5"
    first.mkdir()
    assert roots.confine(roots.resolve_output_path("a.h5", [first]), [first]) == first / "a.h5"
    with pytest.raises(roots.OutsideRootsError) as info:
        roots.confine(roots.resolve_output_path("../second/a.h5", [first]), [first])
    assert str(info.value) == (f"{second}/a.h5 is outside the folders this DAQ writes to ({first}); write "
                               f"inside one of them (a relative name goes into {first}), or start the DAQ "
                               "with --output-root FOLDER (repeatable) to allow another folder")


def test_symlinks_inside_a_root_are_followed_only_while_they_stay_inside(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "runs").mkdir(parents=True)
    outside.mkdir()
    (root / "current").symlink_to(root / "runs")
    (root / "away").symlink_to(outside)
    assert roots.confine(root / "current" / "a.h5", [root]) == root / "current" / "a.h5"
    with pytest.raises(roots.OutsideRootsError):
        roots.confine(root / "away" / "a.h5", [root])
    (root / "runs" / "link.h5").symlink_to(outside / "x.h5")
    with pytest.raises(ValueError, match="is a symbolic link; the DAQ never writes through one"):
        roots.confine(root / "runs" / "link.h5", [root])
    linked_root = tmp_path / "linked-root"  # a root that is itself a symlink
    linked_root.symlink_to(root)
    assert roots.confine(root / "runs" / "b.h5", [linked_root])
    fd = roots.open_folder(root / "current", [linked_root])
    try:
        assert os.path.samefile(roots.fd_path(fd), root / "runs")
    finally:
        os.close(fd)


def test_path_limits() -> None:
    roots.check_path_text("/a/" + "é" * 127 + "x")  # 255 bytes
    for bad, text in (("/a/" + "é" * 128, "256-byte name"), ("/a" * 2048, "4096 bytes long"),
                      ("/a\x00b", "NUL"), ("/a\udc80", "UTF-8")):
        with pytest.raises(ValueError, match=text):
            roots.check_path_text(bad)


def test_only_the_default_data_root_is_made_on_demand(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    default = roots.default_data_root()
    given = tmp_path / "given"
    roots.confine(given / "a.h5", [given])  # an absent given root is not made (a typo stays visible)
    assert not given.exists()
    roots.confine(default / "sub" / "a.h5", [default])  # nor a folder inside the data root
    assert not default.exists()
    roots.confine(default / "a.h5", [default])
    assert default.is_dir()
