"""Wire format of buffer replication (stream-send -> stream-recv over ZMQ TCP).

Every message starts with a 32-byte stream header ``<4sHHQQQ>``: magic ``SDQR``, version, kind,
sender epoch (random per sender process), sequence number and an auxiliary value. The sequence
numbers every image the sender took from the producer (1, 2, ...), including the ones it could not
send, so the receiver can count what never arrived.

Kinds and their parts:

* ``IMAGE``: [header, 56-byte ImageMetadata, slot metadata (the producer's, verbatim), image bytes].
  The bytes go out zero-copy from the sender's ring slot, so they are only trusted once a later
  ``VERDICT`` confirms the slot was not overwritten while the bytes were on their way out.
* ``LAPPED``: [header, 56-byte ImageMetadata] - the slot was overwritten before the sender could read
  it (the sender is too slow for the producer); a status instead of corrupted data.
* ``VERDICT``: [header (seq = every image up to here is resolved at the sender), torn sequence numbers
  as little-endian uint64, JSON sender status or empty]. "Torn" images were overwritten during
  transmission and must not be published. Verdicts also serve as heartbeats (once per second).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

MAGIC = b"SDQR"
VERSION = 1
HEADER = struct.Struct("<4sHHQQQ")
HEADER_BYTES = HEADER.size


class Kind(IntEnum):
    IMAGE = 1
    LAPPED = 2
    VERDICT = 3


class WireError(ValueError):
    """A message that is not a replication message of this version; the text says what is wrong."""


@dataclass(frozen=True)
class StreamHeader:
    kind: Kind
    epoch: int
    seq: int
    aux: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.kind, self.epoch, self.seq, self.aux)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> StreamHeader:
        if len(data) != HEADER_BYTES:
            raise WireError(f"stream header: expected {HEADER_BYTES} bytes, got {len(data)}")
        magic, version, kind, epoch, seq, aux = HEADER.unpack(data)
        if magic != MAGIC:
            raise WireError(f"stream header: bad magic {magic!r} (is the peer a std-daq stream-send?)")
        if version != VERSION:
            raise WireError(f"stream header: version {version}, this receiver speaks {VERSION}")
        try:
            return cls(Kind(kind), epoch, seq, aux)
        except ValueError:
            raise WireError(f"stream header: unknown message kind {kind}") from None


def pack_seqs(seqs: list[int]) -> bytes:
    return np.asarray(seqs, dtype="<u8").tobytes()


def unpack_seqs(data: bytes) -> list[int]:
    if len(data) % 8:
        raise WireError(f"verdict: torn list of {len(data)} bytes is not a multiple of 8")
    return np.frombuffer(data, dtype="<u8").tolist()
