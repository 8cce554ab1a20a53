"""Who may send commands to the REST API: a bearer token, and where the API listens.

The REST API (``std-daq up`` / ``std-daq rest``) takes its token from ``--token-file PATH`` (the
file's first line), else from the environment variable ``STD_DAQ_TOKEN``. With a token, every
request that changes something (any method but GET, HEAD and OPTIONS: writes, kills, stops, detector
settings and commands, config changes) must carry ``Authorization: Bearer <token>``; reading
endpoints stay open. Without a token the API accepts commands from anyone who reaches it, so it may
then listen on a loopback address only: ``listen_problem`` says why another address is refused.

Clients (``StdDaqClient``, the ophyd devices) send the token they are given, else ``STD_DAQ_TOKEN``,
else the first line of the file named by ``STD_DAQ_TOKEN_FILE``.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

TOKEN_ENV = "STD_DAQ_TOKEN"
TOKEN_FILE_ENV = "STD_DAQ_TOKEN_FILE"
#: the shortest token accepted (a guessable token protects nothing)
MIN_TOKEN_LENGTH = 16
#: methods that only read; every other method needs the token when one is configured
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenError(ValueError):
    """The token file or value cannot be used; the message says why and what to do."""


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (its first line, stripped). Refuses a missing, empty or short token and
    a file other users may read or write."""
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise TokenError(f"token file {path}: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"token file {path} may be read or written by other users (mode "
                         f"{stat.filemode(info.st_mode)}): `chmod 600 {path}`")
    token = text.splitlines()[0].strip() if text.strip() else ""
    return check_token(token, f"token file {path}")


def check_token(token: str, where: str) -> str:
    if not token:
        raise TokenError(f"{where} is empty")
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise TokenError(f"{where}: a token has at least {MIN_TOKEN_LENGTH} characters and no spaces "
                         "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def server_token(token_file: str | os.PathLike[str] | None) -> str | None:
    """The API's token: ``token_file`` if given, else ``STD_DAQ_TOKEN``, else None (no token)."""
    if token_file is not None:
        return read_token_file(token_file)
    value = os.environ.get(TOKEN_ENV)
    return check_token(value.strip(), TOKEN_ENV) if value and value.strip() else None


def client_token(token: str | None = None) -> str | None:
    """What a client sends: ``token`` if given, else ``STD_DAQ_TOKEN``, else the file named by
    ``STD_DAQ_TOKEN_FILE`` (None: no token)."""
    if token is not None:
        return token or None
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value
    path = os.environ.get(TOKEN_FILE_ENV)
    return read_token_file(path) if path else None


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_problem(host: str, token: str | None) -> str | None:
    """Why the API must not listen on ``host`` with ``token`` (None: it may)."""
    if token is not None or is_loopback(host):
        return None
    return (f"the REST API would listen on {host}, which other hosts can reach, without a token: anyone "
            f"reaching it could write files and drive the detector. Give --token-file PATH (a file "
            f"only you can read, holding a token of at least {MIN_TOKEN_LENGTH} characters) or set "
            f"{TOKEN_ENV}; or listen on 127.0.0.1")
