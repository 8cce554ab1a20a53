"""Who may send commands: the bearer token of the REST API and the address it listens on.

In-process: with a token every command (POST, PUT, DELETE) needs ``Authorization: Bearer <token>``,
answered 401 with the reason otherwise, on every endpoint family; reading endpoints stay open; the
clients and the ophyd devices send the token (given, or from ``STD_DAQ_TOKEN``). Through ``std-daq up
--rest-host 127.0.0.1 --token-file``: the API process takes the token; ``up`` refuses a non-loopback
address without a token, and a token file other users can read, with the reason.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import httpx
import pytest

from daq_backend.auth import (
    MIN_TOKEN_LENGTH,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TokenError,
    client_token,
    is_loopback,
    listen_problem,
    read_token_file,
    server_token,
)
from daq_backend.testing import free_tcp_port, make_config, wait_for
from daq_backend.testing.rest import WAIT_S, RestHarness
from daq_backend.writer.client import write_main
from std_daq_ophyd import StdDaqDetector
from std_daq_ophyd.client import StdDaqClient, StdDaqError

CLI = (sys.executable, "-m", "daq_backend.cli")


def token_file(tmp_path: Path, token: str | None = None, mode: int = 0o600) -> tuple[Path, str]:
    token = token or secrets.token_urlsafe(32)
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path, token


@pytest.fixture
def guarded(ipc_env: str, tmp_path: Path) -> Iterator[tuple[RestHarness, str]]:
    token = secrets.token_urlsafe(32)
    harness = RestHarness(tmp_path, token=token)
    try:
        yield harness, token
    finally:
        harness.close()


# -- the rules ------------------------------------------------------------------------------------


def test_loopback_addresses_and_when_a_token_is_needed() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and listen_problem(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "daq-host"):
        assert not is_loopback(host)
        problem = listen_problem(host, None)
        assert problem is not None and f"listen on {host}" in problem and "--token-file" in problem
        assert listen_problem(host, "x" * MIN_TOKEN_LENGTH) is None


def test_token_files_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, token = token_file(tmp_path)
    assert read_token_file(path) == token
    path.chmod(0o644)
    with pytest.raises(TokenError, match=f"may be read or written by other users.*chmod 600 {path}"):
        read_token_file(path)
    for bad in ("short", "has a space in it but long enough"):
        path, _ = token_file(tmp_path, bad)
        with pytest.raises(TokenError, match=f"at least {MIN_TOKEN_LENGTH} characters and no spaces"):
            read_token_file(path)
    path.write_text("\n")
    with pytest.raises(TokenError, match="is empty"):
        read_token_file(path)
    with pytest.raises(TokenError, match="No such file"):
        read_token_file(tmp_path / "missing")
    # the server: the file, else the environment; a client: given, else the environment, else a file
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert server_token(None) is None and client_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, "e" * 20)
    assert server_token(None) == "e" * 20 and client_token(None) == "e" * 20 and client_token("g") == "g"
    monkeypatch.delenv(TOKEN_ENV)
    path, token = token_file(tmp_path)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(path))
    assert client_token(None) == token


# -- the API with a token ---------------------------------------------------------------------------


def test_commands_need_the_token_and_reading_stays_open(guarded: tuple[RestHarness, str]) -> None:
    rest, token = guarded
    name = rest.config.detector_name
    for path in ("/health", "/stats", "/config", "/ui", "/ui/snapshot", "/openapi.json",
                 f"/detector/{name}", "/writer/status", "/daq/config", "/daq/logs/1"):
        r = rest.http.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    assert rest.http.get("/health").json()["commands_need_token"] is True
    assert rest.http.get("/requests/nope").status_code == 404  # open, and answered as usual
    write = {"n_images": 1, "output_file": rest.file("guarded.h5")}
    commands = [("POST", "/write_async", write), ("POST", "/write_sync", write),
                ("POST", "/write_kill", {"request_id": "x"}), ("POST", "/requests/x/stop", None),
                ("POST", f"/detector/{name}", {"config": {"frames": 3}}),
                ("POST", "/detector", {"det_name": name, "cmd": "STATUS"}),
                ("POST", "/writer/write_async", write), ("POST", "/writer/stop", None),
                ("POST", "/daq/config", {"bit_depth": 32}), ("PUT", "/write_async", write),
                ("DELETE", "/requests/x", None)]
    for method, path, body in commands:
        for headers, why in (({}, "only with its token"),
                             ({"Authorization": "Bearer " + "w" * 32}, "the token sent is not this DAQ's"),
                             ({"Authorization": token}, "the token sent is not this DAQ's")):
            r = rest.http.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            detail = r.json()["detail"]
            assert why in detail and "Authorization: Bearer <token>" in detail and TOKEN_ENV in detail
            if path.startswith(("/writer/", "/daq/")):
                assert r.json()["status"] == "error" and r.json()["message"] == detail
            if path.startswith("/detector"):
                assert r.json()["response"] == detail
    assert not os.path.exists(rest.file("guarded.h5")) and rest.backend.tracker.active() == []
    assert rest.control.get_config()["frames"] != 3
    # with the token the same commands go through to their usual answers
    auth = {"Authorization": f"Bearer {token}"}
    r = rest.http.post(f"/detector/{name}", json={"config": {"frames": 3}}, headers=auth)
    assert r.status_code == 200 and rest.control.get_config()["frames"] == 3
    r = rest.http.post("/write_async", json={"n_images": 0, "output_file": rest.file("x.h5")}, headers=auth)
    assert r.status_code == 422  # past the token, the request's own validation
    r = rest.http.post("/requests/x/stop", headers=auth)
    assert r.status_code == 404


def test_clients_and_devices_send_the_token(guarded: tuple[RestHarness, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rest, token = guarded
    name = rest.config.detector_name
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    anonymous = StdDaqClient(rest.url)
    assert anonymous.health().commands_need_token  # reading needs no token
    with pytest.raises(StdDaqError, match=f"HTTP 401.*this client sent no token: pass token=... or set "
                                          f"{TOKEN_ENV}") as refused:
        anonymous.configure_detector(name, {"frames": 4})
    assert refused.value.status_code == 401
    with pytest.raises(StdDaqError, match="the token this client sent is not the DAQ's"):
        StdDaqClient(rest.url, token="w" * 32).configure_detector(name, {"frames": 4})
    assert StdDaqClient(rest.url, token=token).configure_detector(name, {"frames": 4}).response
    monkeypatch.setenv(TOKEN_ENV, token)
    from_env = StdDaqClient(rest.url)
    assert from_env.configure_detector(name, {"frames": 5}).response
    request_id = from_env.write_async({"n_images": 1, "output_file": rest.file("env.h5")})
    from_env.stop_request(request_id)
    assert rest.control.get_config()["frames"] == 5
    # the ophyd devices: v1 (given and from the environment) and ophyd-async
    det = StdDaqDetector(name="det", url=rest.url, token=token)
    assert det.client.headers == {"Authorization": f"Bearer {token}"}
    assert StdDaqDetector(name="det2", url=rest.url).client.token == token
    from std_daq_ophyd.async_devices import StdDaqAsyncDetector

    assert StdDaqAsyncDetector(rest.url, name="adet").client.headers == {"Authorization": f"Bearer {token}"}
    for client in (anonymous, from_env, det.client):
        client.close()


def test_std_daq_write_through_the_api_sends_the_token(guarded: tuple[RestHarness, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rest, token = guarded
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    output = rest.file("cli.h5")
    argv = ["--url", rest.url, "--n-images", "5", "--output", output, "--no-progress"]
    out, err = io.StringIO(), io.StringIO()
    assert write_main(argv, out=out, err=err) == 2
    assert "HTTP 401" in err.getvalue() and "this client sent no token" in err.getvalue()
    assert not os.path.exists(output)
    tokens, _ = token_file(tmp_path, token)
    assert rest.assembler is not None
    rest.assembler.start(rate_hz=50)
    out, err = io.StringIO(), io.StringIO()
    assert write_main([*argv, "--token-file", str(tokens)], out=out, err=err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["n_written"] == 5
    with h5py.File(output, "r") as f:
        assert f.attrs["status"] == "completed" and f.attrs["n_written"] == 5


def test_without_a_token_commands_are_open_on_loopback(rest: RestHarness) -> None:
    assert rest.http.get("/health").json()["commands_need_token"] is False
    r = rest.http.post(f"/detector/{rest.config.detector_name}", json={"config": {"frames": 2}})
    assert r.status_code == 200


# -- std-daq up -----------------------------------------------------------------------------------


def test_up_passes_the_listen_address_and_the_token(ipc_env: str, tmp_path: Path) -> None:
    config = make_config("jungfrau")
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    tokens, token = token_file(tmp_path)
    port = free_tcp_port()
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    env.pop(TOKEN_ENV, None)
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--rest-host", "127.0.0.1",
                             "--token-file", str(tokens), "--output-root", str(tmp_path),
                             "--status-interval", "0.2"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=WAIT_S) as http:

            def health() -> dict[str, object] | None:
                try:
                    answer = http.get("/health")
                except httpx.TransportError:
                    return None
                return answer.json() if answer.status_code == 200 else None

            assert wait_for(health, "the REST API of std-daq up", WAIT_S)["commands_need_token"] is True
            command = {"config": {"frames": 7}}
            r = http.post(f"/detector/{config.detector_name}", json=command)
            assert r.status_code == 401 and "only with its token" in r.json()["detail"]
            r = http.post(f"/detector/{config.detector_name}", json=command,
                          headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            assert http.get(f"/detector/{config.detector_name}").json()["frames"] == 7
            client = StdDaqClient(url, token=token)
            request_id = client.write_async({"n_images": 1, "output_file": str(tmp_path / "up.h5"),
                                             "timeout": 1})
            assert client.stop_request(request_id).state.value in ("interrupted", "completed", "failed")
            client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


@pytest.mark.parametrize("case", ["no token", "readable token file"])
def test_up_refuses_a_non_loopback_address_without_a_usable_token(ipc_env: str, tmp_path: Path,
                                                                  case: str) -> None:
    config = make_config("jungfrau")
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    argv = [*CLI, "up", str(path), "--rest-port", str(free_tcp_port()), "--rest-host", "0.0.0.0"]
    if case == "readable token file":
        tokens, _ = token_file(tmp_path, mode=0o644)
        argv += ["--token-file", str(tokens)]
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    env.pop(TOKEN_ENV, None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2, done.stderr
    if case == "no token":
        assert "std-daq up: the REST API would listen on 0.0.0.0, which other hosts can reach, without a " \
               "token" in done.stderr and "--token-file PATH" in done.stderr
    else:
        assert "may be read or written by other users" in done.stderr and "chmod 600" in done.stderr
    assert not os.path.exists(f"{ipc_env}/std-daq-{config.detector_name}-status.json")  # nothing started
