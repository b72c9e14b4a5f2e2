"""A machine-readable wall-clock stamp drawn into the luma plane of a video frame, and read back.

The camera simulator (``tests/camsim.py --counter``, run under Debian's python3 without the venv)
draws it into every raw frame before the encoder; tests decode frames of a recording with FFmpeg
(``-pix_fmt gray``) and read it, so they know when each frame in a file was captured. Standard
library only: camsim imports this module as it is.

Layout: one row of ``BLOCKS`` square blocks of ``BLOCK`` x ``BLOCK`` pixels in the top-left corner
(16 px: one H.264 macroblock each, so a normal-quality encode keeps every block's level), each
black (luma 16) or white (luma 235):

    white, black                  sync marker (a frame without it has no stamp)
    48 bits, most significant first   milliseconds since the Unix epoch
    8 bits                        XOR of the six bytes of the time (a misread block fails the check)

The decoder reads the mean of each block's inner half (away from edges the encoder may blur) and
thresholds it at mid-grey.
"""

from __future__ import annotations

BLOCK = 16
TIME_BITS = 48
CHECK_BITS = 8
MARKER = (1, 0)
BLOCKS = len(MARKER) + TIME_BITS + CHECK_BITS
WIDTH = BLOCKS * BLOCK  # pixels the stamp needs across (928)
HEIGHT = BLOCK
BLACK, WHITE = 16, 235


def checksum(ms: int) -> int:
    return _xor(ms.to_bytes(TIME_BITS // 8, "big"))


def _xor(data: bytes) -> int:
    out = 0
    for byte in data:
        out ^= byte
    return out


def bits(ms: int) -> list[int]:
    """The stamp's blocks, 1 for white, left to right."""
    if not 0 <= ms < 1 << TIME_BITS:
        raise ValueError(f"time {ms} ms does not fit in {TIME_BITS} bits")
    value = (ms << CHECK_BITS) | checksum(ms)
    return list(MARKER) + [(value >> i) & 1 for i in range(TIME_BITS + CHECK_BITS - 1, -1, -1)]


def encode_row(ms: int, width: int, background: int = BLACK) -> bytes:
    """One luma row (``width`` bytes) of the stamp; the frame's top ``HEIGHT`` rows all hold it."""
    if width < WIDTH:
        raise ValueError(f"a frame stamp needs a frame at least {WIDTH} px wide, not {width}")
    row = b"".join(bytes((WHITE if b else BLACK,)) * BLOCK for b in bits(ms))
    return row + bytes((background,)) * (width - WIDTH)


def decode(gray: bytes, width: int, height: int | None = None) -> int:
    """The stamp (ms since the epoch) in a frame of 8-bit luma, rows of ``width`` bytes, top row first.

    ValueError when the frame holds no readable stamp (no marker, or the check fails).
    """
    rows = len(gray) // width if height is None else height
    if width < WIDTH or rows < HEIGHT or len(gray) < width * HEIGHT:
        raise ValueError(f"a {width}x{rows} frame is too small for a stamp ({WIDTH}x{HEIGHT})")
    inner = range(BLOCK // 4, BLOCK - BLOCK // 4)
    levels = []
    for block in range(BLOCKS):
        x0 = block * BLOCK
        total = sum(gray[y * width + x0 + x] for y in inner for x in inner)
        levels.append(total / (len(inner) ** 2))
    read = [1 if level >= (BLACK + WHITE) / 2 else 0 for level in levels]
    if tuple(read[: len(MARKER)]) != MARKER:
        raise ValueError(f"no stamp marker (block levels {[round(v) for v in levels[:2]]})")
    value = 0
    for b in read[len(MARKER) :]:
        value = (value << 1) | b
    ms, check = value >> CHECK_BITS, value & ((1 << CHECK_BITS) - 1)
    if checksum(ms) != check:
        raise ValueError(f"stamp check failed (read {ms} ms, check {check:#04x} != {checksum(ms):#04x})")
    return ms
