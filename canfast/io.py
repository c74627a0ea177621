"""Run directories and files, written atomically: a killed run leaves the old file or the new
one, never half of one; a run directory holds the files of one complete run or of none.
Outputs are JSON and safetensors only; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from canfast.errors import BadInput

_UMASK = os.umask(0)
os.umask(_UMASK)


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse a non-empty existing one unless ``overwrite``.

    Prefer :class:`RunDir`, which also locks the directory and replaces it whole."""
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
    return write_bytes(path, _sorted_header(data))


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. safetensors writes them in
    hash order, which differs from process to process; sorted, the same tensors and metadata
    give the same bytes, so two runs' files can be compared as files."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the tensor data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


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


# ----- run directories -----------------------------------------------------------------------

MANIFEST = "manifest.json"
# What canfast writes into a run directory. ``--overwrite`` replaces a directory only when every
# file in it is one of these: it never deletes files a person put there.
RUN_FILE_PATTERNS = ("*.json", "*.jsonl", "*.safetensors", "*.html", "*.png", "*.svg", "*.csv")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux), which tells a live run from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started


def _owner(path: Path) -> tuple[int, str | None] | None:
    """The (pid, start time) a lock or staging file names, or None when unreadable."""
    try:
        record = json.loads(path.read_text())
        return int(record["pid"]), record.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunDir:
    """A run directory that holds the files of one complete run, or of none.

    Use it around the whole run::

        with RunDir(out, overwrite=True) as run:   # checks --out and locks it, before any work
            save(run.file("scores.safetensors"))   # files go to a staging directory beside out
            ...
        # on success the staging directory, with its manifest, replaces ``out`` whole

    - Checked at once: ``out`` under a file, not a directory, unwritable, or holding files of a
      run without ``overwrite`` is bad input.
    - Locked: a second run into the same ``out`` is bad input naming the process that holds it;
      the lock of a process that no longer runs is taken over.
    - Whole: a failure, an interrupt or SIGTERM removes the staging directory and leaves ``out``
      as it was; an earlier complete run is never destroyed by a run that does not complete.
    - ``amend=True`` starts from a copy of the existing run's files (to add a report to it).
    - ``resumable=True`` stages in ``.NAME.partial`` beside ``out``, whose ``chunks/`` fill as
      work finishes (:mod:`canfast.work`). A run that does not complete keeps it when it holds
      finished chunks; ``resume=True`` takes it up again, after :meth:`pin` has checked that the
      new command computes the same numbers. ``commit`` drops the chunks.
    """

    def __init__(
        self,
        path: str | Path,
        overwrite: bool = False,
        amend: bool = False,
        command: str | None = None,
        resumable: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.overwrite = overwrite or amend
        self.resumable = resumable or resume
        self.resume = resume
        self.resumed = 0  # finished chunks found in the partial run taken up again
        self.kept: Path | None = None  # the partial run left for --resume, after close()
        self.pinned: dict = {}
        self.amend = amend
        self.command = command
        self.stage: Path | None = None
        self._lock: Path | None = None
        self._old_sigterm = None
        self._made: list[Path] = []
        self.committed = False

    # ----- start -------------------------------------------------------------------------------

    def __enter__(self) -> RunDir:
        self.open()
        return self

    def open(self) -> RunDir:
        self._check()
        try:
            self._acquire()
        except BaseException:
            self.close()
            raise
        try:
            self._recover()
            self._check_contents()
            self._make_stage()
        except BaseException:
            self.close()
            raise
        self._trap_sigterm()
        return self

    def _check(self) -> None:
        path = self.path
        for parent in [path, *path.parents]:
            if parent.exists():
                if not parent.is_dir():
                    if parent == path:
                        raise BadInput(f"output {path} exists and is not a directory")
                    raise BadInput(f"output {path} lies under {parent}, a file, not a directory")
                break
        missing = [p for p in path.parents if not p.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made = missing  # removed again, if empty, when the run does not complete
        except OSError as exc:
            raise BadInput(f"cannot create output {path}: {exc.strerror or exc}") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise BadInput(f"cannot write output {path}: {path.parent} is not writable")
        if self.amend and not path.is_dir():
            raise BadInput(f"{path}: no run directory there")

    def _sibling(self, tag: str, pid: int | None = None) -> Path:
        suffix = f".{pid}" if pid is not None else ""
        return self.path.parent / f".{self.path.name}.{tag}{suffix}"

    def _acquire(self) -> None:
        lock = self._sibling("lock")
        me = {"pid": os.getpid(), "started": _process_start(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(lock)
                if owner is None:
                    # A lock being written this instant, or the remains of a killed writer.
                    time.sleep(0.05)
                    owner = _owner(lock)
                if owner is not None and _alive(*owner):
                    raise BadInput(
                        f"output {self.path} is in use by another canfast run (process "
                        f"{owner[0]}); wait for it, or choose another --out"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise BadInput(f"cannot write output {self.path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self._lock = lock
            return
        raise BadInput(f"output {self.path}: cannot take its lock {lock}")

    def _recover(self) -> None:
        """Undo what a killed run left beside ``out``: its staging directory, or an earlier run
        moved aside in the instant of a swap."""
        for leftover in self.path.parent.glob(f".{self.path.name}.*"):
            tag, _, pid = leftover.name.removeprefix(f".{self.path.name}.").partition(".")
            if tag not in ("staging", "old") or not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # cannot happen under our lock, unless the pid was reused: leave it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            if tag == "old" and not self.path.exists():
                leftover.rename(self.path)
            else:
                shutil.rmtree(leftover, ignore_errors=True)

    def _check_contents(self) -> None:
        path = self.path
        if self.resume and not partial_path(path).is_dir():
            if read_manifest_quiet(path).get("complete"):
                raise BadInput(
                    f"{path} is a complete run: nothing to resume (--overwrite runs it again)"
                )
        if not path.is_dir():
            return
        present = [p for p in path.iterdir()]
        if not present or self.amend:
            return  # amending keeps every file and folder already there
        if not self.overwrite:
            raise BadInput(
                f"output directory {path} already exists; pass --overwrite to replace it"
            )
        foreign = [p.name for p in present if not _is_run_file(p)]
        if foreign:
            raise BadInput(
                f"output directory {path} holds files canfast did not write ({foreign[0]}"
                f"{', ...' if len(foreign) > 1 else ''}); refusing to replace it"
            )

    @property
    def chunks(self) -> Path:
        """Where the run's finished chunks go (in the staging directory)."""
        return self.file(CHUNKS)

    def _make_stage(self) -> None:
        if self.resumable:
            self._make_partial()
            return
        stage = self._sibling("staging", os.getpid())
        shutil.rmtree(stage, ignore_errors=True)
        try:
            stage.mkdir()
        except OSError as exc:
            raise BadInput(f"cannot write output {self.path}: {exc.strerror or exc}") from None
        self.stage = stage
        if self.amend:
            # Hard links: the copy costs no space, and files are replaced by rename, never
            # written in place, so the run being amended stays as it was until the swap.
            for item in self.path.iterdir():
                if item.is_dir():
                    shutil.copytree(item, stage / item.name, copy_function=_link_or_copy)
                elif item.name != MANIFEST:
                    _link_or_copy(item, stage / item.name)

    def _make_partial(self) -> None:
        partial = partial_path(self.path)
        done = _chunk_count(partial)
        if not self.resume and partial.is_dir() and done:
            if not self.overwrite:
                raise BadInput(
                    f"{self.path} has an unfinished run ({done} chunks done in {partial}); add "
                    "--resume to go on with it, or --overwrite to start again"
                )
            shutil.rmtree(partial)
        elif not self.resume:
            shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot write output {self.path}: {exc.strerror or exc}") from None
        self.stage = partial
        self.resumed = done if self.resume else 0
        if self.resume and (partial / MANIFEST).is_file():
            self.pinned = read_json(partial / MANIFEST).get("run", {})

    def pin(self, record: dict) -> None:
        """Record what fixes the run's numbers (model and data fingerprints, options) in the
        partial run's manifest. Resuming, refuse a command that differs in any of them."""
        if not self.resumable or self.stage is None:
            return
        for key, value in record.items():
            if key in self.pinned and self.pinned[key] != value:
                raise BadInput(
                    f"--resume: {self.path} was started with {key} = {self.pinned[key]!r}, and "
                    f"this command has {value!r}; use the first command's options, or "
                    "--overwrite to start again"
                )
        self.pinned.update(record)
        write_json(self.stage / MANIFEST, {"complete": False, "run": self.pinned})

    def _trap_sigterm(self) -> None:
        # SIGTERM ends Python without unwinding; turned into SystemExit, it runs the cleanup.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    # ----- during the run ----------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """Where to write the run's file ``name`` (in the staging directory)."""
        if self.stage is None:
            raise RuntimeError("RunDir used before open()")
        return self.stage / name

    # ----- end ---------------------------------------------------------------------------------

    def commit(self, failed: str | None = None) -> Path:
        """Swap the staged run in as ``out``, with a manifest that names its files.

        ``failed`` names a step after the main result that did not complete (a report, say):
        the files written so far are kept and the manifest says what is missing.
        """
        if self.stage is None or self.committed:
            raise RuntimeError("RunDir.commit() without an open run")
        files = sorted(str(p.relative_to(self.stage)) for p in self.stage.rglob("*") if p.is_file())
        manifest = {
            "canfast_version": _version(),
            "command": self.command,
            "pid": os.getpid(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": failed is None,
            "files": [f for f in files if f != MANIFEST],
        }
        if failed is not None:
            manifest["failed"] = failed
        if self.pinned:
            manifest["run"] = self.pinned
        shutil.rmtree(self.stage / CHUNKS, ignore_errors=True)
        manifest["files"] = [f for f in manifest["files"] if not f.startswith(f"{CHUNKS}/")]
        write_json(self.stage / MANIFEST, manifest)
        old = self._sibling("old", os.getpid())
        if self.path.exists():
            self.path.rename(old)
        self.stage.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.stage = None
        self.committed = True
        return self.path

    def close(self) -> None:
        """Drop what was staged (unless committed) and release the lock."""
        if self.stage is not None:
            if self.resumable and _chunk_count(self.stage):
                self.kept = self.stage  # finished work, for --resume
            else:
                shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        self._release()
        if not self.committed:
            for made in self._made:  # innermost first
                try:
                    made.rmdir()
                except OSError:
                    break
        self._made = []

    def _release(self) -> None:
        if self._lock is not None:
            owner = _owner(self._lock)
            if owner is not None and owner[0] == os.getpid():
                self._lock.unlink(missing_ok=True)
            self._lock = None

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None and not self.committed:
                self.commit()
        finally:
            self.close()


CHUNKS = "chunks"


def partial_path(out: str | Path) -> Path:
    """Where a resumable run into ``out`` keeps its work until it completes."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.partial"


def _chunk_count(partial: Path) -> int:
    chunks = partial / CHUNKS
    return sum(1 for _ in chunks.glob("*.safetensors")) if chunks.is_dir() else 0


def read_manifest_quiet(path: Path) -> dict:
    try:
        return read_manifest(path) or {}
    except BadInput:
        return {}


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _is_run_file(path: Path) -> bool:
    if path.is_dir():
        return False
    return any(path.match(pattern) for pattern in RUN_FILE_PATTERNS)


def _version() -> str:
    from canfast import __version__

    return __version__


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of run directory ``path``, or None for a run written before manifests."""
    manifest = Path(path) / MANIFEST
    return read_json(manifest) if manifest.is_file() else None


def check_finite(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """Refuse a tensor file with NaN or inf in it, naming the first tensor that has one."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise BadInput(f"{path}: {key} holds {bad} NaN or infinite values")


# ----- neurons.json --------------------------------------------------------------------------


def tie_groups(scores: list[float]) -> list[tuple[int, int]]:
    """``(first index, size)`` of every run of equal scores longer than one, in a ranking
    sorted best first."""
    groups, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or scores[i] != scores[start]:
            if i - start > 1:
                groups.append((start, i - start))
            start = i
    return groups


def neuron_records(ranking) -> list[dict]:
    """The records of ``neurons.json``: ``{"neuron", "score", "rank"}`` best first, where
    neurons with equal scores share the rank of the first of them, and carry ``"tied"``: how
    many share it. The order within a tie is site order, then channel order: it means nothing,
    and the file says so."""
    ids = ranking.ids()
    scores = list(ranking.scores) if ranking.scores is not None else [None] * len(ids)
    records = [
        {"neuron": n, "score": s, "rank": i + 1} for i, (n, s) in enumerate(zip(ids, scores))
    ]
    if ranking.scores is not None:
        for start, size in tie_groups(scores):
            for record in records[start : start + size]:
                record["rank"] = start + 1
                record["tied"] = size
    return records


def describe_ties(ranking, shown: int | None = None) -> str | None:
    """One line on the ties of a ranking, or None when it has none that matter: the largest
    tie, and whether the first ``shown`` neurons end inside one."""
    if ranking.scores is None:
        return None
    groups = tie_groups(list(ranking.scores))
    if not groups:
        return None
    start, size = max(groups, key=lambda g: g[1])
    tied = sum(g[1] for g in groups)
    line = (
        f"ties: {tied} of {len(ranking)} neurons share a score with another (the largest tie: "
        f"{size} neurons at {ranking.scores[start]:.6g}, ranks {start + 1}-{start + size}); "
        "their order within a tie means nothing"
    )
    if shown is not None:
        cut = [g for g in groups if g[0] < shown < g[0] + g[1]]
        if cut:
            line += f"; the top {shown} ends inside a tie of {cut[0][1]}"
    return line
