"""Encoded image bytes -> RGB PIL image, with decoder failures turned into ``BadRecordError``."""

from __future__ import annotations

import io
import struct

from PIL import Image

from data.bad_records import BadRecordError

# PIL's own guard against decompression bombs stays on: a crafted file must not exhaust memory.
# IndexError, TypeError, KeyError and struct.error are what PIL's format readers raise on malformed
# data (ImageFile turns them into SyntaxError while opening, but not on every later path): a bad
# image must reach the user as a BadRecordError naming the record, also from a DataLoader worker.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, IndexError,
                  TypeError, KeyError, struct.error)


def decode_rgb(data: bytes, *, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise BadRecordError(f"cannot decode the image in {source} ({type(exc).__name__}: {exc}); "
                             "replace the file, or pass --skip-bad-records to skip it") from None


def check_image_header(data: bytes, *, source: str) -> None:
    """Cheap check that ``data`` is an image format PIL knows (parses the header only)."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except _DECODE_ERRORS as exc:
        raise BadRecordError(f"{source} is not a readable image ({type(exc).__name__}); remove or replace it, "
                             "or pass --skip-bad-records to leave it out") from None
