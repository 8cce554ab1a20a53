"""Pieces shared by the stream processes: TCP liveness options, peer tracking, re-attaching rings."""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message


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
