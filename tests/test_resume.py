"""Runs that outgrow one process: a real ``canfast sweep`` killed mid-run and resumed, Ctrl-C and
SIGTERM, manifests that refuse another command, two gloo ranks against one process, and
``--search`` against the full curve. Every comparison is of the files a run leaves, timings aside.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import build_tiny_llava, error_line, run_cli  # noqa: E402

from canfast.io import load_tensors, partial_path

# Small enough to run in seconds, long enough (hundreds of masked evaluations, tens of scan
# chunks) that a run can be stopped in the middle.
DATA = ["--limit", "3", "--max-new-tokens", "4", "--batch-size", "3", "--sites", "language.*"]
SWEEP = [*DATA, "--seeds", "2", "--schedule", "1:150", "--tau", "50", "--masks-per-pass", "2"]
SWEEP += ["--generations", "1"]
SCAN = [*DATA, "--sweep-kind", "single"]


def _env(cwd: Path) -> dict:
    env = dict(os.environ)
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home")}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env


def stop_midway(args: list[str], out: Path, cwd: Path, sig: int, chunks: int = 4):
    """Start ``canfast sweep ARGS --out OUT``, wait until ``chunks`` chunks are kept, and send
    ``sig``. Returns the finished process (its stderr read)."""
    cmd = [sys.executable, "-m", "canfast.cli", "sweep", *args, "--out", str(out)]
    process = subprocess.Popen(
        cmd, cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    kept = partial_path(out) / "chunks"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if kept.is_dir() and len(list(kept.glob("*.safetensors"))) >= chunks:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    process.stderr_text = stderr
    return process


def same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same results: every JSON equal but for timings, every
    tensor equal bit for bit (NaN where NaN), and the same files."""
    names = {p.name for p in a.iterdir() if p.suffix in (".json", ".jsonl", ".safetensors")}
    assert names == {p.name for p in b.iterdir() if p.suffix in (".json", ".jsonl", ".safetensors")}
    for name in sorted(names - {"manifest.json"}):
        if name.endswith(".safetensors"):
            ta, ma = load_tensors(a / name)
            tb, mb = load_tensors(b / name)
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert torch.equal(ta[key].nan_to_num(-7.0), tb[key].nan_to_num(-7.0)), key
                assert torch.equal(ta[key].isnan(), tb[key].isnan()), key
            ma.pop("seconds", None), mb.pop("seconds", None)
            assert ma == mb, name
        elif name.endswith(".jsonl"):
            assert (a / name).read_text() == (b / name).read_text(), name
        else:
            ja, jb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            for data in (ja, jb):
                if isinstance(data, dict):
                    data.pop("timings", None)
            assert ja == jb, name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["complete"] and mb["complete"]
    assert ma["run"] == mb["run"]
    assert not (b / "chunks").exists() and not partial_path(b).exists()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def sweep_reference(workdir) -> Path:
    out = workdir / "sweep-reference"
    result = run_cli("sweep", *SWEEP, "--out", out, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def scan_reference(workdir) -> Path:
    out = workdir / "scan-reference"
    result = run_cli("sweep", *SCAN, "--out", out, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return out


def test_sweep_killed_then_resumed_writes_the_uninterrupted_files(workdir, sweep_reference):
    out = workdir / "sweep-killed"
    killed = stop_midway(SWEEP, out, workdir, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written where the run goes
    done = len(list((partial_path(out) / "chunks").glob("*.safetensors")))
    assert done >= 4

    # Another command cannot take the work up, nor can a fresh run drop it unasked.
    changed = [*SWEEP[:-6], "--tau", "40", *SWEEP[-4:]]
    assert changed != SWEEP
    line = error_line(run_cli("sweep", *changed, "--out", out, "--resume", cwd=workdir), "tau")
    assert "40" in line and "50" in line
    error_line(run_cli("sweep", *SWEEP, "--out", out, cwd=workdir), "--resume")

    resumed = run_cli("sweep", *SWEEP, "--out", out, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    shown = next(line for line in resumed.stdout.splitlines() if line.startswith("resumed:"))
    assert int(shown.split()[1]) >= done
    same_run(sweep_reference, out)
    # A complete run has nothing to resume.
    error_line(run_cli("sweep", *SWEEP, "--out", out, "--resume", cwd=workdir), "complete")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_the_work_and_says_how_to_resume(workdir, sweep_reference, sig, code):
    out = workdir / f"sweep-{code}"
    # An earlier complete run in --out survives an interrupted --overwrite run untouched.
    shutil.copytree(sweep_reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stopped = stop_midway([*SWEEP, "--overwrite"], out, workdir, sig)
    assert stopped.returncode == code, stopped.stderr_text
    last = stopped.stderr_text.strip().splitlines()[-1]
    assert last.startswith("canfast: ") and "--resume" in last and "Traceback" not in last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    resumed = run_cli("sweep", *SWEEP, "--overwrite", "--out", out, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    same_run(sweep_reference, out)


def test_scan_killed_then_resumed_writes_the_uninterrupted_files(workdir, scan_reference):
    out = workdir / "scan-killed"
    killed = stop_midway(SCAN, out, workdir, signal.SIGKILL, chunks=2)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("sweep", *SCAN, "--out", out, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout
    same_run(scan_reference, out)


def torchrun(args: list[str], out: Path, cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node RANKS canfast sweep ARGS``: gloo over loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", "-m", "canfast.cli", "sweep", *args, "--out", str(out)]
    return subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["sweep", "scan"])
def test_two_gloo_ranks_write_what_one_process_writes(
    workdir, sweep_reference, scan_reference, kind
):
    out = workdir / f"{kind}-ranks"
    args, reference = (SWEEP, sweep_reference) if kind == "sweep" else (SCAN, scan_reference)
    result = torchrun(args, out, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 alone prints the summary.
    assert result.stdout.count(f"wrote {out}") == 1, result.stdout
    same_run(reference, out)


def test_a_resume_under_another_world_size_redoes_only_what_is_missing(workdir, scan_reference):
    out = workdir / "scan-killed-then-ranks"
    stop_midway(SCAN, out, workdir, signal.SIGKILL, chunks=3)
    result = torchrun([*SCAN, "--resume"], out, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    same_run(scan_reference, out)


def test_search_finds_the_stages_of_the_step_one_curve(workdir):
    common = [*DATA[:-2], "--seeds", "0", "--generations", "0", "--masks-per-pass", "4"]
    full = workdir / "step-one"
    searched = workdir / "searched"
    result = run_cli("sweep", *common, "--schedule", "1:5152", "--out", full, cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run_cli("sweep", *common, "--search", "--out", searched, cwd=workdir)
    assert result.returncode == 0, result.stderr
    a = json.loads((full / "sweep.json").read_text())
    b = json.loads((searched / "sweep.json").read_text())
    assert a["k_star"] is not None
    search = b["search"]
    if search["monotone"]:
        # Under its assumption the search finds exactly the first k of each stage.
        assert (b["k1"], b["k_star"]) == (a["k1"], a["k_star"])
    else:
        assert "falls as k grows" in result.stderr
    assert search["evaluations"] == len(b["k"]) == search["orderings"]["ranking"]["evaluated"]
    assert search["evaluations"] * 3 < len(a["k"])
    # Every evaluated point is a point of the full curve, with the same metric (measured in
    # other groups of masks per pass, so to float rounding).
    # The full curve stops at its collapse, the gallop may step past it.
    for k, ppl in zip(b["k"], b["ppl"], strict=True):
        if k in a["k"]:
            assert math.isclose(ppl, a["ppl"][a["k"].index(k)], rel_tol=1e-9)
        else:
            assert k > a["k_star"]


def test_resume_needs_the_run_directory(workdir):
    error_line(run_cli("sweep", "--resume", cwd=workdir), "--out")


def test_resume_with_nothing_to_resume_says_so_and_runs_whole(workdir, sweep_reference):
    out = workdir / "never-started"
    resumed = run_cli("sweep", *SWEEP, "--out", out, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    said = [
        line for line in resumed.stderr.splitlines() if "nothing" in line or "no finished" in line
    ]
    assert said == [
        f"canfast: {out} holds no finished work to resume: the run starts from the beginning"
    ]
    assert "resumed:" not in resumed.stdout
    same_run(sweep_reference, out)


def test_search_refuses_a_schedule_and_the_scan(workdir):
    error_line(run_cli("sweep", "--search", "--schedule", "1:8", cwd=workdir), "--schedule")
    error_line(run_cli("sweep", "--search", "--sweep-kind", "single", cwd=workdir), "--search")


def test_device_map_auto_loads_and_scores_as_a_plain_load(tmp_path, monkeypatch):
    """``--device-map auto`` (accelerate) on this CPU-only machine puts every module on the
    CPU; the scores are those of a plain load. Without accelerate it is bad input."""
    import canfast

    path = build_tiny_llava(tmp_path / "llava", seed=0)
    samples = canfast.load_data("builtin:shapes", limit=2)
    plain = canfast.load(str(path))
    mapped = canfast.load(str(path), device_map="auto")
    assert {p.device.type for p in mapped.hf.parameters()} == {"cpu"}
    a = canfast.score(plain, samples, targets="self", max_new_tokens=3, progress=False)
    b = canfast.score(mapped, samples, targets="self", max_new_tokens=3, progress=False)
    for site in a.sites:
        assert torch.equal(a[site], b[site]), site
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(canfast.BadInput, match="accelerate"):
        canfast.load(str(path), device_map="auto")
