"""A C-speed UDP drain: the "loopback limit" receiver that does nothing but count.

Why C: a Python ``recv_into`` loop costs 3-5 us per packet, i.e. half a core at the virtual Jungfrau's
rate, on a machine where the sender itself needs most of a core; the limit of the sender must be
measured with a receiver that takes (almost) nothing from it. The program is compiled once with the
system C compiler (needed for the slsDetectorPackage build anyway) into a cache keyed by its source.

``udp_drain PORT RCVBUF PACKETS_PER_FRAME`` binds 127.0.0.1:PORT, asks ``SO_RCVBUF`` = RCVBUF (capped by
``net.core.rmem_max``, exactly like ``slsReceiver``), prints ``ready <granted>`` and counts datagrams in
blocking ``recvmmsg`` batches until SIGTERM/SIGINT, then prints one JSON line: packets, bytes, frames
seen (changes of the 64-bit frame number that starts every slsDetectorPackage packet), complete frames,
and the monotonic times of the first and last packet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

DRAIN_SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXPKT 9000

static volatile sig_atomic_t stop_flag = 0;
static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: udp_drain PORT RCVBUF PACKETS_PER_FRAME\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int rcvbuf = atoi(argv[2]);
    long ppf = atol(argv[3]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) != 0) {
        perror("SO_RCVBUF");
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("bind"); return 1; }
    int granted = 0;
    socklen_t len = sizeof granted;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &granted, &len);
    printf("ready %d\n", granted / 2);
    fflush(stdout);

    static char bufs[BATCH][MAXPKT];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAXPKT;
    }
    unsigned long long packets = 0, bytes = 0, frames = 0, complete = 0;
    uint64_t cur = 0;
    long in_frame = 0;
    int have = 0;
    double first = 0.0, last = 0.0;
    /* blocking batches: one system call per up to BATCH datagrams; the timeout lets a signal end it */
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (!stop_flag) {
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue; /* timeout or EINTR */
        double t = now_mono();
        if (packets == 0) first = t;
        last = t;
        for (int i = 0; i < n; i++) {
            unsigned int sz = msgs[i].msg_len;
            packets++;
            bytes += sz;
            if (sz >= 8) {
                uint64_t fnum;
                memcpy(&fnum, bufs[i], 8);
                if (!have || fnum != cur) {
                    frames++;
                    cur = fnum;
                    in_frame = 0;
                    have = 1;
                }
                if (++in_frame == ppf) complete++;
            }
        }
    }
    printf("{\"packets\": %llu, \"bytes\": %llu, \"frames_seen\": %llu, \"frames_complete\": %llu, "
           "\"first\": %.6f, \"last\": %.6f, \"rcvbuf\": %d}\n",
           packets, bytes, frames, complete, first, last, granted / 2);
    fflush(stdout);
    close(fd);
    return 0;
}
"""


class DrainBuildError(RuntimeError):
    """The drain could not be compiled; the message says what is missing."""


def drain_cache_dir() -> Path:
    root = os.environ.get("STD_DAQ_BENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "std-daq" / "bench"


def ensure_drain() -> Path:
    """Path of the compiled drain, building it on first use (atomically, safe to race)."""
    digest = hashlib.sha256(DRAIN_SOURCE.encode()).hexdigest()[:12]
    target = drain_cache_dir() / f"udp_drain-{digest}"
    if os.access(target, os.X_OK):
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise DrainBuildError("no C compiler: install one (`apt-get install -y gcc`) to measure the "
                              "loopback limit")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = target.with_name(f"{target.name}.{os.getpid()}.c")
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    source.write_text(DRAIN_SOURCE)
    try:
        proc = subprocess.run([compiler, "-O2", "-o", str(partial), str(source)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise DrainBuildError(f"compiling the UDP drain failed:\n{proc.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        source.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class DrainResult:
    packets: int
    bytes: int
    frames_seen: int
    frames_complete: int
    first: float
    last: float
    rcvbuf: int

    @classmethod
    def parse(cls, line: str) -> DrainResult:
        """The drain's final JSON line."""
        data = json.loads(line)
        return cls(int(data["packets"]), int(data["bytes"]), int(data["frames_seen"]),
                   int(data["frames_complete"]), float(data["first"]), float(data["last"]),
                   int(data["rcvbuf"]))

    @property
    def span(self) -> float:
        """Seconds between the first and the last packet."""
        return max(0.0, self.last - self.first)


class UdpDrain:
    """The drain as a child process (its CPU is measured like every other receiver's)."""

    def __init__(self, port: int, rcvbuf: int, packets_per_frame: int) -> None:
        self.port = port
        self.rcvbuf_requested = rcvbuf
        self.packets_per_frame = packets_per_frame
        self.rcvbuf = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> UdpDrain:
        binary = ensure_drain()
        self._proc = subprocess.Popen(
            [str(binary), str(self.port), str(self.rcvbuf_requested), str(self.packets_per_frame)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "ready N", or EOF when it failed
        if not line.startswith("ready"):
            err = self._proc.stderr.read() if self._proc.stderr else ""
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"UDP drain on port {self.port} did not start: {line!r} {err.strip()}")
        self.rcvbuf = int(line.split()[1])
        return self

    def finish(self, timeout: float = 10.0) -> DrainResult:
        """Stop the drain (SIGTERM, by PID) and return its counts."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        out, err = self._proc.communicate(timeout=timeout)
        self._proc = None
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"UDP drain on port {self.port} printed no result: {err.strip()}")
        return DrainResult.parse(lines[-1])

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
