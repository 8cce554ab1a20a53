"""Build slsDetectorPackage's virtual detector servers and ``slsReceiver`` once, into a cache.

Why: tests and benchmarks need a real detector firmware simulation and the C++ reference receiver, but
no binary registry ships them. The ``slsdet`` source distribution on PyPI bundles the whole package, so
we build the three executables from the sdist of the *installed* ``slsdet`` version (client and servers
must speak the same protocol) and cache them outside the repository at
``${STD_DAQ_SLS_CACHE:-~/.cache/std-daq/sls}/<version>/bin/``. A file lock keeps concurrent callers (two
pytest sessions, a benchmark) from building twice; the bin directory appears atomically when complete.

Run ``python -m daq_backend.control.sls_build`` (or ``scripts/build_sls_virtual.sh``).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
from collections.abc import Callable
from pathlib import Path

TARGETS: tuple[str, ...] = ("jungfrauDetectorServer_virtual", "eigerDetectorServer_virtual", "slsReceiver")
# The servers read these beside their own executable (/proc/self/exe): without detid_eiger.txt a virtual
# Eiger refuses every client ("Could not find detid file").
DATA_FILES: tuple[str, ...] = ("detid_eiger.txt", "config_eiger.txt", "detid_jungfrau.txt")
REQUIRED_TOOLS: dict[str, str] = {"cmake": "cmake", "make": "make", "gcc": "gcc", "g++": "g++"}
CMAKE_FLAGS: tuple[str, ...] = (
    "-DSLS_USE_SIMULATOR=ON",
    "-DSLS_USE_RECEIVER=ON",
    "-DSLS_USE_PYTHON=OFF",
    "-DSLS_USE_TESTS=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)


class SlsBuildError(RuntimeError):
    """The virtual servers could not be built; the message says which step and how to fix it."""


def installed_slsdet_version() -> str:
    """The slsdet version installed in this interpreter: the servers must match the client."""
    try:
        return importlib.metadata.version("slsdet")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SlsBuildError("slsdet is not installed in this Python environment (pip install slsdet)") \
            from exc


def cache_root() -> Path:
    """Cache root, outside the repository so binaries are never committed and survive re-clones."""
    env = os.environ.get("STD_DAQ_SLS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "std-daq" / "sls"


def bin_dir(version: str | None = None) -> Path:
    """Directory that holds the built executables for ``version`` (default: installed slsdet)."""
    return cache_root() / (version or installed_slsdet_version()) / "bin"


def binary_path(target: str, version: str | None = None) -> Path:
    """Path of one built executable (it may not exist yet: see :func:`ensure_built`)."""
    return bin_dir(version) / target


def is_built(version: str | None = None) -> bool:
    """True when every target is present and executable in the cache."""
    directory = bin_dir(version)
    return all(os.access(directory / t, os.X_OK) for t in TARGETS) and all(
        (directory / f).is_file() for f in DATA_FILES
    )


def _check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({REQUIRED_TOOLS[t] for t in missing}))
        raise SlsBuildError(
            f"cannot build slsDetectorPackage: missing {', '.join(missing)}. "
            f"Install them, e.g. `apt-get update && apt-get install -y cmake make gcc g++` "
            f"(Debian packages: {packages})"
        )


def _run(cmd: list[str], cwd: Path, log: Path, say: Callable[[str], None], step: str,
         env: dict[str, str] | None = None) -> None:
    """Run one build step, appending its output to ``log`` and echoing progress lines."""
    say(f"[sls-build] {step}: {' '.join(cmd)}")
    with log.open("a") as log_file:
        log_file.write(f"\n$ {' '.join(cmd)}\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            log_file.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            stripped = line.strip()
            if stripped.startswith("[") and "%]" in stripped[:8] and "Built target" in stripped:
                say(f"[sls-build]   {stripped}")
        rc = proc.wait()
    if rc != 0:
        joined = "\n".join(tail)
        raise SlsBuildError(f"{step} failed (exit {rc}); full log: {log}\n--- last lines ---\n{joined}")


def _tool_python(work: Path, log: Path, say: Callable[[str], None]) -> Path:
    """A throwaway venv with scikit-build-core: pip needs the sdist's build backend to read its metadata.

    Keeping it out of the project venv avoids adding a build-only dependency to the project.
    """
    tools = work / "tools-venv"
    python = tools / "bin" / "python"
    if not python.exists():
        say(f"[sls-build] creating tool venv {tools}")
        venv.EnvBuilder(with_pip=True, clear=True).create(tools)
    probe = subprocess.run([str(python), "-c", "import scikit_build_core"], capture_output=True)
    if probe.returncode != 0:
        _run([str(python), "-m", "pip", "install", "-q", "scikit-build-core"], work, log, say,
             "install scikit-build-core (build backend of the slsdet sdist)")
    return python


def _download_sdist(version: str, work: Path, log: Path, say: Callable[[str], None]) -> Path:
    existing = sorted(work.glob(f"slsdet-{version}.tar.gz"))
    if existing:
        return existing[0]
    python = _tool_python(work, log, say)
    dl = work / "download"
    dl.mkdir(exist_ok=True)
    _run([str(python), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
          "-d", str(dl), f"slsdet=={version}"], work, log, say, f"download slsdet=={version} sdist")
    found = sorted(dl.glob("slsdet-*.tar.gz"))
    if not found:
        raise SlsBuildError(f"pip download produced no slsdet-{version}.tar.gz in {dl}; see {log}")
    target = work / found[0].name
    found[0].replace(target)
    return target


def _extract(sdist: Path, work: Path, say: Callable[[str], None]) -> Path:
    source = work / "src"
    if source.exists():
        shutil.rmtree(source)
    say(f"[sls-build] extracting {sdist.name}")
    with tarfile.open(sdist) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(source, filter="data")
        else:
            tar.extractall(source)  # noqa: S202 - trusted PyPI sdist of the pinned version
    roots = [p for p in source.iterdir() if p.is_dir()]
    if len(roots) != 1 or not (roots[0] / "CMakeLists.txt").exists():
        raise SlsBuildError(f"unexpected sdist layout in {source}: no single top dir with CMakeLists.txt")
    return roots[0]


def _build(version: str, say: Callable[[str], None], jobs: int) -> None:
    _check_tools()
    root = cache_root() / version
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    log.write_text(f"slsDetectorPackage {version} build, {time.ctime()}\n")
    started = time.monotonic()
    sdist = _download_sdist(version, work, log, say)
    src = _extract(sdist, work, say)
    build = src / "build"
    build.mkdir()
    _run(["cmake", "..", *CMAKE_FLAGS], build, log, say, "configure")
    _run(["make", f"-j{jobs}", *TARGETS], build, log, say, f"compile {', '.join(TARGETS)}")
    staging = root / "bin.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for target in TARGETS:
        candidates = [build / "bin" / target, *build.rglob(target)]
        built = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        if built is None:
            raise SlsBuildError(f"make finished but {target} was not found under {build}; see {log}")
        shutil.copy2(built, staging / target)
    for name in DATA_FILES:
        data = next(iter(sorted(build.rglob(name))), None)
        if data is None:
            raise SlsBuildError(f"cmake did not produce {name} under {build}; see {log}")
        shutil.copy2(data, staging / name)
    for lib in (build / "lib").glob("*.so*") if (build / "lib").exists() else ():
        shutil.copy2(lib, staging / lib.name)
    final = root / "bin"
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    shutil.rmtree(work / "src", ignore_errors=True)
    say(f"[sls-build] done in {time.monotonic() - started:.0f} s: {final}")


def ensure_built(version: str | None = None, *, say: Callable[[str], None] | None = None,
                 jobs: int | None = None) -> Path:
    """Return the bin directory, building the executables first if the cache lacks them.

    Safe to call concurrently: the first caller builds under an exclusive lock, the others wait and
    then find the finished cache.
    """
    version = version or installed_slsdet_version()
    emit = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if is_built(version):
        return bin_dir(version)
    root = cache_root() / version
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit(f"[sls-build] another process is building {root}; waiting for its lock")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(version):
            _build(version, emit, jobs or max(1, min(2, os.cpu_count() or 1)))
    return bin_dir(version)


def main(argv: list[str] | None = None) -> int:
    """CLI: build (if needed) and print the bin directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None, help="slsdet version (default: the installed one)")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel make jobs (default 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    args = parser.parse_args(argv)
    version = args.version or installed_slsdet_version()
    if args.force and bin_dir(version).exists():
        shutil.rmtree(bin_dir(version))
    try:
        path = ensure_built(version, jobs=args.jobs)
    except SlsBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
