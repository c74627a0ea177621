"""Run directories are whole: one complete run's files, or none; locked; checked before work.

Each test throws one clash, failure or interrupt at ``canfast.io.RunDir`` and checks what is left
on disk. The subprocess tests kill a real writer, as a user's Ctrl-C, SIGTERM or SIGKILL would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from canfast.errors import BadInput
from canfast.io import MANIFEST, RunDir, read_manifest, write_json


def complete_run(out: Path, files: dict[str, str], overwrite: bool = False) -> Path:
    with RunDir(out, overwrite=overwrite) as run:
        for name, text in files.items():
            run.file(name).write_text(text)
    return out


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def siblings(path: Path) -> list[str]:
    """Whatever a run left beside ``out``: staging directories, locks, moved-aside runs."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ----- whole runs ----------------------------------------------------------------------------


def test_a_complete_run_holds_its_files_and_a_manifest_naming_them(tmp_path):
    out = complete_run(tmp_path / "run", {"scores.safetensors": "s", "neurons.json": "[]"})
    assert listing(out) == [MANIFEST, "neurons.json", "scores.safetensors"]
    manifest = read_manifest(out)
    assert manifest["files"] == ["neurons.json", "scores.safetensors"]
    assert manifest["complete"] is True
    assert siblings(out) == []


def test_overwrite_replaces_the_whole_run_never_mixing_two(tmp_path):
    out = complete_run(tmp_path / "run", {"scores.safetensors": "old", "sweep.json": "{}"})
    (out / "report.html").write_text("old report")
    complete_run(out, {"scores.safetensors": "new", "neurons.json": "[]"}, overwrite=True)
    assert listing(out) == [MANIFEST, "neurons.json", "scores.safetensors"]
    assert (out / "scores.safetensors").read_text() == "new"
    assert siblings(out) == []


def test_a_failed_overwrite_leaves_the_earlier_run_untouched(tmp_path):
    out = complete_run(tmp_path / "run", {"scores.safetensors": "old", "sweep.json": "{}"})
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(RuntimeError), RunDir(out, overwrite=True) as run:
        run.file("scores.safetensors").write_text("new")
        raise RuntimeError("scoring failed")
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert siblings(out) == []


def test_an_interrupted_first_run_leaves_nothing(tmp_path):
    out = tmp_path / "runs" / "deep" / "run"
    with pytest.raises(KeyboardInterrupt), RunDir(out) as run:
        run.file("scores.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [], "not even the folders made for it"


def test_commit_with_a_failed_step_keeps_the_files_and_says_what_failed(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as run:
        write_json(run.file("sweep.json"), {"k_star": 3})
        run.commit(failed="report: figure failed")
    manifest = read_manifest(out)
    assert manifest["complete"] is False and manifest["failed"].startswith("report")
    assert manifest["files"] == ["sweep.json"]


def test_amend_adds_files_to_an_existing_run_keeping_everything(tmp_path):
    out = complete_run(tmp_path / "run", {"sweep.json": "{}"})
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("a")
    with RunDir(out, amend=True) as run:
        run.file("report.html").write_text("<html>")
        (out / "sweep.json").read_text()  # the run is readable, untouched, meanwhile
    assert listing(out) == ["extra", MANIFEST, "notes.txt", "report.html", "sweep.json"]
    assert (out / "extra" / "a.txt").read_text() == "a"
    assert "report.html" in read_manifest(out)["files"]


def test_a_failed_amend_leaves_the_run_as_it_was(tmp_path):
    out = complete_run(tmp_path / "run", {"sweep.json": "{}"})
    with pytest.raises(RuntimeError), RunDir(out, amend=True) as run:
        run.file("report.html").write_text("half")
        raise RuntimeError("figure failed")
    assert listing(out) == [MANIFEST, "sweep.json"]


# ----- checked before any work ---------------------------------------------------------------


def test_an_existing_run_needs_overwrite(tmp_path):
    out = complete_run(tmp_path / "run", {"neurons.json": "[]"})
    with pytest.raises(BadInput, match="--overwrite"):
        RunDir(out).open()
    assert siblings(out) == []


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match="exists and is not a directory"):
        RunDir(tmp_path / "f").open()


def test_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match="lies under .*, a file"):
        RunDir(tmp_path / "f" / "run").open()


def test_out_in_an_unwritable_place_is_refused():
    probe = Path("/sys/canfast-probe")
    if os.access("/sys", os.W_OK) and not Path("/sys/kernel").is_dir():
        pytest.skip("/sys is not the read-only sysfs here")
    with pytest.raises(BadInput, match="cannot"):
        RunDir(probe / "run").open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(BadInput, match="not writable"):
            RunDir(locked / "run").open()
    finally:
        locked.chmod(0o755)


def test_overwrite_never_deletes_files_canfast_did_not_write(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(BadInput, match="thesis.tex"):
        RunDir(out, overwrite=True).open()
    assert (out / "thesis.tex").read_text() == "years of work"


# ----- the lock ------------------------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, overwrite=True):
        with pytest.raises(BadInput, match=f"process {os.getpid()}"):
            RunDir(out, overwrite=True).open()
    assert not out.exists() or read_manifest(out) is not None


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": int(dead), "started": "0"}))
    (tmp_path / f".run.staging.{dead}").mkdir()
    complete_run(out, {"neurons.json": "[]"})
    assert listing(out) == [MANIFEST, "neurons.json"]
    assert siblings(out) == []


def test_an_earlier_run_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    aside = tmp_path / f".run.old.{dead}"
    aside.mkdir()
    (aside / "sweep.json").write_text("{}")
    with pytest.raises(BadInput, match="--overwrite"):
        RunDir(out).open()
    assert listing(out) == ["sweep.json"]


# ----- killed writers ------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from canfast.io import RunDir
    out = sys.argv[1]
    with RunDir(out, overwrite=True) as run:
        run.file("scores.safetensors").write_text("new")
        print("staged", flush=True)
        time.sleep(60)
        run.file("sweep.json").write_text("new")
    """
)


def start_writer(out: Path) -> subprocess.Popen:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "staged", proc.stderr.read()
    return proc


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_killed_overwrite_leaves_the_earlier_run_whole(tmp_path, how):
    out = complete_run(tmp_path / "run", {"scores.safetensors": "old", "sweep.json": "old"})
    before = {p.name: p.read_text() for p in out.iterdir()}
    proc = start_writer(out)
    # While it runs, a second run into the same directory is refused, naming it.
    with pytest.raises(BadInput, match=f"process {proc.pid}"):
        RunDir(out, overwrite=True).open()
    proc.send_signal(how)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    if how != signal.SIGKILL:
        assert siblings(out) == [], "cleanup ran"
    # Whatever a SIGKILL left is cleared by the next run, which may then proceed.
    complete_run(out, {"neurons.json": "[]"}, overwrite=True)
    assert listing(out) == [MANIFEST, "neurons.json"]
    assert siblings(out) == []
