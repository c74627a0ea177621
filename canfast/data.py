"""Samples and their loaders: built-in data, JSONL files, image folders; and batching."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from canfast.errors import BadInput, warn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


KEYS = ("image", "prompt", "target", "category")


@dataclass(frozen=True)
class Sample:
    """One input: an image, a prompt, and optionally the reference answer and a category for
    per-category analysis.

    ``image`` is a path (decoded only when a batch needs it, see :meth:`load_image`), a PIL
    image already in memory, or None for text-only models.
    """

    image: Image.Image | Path | None
    prompt: str
    target: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image, str):
            object.__setattr__(self, "image", Path(self.image))

    def with_target(self, target: str) -> Sample:
        return replace(self, target=target)

    def load_image(self, need: int | None = None) -> Image.Image | None:
        """The image in RGB, decoded now and kept by no one but the caller.

        An image given in memory comes back as it is. An image on disk is decoded at most at
        twice ``need`` (the side the processor resizes to): a larger one is reduced by an
        integer factor (a box filter; JPEGs decode directly at the smaller scale) so that its
        shorter side stays at least ``2 * need``, and the processor's own resize does the rest.
        An image over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is bad
        input: raise the limit to read it.
        """
        if self.image is None or isinstance(self.image, Image.Image):
            return self.image
        return decode_image(self.image, need=need)

    def image_digest(self) -> bytes:
        """Bytes that identify the image, for data fingerprints: the file's contents for a
        path (read, not decoded), the pixels for an image in memory."""
        if self.image is None:
            return b""
        if isinstance(self.image, Image.Image):
            return self.image.tobytes()
        digest = hashlib.sha256()
        try:
            with open(self.image, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise BadInput(f"cannot read image {self.image}: {exc.strerror or exc}") from None
        return digest.digest()


def _check_size(image: Image.Image, path: Path, where: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadInput(
            f"{where}: image {path} is {width}x{height} = {width * height} pixels, over the "
            f"decoding limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale it first"
        )


@contextmanager
def _opened(path: Path, where: str) -> Iterator[Image.Image]:
    """The image file opened lazily (header read, pixels not yet decoded), within the decoding
    limit; every way it can fail is bad input naming ``where``."""
    if not path.is_file():
        raise BadInput(f"{where}: image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image, path, where)
                yield image
    except Image.DecompressionBombError:
        raise BadInput(
            f"{where}: image {path} is over twice the decoding limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS); downscale it first"
        ) from None
    except OSError as exc:
        raise BadInput(f"{where}: cannot read image {path}: {exc}") from None


def decode_image(path: str | Path, need: int | None = None, where: str | None = None):
    """The image at ``path`` in RGB, reduced to at least ``2 * need`` on its shorter side."""
    path = Path(path)
    with _opened(path, where or "image") as image:
        factor = 1
        if need:
            factor = max(1, min(image.size) // (2 * need))
        if factor > 1 and image.format == "JPEG":
            image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
            factor = max(1, min(image.size) // (2 * need))
        image = image.convert("RGB")
        # Reducing can still meet a truncated file: inside the block, so it is bad input too.
        return image.reduce(factor) if factor > 1 else image


def check_image(path: str | Path, where: str) -> Path:
    """``path`` if it names a readable image within the decoding limit; only the header is
    read, so a data file's images cost no memory until a batch decodes them."""
    path = Path(path)
    with _opened(path, where):
        pass
    return path


def open_image(path: str | Path, where: str) -> Image.Image:
    """The image at ``path`` decoded in RGB; a missing or unreadable file is bad input, named
    with ``where`` (a file and line, a folder, an option)."""
    return decode_image(path, where=where)


def processor_image_side(processor) -> int | None:
    """The largest side a processor resizes images to (its ``size`` or ``crop_size``)."""
    image_processor = getattr(processor, "image_processor", processor)
    sides = []
    for attr in ("size", "crop_size"):
        value = getattr(image_processor, attr, None)
        if isinstance(value, int):
            sides.append(value)
            continue
        if not isinstance(value, dict):
            value = getattr(value, "__dict__", {})  # transformers' SizeDict
        sides += [v for v in value.values() if isinstance(v, int)]
    return max(sides) if sides else None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines, decoded one by one so that a byte that is not UTF-8 is named."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(
                f"{path}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                f"{exc.start + 1}); save the file as UTF-8"
            ) from None


IMAGE_PLACEHOLDER = "<image>"


def check_prompt(prompt: str, where: str) -> str:
    """Refuse a prompt with more than one image placeholder: a sample carries one image."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise BadInput(
            f"{where}: the prompt has {count} image placeholders ({IMAGE_PLACEHOLDER}); a sample "
            "carries one image"
        )
    return prompt


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read ``{"image": path?, "prompt": str, "target": str?, "category": str?}`` lines.

    Image paths are relative to the file; images are checked now and decoded only when a batch
    needs them. A line without ``image`` is a text-only sample. Other keys are ignored, with one
    warning naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    samples = []
    unknown: set[str] = set()
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{where}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BadInput(f'{where}: each line must be an object with a string "prompt"')
        for key in ("image", "target", "category"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise BadInput(f'{where}: "{key}" must be a string')
        check_prompt(record["prompt"], where)
        target = record.get("target")
        if target is not None and not target.strip():
            raise BadInput(f'{where}: "target" is empty; give the answer, or leave the key out')
        unknown.update(k for k in record if k not in KEYS)
        image = record.get("image")
        samples.append(
            Sample(
                image=check_image(path.parent / image, where) if image else None,
                prompt=record["prompt"],
                target=target,
                category=record.get("category"),
            )
        )
    if not samples:
        raise BadInput(f"{path}: no samples in the file")
    if unknown:
        warn(
            f"{path}: ignoring unknown keys {', '.join(sorted(unknown))} (known: {', '.join(KEYS)})"
        )
    return samples


def load_image_folder(folder: str | Path, prompt: str) -> list[Sample]:
    """Every image in ``folder`` (sorted by name), each with the same prompt."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadInput(f"{folder}: no images in the folder")
    check_prompt(prompt, "--prompt")
    return [Sample(image=check_image(p, str(folder)), prompt=prompt) for p in paths]


def load_data(
    spec: str | Path, prompt: str | None = None, limit: int | None = None
) -> list[Sample]:
    """Load samples from ``builtin:NAME``, a ``.jsonl`` file, or an image folder with ``prompt``."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        from canfast.zoo import builtin_samples

        samples = builtin_samples(spec.removeprefix("builtin:"))
    elif Path(spec).is_dir():
        if prompt is None:
            raise BadInput(f"{spec}: an image folder needs --prompt")
        samples = load_image_folder(spec, prompt)
    else:
        samples = load_jsonl(spec)
    return samples[:limit] if limit else samples


def batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), batch_size):
        yield list(samples[start : start + batch_size])
