"""WriteRequest validation: every bad field is refused with a message that names it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daq_backend.testing.writer import make_config
from daq_backend.writer.layout import ImageFile
from daq_backend.writer.request import (
    OUTPUT_ROOTS_ENV,
    RequestError,
    WriteRequest,
    parse_write_request,
)


def _nested(levels: int) -> list[object]:
    value: list[object] = [1]
    for _ in range(levels - 1):
        value = [value]
    return value


def _parse(body: object, **kw: object) -> WriteRequest:
    return parse_write_request(body, **kw)  # type: ignore[arg-type]


def test_a_minimal_request_gets_the_defaults(tmp_path: Path) -> None:
    req = _parse({"output_file": str(tmp_path / "a.h5"), "n_images": 3})
    assert (req.n_images, req.metadata, req.start_id, req.compression, req.overwrite, req.timeout) == (
        3, {}, None, "none", False, None)
    assert req.to_json_dict() == {"output_file": str(tmp_path / "a.h5"), "n_images": 3, "metadata": {},
                                  "compression": "none", "overwrite": False}


def test_seed_fields_are_accepted_and_the_path_normalised(tmp_path: Path) -> None:
    req = _parse({"output_file": f"{tmp_path}/x/../a.h5", "n_images": 1, "sources": "eiger", "user_id": 5,
                  "metadata": {"sample": "Si", "n": [1, 2]}, "start_id": 0,
                  "compression": "bitshuffle-lz4", "timeout": 2.5})
    assert req.output_file == str(tmp_path / "a.h5")
    assert (req.sources, req.start_id, req.compression, req.timeout) == ("eiger", 0, "bitshuffle-lz4", 2.5)


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"n_images": None}, "n_images", "Input should be a valid integer"),
        ({"n_images": "ten"}, "n_images", "valid integer"),
        ({"n_images": "10"}, "n_images", "valid integer"),
        ({"n_images": 1.5}, "n_images", "valid integer"),
        ({"n_images": True}, "n_images", "valid integer"),
        ({"n_images": 0}, "n_images", "greater than or equal to 1"),
        ({"n_images": -4}, "n_images", "greater than or equal to 1"),
        ({"output_file": 17}, "output_file", "valid string"),
        ({"output_file": ""}, "output_file", "at least 1 character"),
        ({"output_file": "/x/" + "n" * 256 + ".h5"}, "output_file", "a file or folder name may have at most"),
        ({"output_file": "/x" * 2048}, "output_file", "at most 4095"),
        ({"output_file": "/tmp/\udc80.h5"}, "output_file", "valid string"),
        ({"n_images": 2**64}, "n_images", "less than or equal to 1000000000000"),
        ({"start_id": 2**64}, "start_id", "less than or equal to 18446744073709551615"),
        ({"timeout": 1e300}, "timeout", "less than or equal to 1000000"),
        ({"metadata": {"k" * 256: 1}}, "metadata", "longer than 255 bytes"),
        ({"metadata": {"a": "x\x00y"}}, "metadata.a", "contains a NUL"),
        ({"metadata": {"a": [[{"b": "\udc80"}]]}}, "metadata.a[0][0].b", "not valid UTF-8"),
        ({"metadata": {"a": _nested(32)}}, "metadata", "nested deeper than 32 levels"),
        ({"sources": _nested(300)}, "sources", "nested deeper than 32 levels"),
        ({"user_id": {"a": "\x00"}}, "user_id.a", "contains a NUL"),
        ({"metadata": [1, 2]}, "metadata", "valid dictionary"),
        ({"metadata": {"NX_class": "x"}}, "metadata", "reserved"),
        ({"metadata": {"x": float("nan")}}, "metadata", "JSON"),
        ({"start_id": -1}, "start_id", "greater than or equal to 0"),
        ({"start_id": "5"}, "start_id", "valid integer"),
        ({"compression": "zstd"}, "compression", "'none' or 'bitshuffle-lz4'"),
        ({"overwrite": "yes"}, "overwrite", "valid boolean"),
        ({"timeout": 0}, "timeout", "greater than 0"),
        ({"timeout": "long"}, "timeout", "valid number"),
        ({"n_image": 5}, "n_image", "unknown field"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, change: dict[str, object], field: str, text: str) -> None:
    body = {"output_file": str(tmp_path / "a.h5"), "n_images": 3, **change}
    with pytest.raises(RequestError) as info:
        _parse(body)
    message = str(info.value)
    assert message.startswith("invalid write request: ")
    assert f"{field}: " in message and text in message, message


def test_missing_fields_are_named() -> None:
    with pytest.raises(RequestError, match=r"output_file: missing \(required\); n_images: missing"):
        _parse({})


@pytest.mark.parametrize("body", [b"{not json", "[1, 2]", b"\xff\xfe", 42])
def test_a_body_that_is_not_a_json_object_is_refused(body: object) -> None:
    with pytest.raises(RequestError, match="invalid write request: (not valid JSON|expected a JSON object)"):
        _parse(body)


def test_folder_checks(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        str(tmp_path / "missing" / "a.h5"): "does not exist",
        str(afile / "a.h5"): "is not a folder",
        str(tmp_path): "is a folder, not a file",
        str(tmp_path) + "/": "names a folder",
        # Root may write anywhere its mode bits forbid, so an unwritable folder is one the kernel
        # refuses to create files in whoever asks: sysfs.
        "/sys/kernel/a.h5": "is not writable",
    }
    for output_file, text in cases.items():
        with pytest.raises(RequestError, match="output_file: ") as info:
            roots = [tmp_path.parent, Path("/sys/kernel")]
            _parse({"output_file": output_file, "n_images": 1}, output_roots=roots)
        assert text in str(info.value), (output_file, str(info.value))
    assert not list(Path("/sys/kernel").glob(".std-daq-probe-*"))


def test_an_existing_file_needs_overwrite_and_only_a_daq_file_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "a.h5"
    target.write_bytes(b"precious")
    with pytest.raises(RequestError, match="already exists .*overwrite: true"):
        _parse({"output_file": str(target), "n_images": 1})
    with pytest.raises(RequestError, match="overwrite replaces only an HDF5 file this DAQ wrote, and it is "
                                           "not an HDF5 file"):
        _parse({"output_file": str(target), "n_images": 1, "overwrite": True})
    assert target.read_bytes() == b"precious"
    ImageFile.create(tmp_path / "ours.h5", make_config(), n_images=1).close("completed")
    assert _parse({"output_file": str(tmp_path / "ours.h5"), "n_images": 1, "overwrite": True}).overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "ours.h5"]  # the write probe is gone


def test_output_roots_from_argument_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = tmp_path / "data", tmp_path / "other"
    inside.mkdir()
    outside.mkdir()
    (inside / "sub").mkdir()
    os.symlink(outside, inside / "escape")
    ok = {"output_file": str(inside / "sub" / "a.h5"), "n_images": 1}
    assert _parse(ok, output_roots=[inside])
    for bad in (outside / "a.h5", inside / "escape" / "a.h5", inside / ".." / "other" / "a.h5"):
        with pytest.raises(RequestError, match="is outside the folders this DAQ writes to") as info:
            _parse({"output_file": str(bad), "n_images": 1}, output_roots=[inside])
        assert f"({inside})" in str(info.value) and "--output-root" in str(info.value)
    monkeypatch.setenv(OUTPUT_ROOTS_ENV, f"/nonexistent:{inside}")
    assert _parse(ok)
    with pytest.raises(RequestError, match=f"output_file: {outside}/a.h5 is outside"):
        _parse({"output_file": str(outside / "a.h5"), "n_images": 1})


def test_a_relative_file_goes_into_the_first_root(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    assert _parse({"output_file": "sub/a.h5", "n_images": 1}, output_roots=[first, second]).output_file == \
        str(first / "sub" / "a.h5")
    with pytest.raises(RequestError, match="is outside the folders"):
        _parse({"output_file": "../second/a.h5", "n_images": 1}, output_roots=[first])
    # a client-side check (no roots, no file system) leaves it to the DAQ
    assert _parse({"output_file": "a.h5", "n_images": 1}, check_filesystem=False).output_file == "a.h5"


def test_the_limits_are_in_the_json_schema() -> None:
    schema = WriteRequest.model_json_schema()["properties"]
    assert schema["n_images"]["maximum"] == 10**12 and schema["n_images"]["minimum"] == 1
    assert schema["output_file"]["maxLength"] == 4095
    assert "255 bytes" in schema["output_file"]["description"]
    assert "32 levels" in schema["metadata"]["description"]
    assert schema["start_id"]["anyOf"][0]["maximum"] == 2**64 - 1


def test_deeply_nested_json_text_is_refused_not_raised() -> None:
    with pytest.raises(RequestError, match="nested too deeply"):
        _parse("[" * 100_000 + "]" * 100_000)
