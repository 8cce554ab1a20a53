import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daq_backend.writer.roots import OUTPUT_ROOTS_ENV

pytest_plugins = ["tests.sls_fixtures"]

# A test run started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored in every child it starts: the Ctrl-C tests (the CLI's
# KeyboardInterrupt, the benchmarks' restore on SIGINT) need it delivered. A handler is reset to the
# default in children at exec, so this also gives them back their own Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _output_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The DAQ writes only inside its output roots: every process a test starts (they inherit the
    environment) gets pytest's base temporary folder as its root, so files in ``tmp_path`` may be
    written, and a default data root (``$XDG_DATA_HOME/std-daq``) inside it, never the user's own.
    Tests of the rules themselves set their own."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OUTPUT_ROOTS_ENV, str(base))
        patch.setenv("XDG_DATA_HOME", str(base / "xdg-data"))
        yield base
