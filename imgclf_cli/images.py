"""Decoding images exactly one way, shared by training, evaluation, prediction and export.

Only Pillow and NumPy are used here (no TensorFlow), so the TensorFlow-free prediction path
and ``inspect-dataset`` decode images exactly as training does. The format is decided by the
file's content, never by its extension. Paths may be URLs of object stores (``s3://``...):
their bytes are read through ``imgclf_cli.filesystems`` and decoded exactly the same way.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf_cli import filesystems as remote
from imgclf_cli.filesystems import RemotePath, is_url

# Formats as Pillow names them after reading the header. MPO is what many phone cameras write:
# a JPEG with extra frames.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"})

DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says, read without decoding its pixels."""

    format: str
    mode: str
    width: int
    height: int


class UnreadableImage(Exception):
    """An image that cannot be decoded; ``reason`` says why in a few words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def describe_error(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, UnidentifiedImageError):
        return "not an image or an unsupported format"
    return text.splitlines()[0]


def read_header(path: str | Path | RemotePath) -> ImageHeader:
    """Identify an image from its content (cheap: only the header is read).

    Raises ``UnreadableImage`` for empty files, non-images and unsupported formats. A URL's
    object is asked for its first ``HEADER_BYTES`` only (one ranged GET), and read whole when
    its header does not fit in them.
    """
    if is_url(path):
        return read_remote_header(str(path))
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "empty file (0 bytes)")
        header = identify(path)
    except UnreadableImage:
        raise
    except DECODE_ERRORS as error:
        raise UnreadableImage(path, describe_error(error)) from error
    return checked(path, header)


def read_remote_header(url: str) -> ImageHeader:
    try:
        head = remote.read_bytes(url, 0, remote.HEADER_BYTES)
        if not head:
            raise UnreadableImage(url, "empty file (0 bytes)")
        try:
            header = identify(io.BytesIO(head))
        except DECODE_ERRORS:
            if len(head) < remote.HEADER_BYTES:
                raise  # that was the whole object
            header = identify(io.BytesIO(remote.read_bytes(url)))
    except UnreadableImage:
        raise
    except DECODE_ERRORS as error:
        raise UnreadableImage(url, describe_error(error)) from error
    return checked(url, header)


def identify(source: Path | BinaryIO) -> ImageHeader:
    """The header of the image in ``source``; Pillow's error when it is not one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(source) as image:
            return ImageHeader(
                format=image.format or "unknown",
                mode=image.mode,
                width=image.width,
                height=image.height,
            )


def checked(path: str | Path, header: ImageHeader) -> ImageHeader:
    if header.format not in SUPPORTED_FORMATS:
        raise UnreadableImage(path, f"unsupported image format {header.format}")
    return header


def image_source(path: str | Path) -> str | Path | BinaryIO:
    """What Pillow opens for ``path``: a local path itself; a URL's object, read in one GET.

    A missing object raises ``FileNotFoundError``, as a missing local file does when opened;
    a store that cannot be read raises ``RemoteStorageError``.
    """
    if is_url(path):
        return io.BytesIO(remote.read_bytes(str(path)))
    return path


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, P, RGBA, CMYK, 16-bit, float) as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: scale the actual range into 0..255 rather than clipping.
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = ((array - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str | Path, image_size: tuple[int, int]) -> np.ndarray:
    """Decode one image file as an RGB ``uint8`` array of shape ``(height, width, 3)``.

    GIFs and multi-frame files give their first frame; EXIF orientation is applied; the image
    is resized (bilinear, antialiased) to ``image_size`` = ``(height, width)``.
    Raises ``UnreadableImage`` when the file cannot be decoded (truncated, not an image...).
    """
    height, width = image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(image_source(path)) as image:
                if image.format not in SUPPORTED_FORMATS:
                    raise UnreadableImage(path, f"unsupported image format {image.format}")
                if image.format in ("JPEG", "MPO"):
                    # Let libjpeg decode at a reduced scale when the photo is much larger than
                    # the target: several times faster for camera images, same result size.
                    longest = max(height, width)
                    image.draft("RGB", (longest, longest))
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                image = to_rgb(image)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
    except UnreadableImage:
        raise
    except DECODE_ERRORS as error:
        raise UnreadableImage(path, describe_error(error)) from error
