"""Pieces shared by the stream processes: TCP liveness options, peer tracking, re-attaching rings."""

from __future__ import annotations

import os

import zmq
from zmq.utils.monitor import recv_monitor_message

from daq_backend.ram_buffer import RingBuffer, shm_path


def set_liveness(sock: zmq.Socket, heartbeat_ms: int = 1000) -> None:
    """ZMTP heartbeats so a peer that vanished without closing TCP (host or network gone, not just a
    killed process) is noticed within a few seconds, instead of queueing into a dead connection."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 10 * heartbeat_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


class PeerMonitor:
    """Counts the live ZMTP peers of a socket (handshake done minus disconnected) and reconnections,
    from the socket's monitor events, so status can say "no receiver" instead of guessing."""

    EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

    def __init__(self, sock: zmq.Socket) -> None:
        self.socket = sock.get_monitor_socket(self.EVENTS)
        self.peers = 0
        self.connections = 0

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def drain(self) -> bool:
        """Process queued events without blocking; True if the peer count changed."""
        changed = False
        while True:
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return changed
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.peers += 1
                self.connections += 1
                changed = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)
                changed = True

    def close(self) -> None:
        self.socket.close(linger=0)


class AttachedRing:
    """A ring this process reads but does not own; re-attached when the producer re-created the
    segment (a new inode after a restart), so a producer restart heals without restarting us."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ring: RingBuffer | None = None
        self._inode = 0

    def get(self, timeout: float = 0.0) -> RingBuffer | None:
        if self.ring is None:
            try:
                inode = os.stat(shm_path(self.name)).st_ino
                self.ring = RingBuffer.attach(self.name, timeout=timeout)
                self._inode = inode
            except FileNotFoundError:
                self.ring = None
        return self.ring

    def refreshed(self) -> bool:
        """Re-attach if the segment on disk is not the mapped one; True if the mapping changed."""
        try:
            inode = os.stat(shm_path(self.name)).st_ino
        except FileNotFoundError:
            return False
        if self.ring is not None and inode == self._inode:
            return False
        self.close()
        return self.get() is not None

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
