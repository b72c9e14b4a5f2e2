"""The wall-clock stamp the camera simulator draws into frames (tests/framestamp.py): encode, decode."""

from __future__ import annotations

import framestamp
import pytest

W = 1280


def frame(ms: int, width: int = W, height: int = 32, background: int = framestamp.BLACK) -> bytearray:
    """A luma frame as camsim draws it: the stamp row repeated over the top rows, background below."""
    row = framestamp.encode_row(ms, width, background)
    return bytearray(row * framestamp.HEIGHT + bytes((background,)) * (width * (height - framestamp.HEIGHT)))


@pytest.mark.parametrize("ms", [0, 1, 1_796_582_851_054, (1 << 48) - 1])
def test_a_stamp_reads_back_as_written(ms: int) -> None:
    assert framestamp.decode(bytes(frame(ms)), W) == ms


def test_the_layout_is_marker_time_check_in_16_px_blocks() -> None:
    bits = framestamp.bits(0x0102_0304_0506)
    assert len(bits) == framestamp.BLOCKS == 58 and framestamp.WIDTH == 928
    assert bits[:2] == [1, 0]
    assert int("".join(map(str, bits[2:50])), 2) == 0x0102_0304_0506
    assert int("".join(map(str, bits[50:])), 2) == 0x01 ^ 0x02 ^ 0x03 ^ 0x04 ^ 0x05 ^ 0x06
    row = framestamp.encode_row(0x0102_0304_0506, W)
    assert len(row) == W and row[:16] == bytes([235]) * 16 and row[16:32] == bytes([16]) * 16


def test_encoding_blur_and_level_shifts_within_a_block_do_not_change_the_reading() -> None:
    ms = 1_796_582_851_054
    gray = frame(ms)
    for y in range(framestamp.HEIGHT):  # block edges smeared, levels off by 60 either way
        for x in range(framestamp.WIDTH):
            edge = x % framestamp.BLOCK in (0, 1, 14, 15) or y in (0, 1, 14, 15)
            gray[y * W + x] = (
                128 if edge else max(0, min(255, gray[y * W + x] + (60 if gray[y * W + x] < 128 else -60)))
            )
    assert framestamp.decode(bytes(gray), W) == ms


def test_a_misread_block_fails_the_check() -> None:
    ms = 1_796_582_851_054
    gray = frame(ms)
    x0 = (2 + 47) * framestamp.BLOCK  # the time's lowest bit
    for y in range(framestamp.HEIGHT):
        for x in range(x0, x0 + framestamp.BLOCK):
            gray[y * W + x] = 255 - gray[y * W + x]
    with pytest.raises(ValueError, match="check failed"):
        framestamp.decode(bytes(gray), W)


def test_a_frame_without_a_stamp_is_refused() -> None:
    with pytest.raises(ValueError, match="no stamp marker"):
        framestamp.decode(bytes(W * 32), W)
    with pytest.raises(ValueError, match="too small"):
        framestamp.decode(bytes(900 * 32), 900)
    with pytest.raises(ValueError, match="at least 928 px wide"):
        framestamp.encode_row(0, 900)
    with pytest.raises(ValueError, match="does not fit in 48 bits"):
        framestamp.bits(1 << 48)
