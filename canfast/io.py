"""Run directories and files, written atomically: a killed run leaves the old file or the new
one, never half of one. Outputs are JSON and safetensors only; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from canfast.errors import BadInput

_UMASK = os.umask(0)
os.umask(_UMASK)


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse a non-empty existing one unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInput(f"output directory {path} already exists; pass --overwrite to replace it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; a result file should be as readable as any other.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: malformed JSON ({exc.msg}, line {exc.lineno})") from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return write_bytes(path, data)


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"score file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise BadInput(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata
