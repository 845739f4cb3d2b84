"""Framing on the parent-worker pipe: whole messages, a clean end, torn and oversized frames refused."""

from __future__ import annotations

import io
import os
import struct

import pytest

from airflow_provider_cxpg.worker.protocol import (
    MAX_FRAME_BYTES,
    FrameReader,
    FrameWriter,
    Heartbeat,
    Shutdown,
    encode_frame,
)


def test_frames_round_trip_over_a_pipe_and_end_cleanly() -> None:
    read_fd, write_fd = os.pipe()
    writer = FrameWriter(write_fd)
    messages = [Heartbeat(seq=1, query_id=None), Shutdown(), {"nested": [1, 2.5, "x" * 10_000]}]
    for message in messages:
        writer.send(message)
    writer.close()
    with os.fdopen(read_fd, "rb") as stream:
        reader = FrameReader(stream)
        assert [reader.receive() for _ in messages] == messages
        assert reader.receive() is None  # end of stream, not an error
    with pytest.raises(BrokenPipeError):
        writer.send(Shutdown())  # a closed writer refuses instead of writing to a reused descriptor


def test_a_torn_frame_reads_as_the_end_of_the_channel() -> None:
    frame = encode_frame(Heartbeat(seq=1, query_id=None))
    assert FrameReader(io.BytesIO(frame[:-3])).receive() is None  # the worker died mid-write
    assert FrameReader(io.BytesIO(frame[:2])).receive() is None  # inside the header


def test_an_oversized_frame_is_refused_before_its_payload_is_read() -> None:
    # A length past the limit is garbage (or a hostile peer): refused without allocating it.
    stream = io.BytesIO(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"never read")
    with pytest.raises(ValueError, match="exceeds"):
        FrameReader(stream).receive()
    assert stream.read() == b"never read"
