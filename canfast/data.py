"""Samples and their loaders: built-in data, JSONL files, image folders; and batching."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from canfast.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Sample:
    """One input: an image (a PIL image, or None for text-only models), a prompt, and optionally
    the reference answer and a category for per-category analysis."""

    image: Image.Image | None
    prompt: str
    target: str | None = None
    category: str | None = None

    def with_target(self, target: str) -> Sample:
        return replace(self, target=target)


def open_image(path: str | Path, where: str) -> Image.Image:
    """The image at ``path`` in RGB; a missing or unreadable file is bad input, named with
    ``where`` (a file and line, a folder, an option)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise BadInput(f"{where}: cannot read image {path}: {exc}") from None


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read ``{"image": path?, "prompt": str, "target": str?, "category": str?}`` lines.

    Image paths are relative to the file. A line without ``image`` is a text-only sample.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
        image = record.get("image")
        samples.append(
            Sample(
                image=open_image(path.parent / image, where) if image else None,
                prompt=record["prompt"],
                target=record.get("target"),
                category=record.get("category"),
            )
        )
    if not samples:
        raise BadInput(f"{path}: no samples in the file")
    return samples


def load_image_folder(folder: str | Path, prompt: str) -> list[Sample]:
    """Every image in ``folder`` (sorted by name), each with the same prompt."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadInput(f"{folder}: no images in the folder")
    return [Sample(image=open_image(p, str(folder)), prompt=prompt) for p in paths]


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
