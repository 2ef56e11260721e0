"""Is an image file whole? OpenCV decodes a JPEG cut short after its header into a grey-filled
image with only a libjpeg warning on stderr, so "it decoded" does not mean "it is whole".

We look for the end-of-image marker (JPEG) and the IEND chunk (PNG): an interrupted copy or
unzip (common with the 12k-image Severstal download) loses exactly those. Shared by the data
layer (training, `check`) and the deploy predictor.
"""

from __future__ import annotations

# Bytes some writers leave after the end marker (padding); still a whole file.
_TRAILING = b"\x00\r\n \t"
_HEAD, _TAIL = 8, 4096


def truncation_problem(data: bytes) -> str | None:
    """Why `data` is an incomplete JPEG/PNG, or None if it looks whole (or is another format).

    Only the first 8 and last 4096 bytes matter: `head_and_tail` gives them without reading a
    whole file.
    """
    if data[:3] == b"\xff\xd8\xff":
        tail = data[-_TAIL:].rstrip(_TRAILING)
        if not tail.endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker): the file was cut short, e.g. by an interrupted copy"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk): the file was cut short"
    return None


def head_and_tail(buffer) -> bytes:
    """The bytes `truncation_problem` looks at, from a bytes-like or uint8 array."""
    data = memoryview(buffer).cast("B") if not isinstance(buffer, bytes) else buffer
    if len(data) <= _HEAD + _TAIL:
        return bytes(data)
    return bytes(data[:_HEAD]) + bytes(data[-_TAIL:])
