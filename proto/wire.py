"""Protobuf's wire format, for answers assembled from bytes instead of built as messages.

An answer's fixed part (model name, version, each tensor's name, dtype and shape) is the same
for every request of a model version and batch size: the servers serialize it once, as a real
message, and per request append only the id and each tensor's bytes as length-delimited
fields. A protobuf parser reads concatenated messages as one, merging them (an embedded message
field that occurs twice is merged, a repeated one appended), so the result is the message the
slow path would have built, field for field (tests/proto/test_wire.py checks both encoders).
Appending bytes costs a fraction of building the message each time (docs/performance.md).
"""

from __future__ import annotations

import sys

__all__ = ["LENGTH_DELIMITED", "LITTLE_ENDIAN", "length_delimited", "tag", "varint"]

LENGTH_DELIMITED = 2  # wire type of strings, bytes and embedded messages
# Numbers go little-endian on the wire: a native array's tobytes() is its wire bytes only here.
LITTLE_ENDIAN = sys.byteorder == "little"


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer, least significant group first."""
    if value < 0:
        raise ValueError(f"a varint here is non-negative, got {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field_number: int, wire_type: int = LENGTH_DELIMITED) -> bytes:
    """The key that starts a field: its number and wire type."""
    return varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A bytes, string or embedded-message field holding `payload`."""
    return tag(field_number) + varint(len(payload)) + payload
