"""Run folders under concurrency, corruption, moves and copies (issue 15, items 2-4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import steerscope as ss
from steerscope.errors import StudyError
from steerscope.runs import Run, load_tensors, save_tensors, write_json

SRC = str(Path(ss.__file__).resolve().parents[1])  # the steerscope under test, also in subprocesses
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _py(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_process_writers_never_crash_and_readers_never_see_a_torn_record(tmp_path):
    target = tmp_path / "steps" / "s.json"
    write_json(target, {"writer": -1, "payload": []})
    code = f"""
        import sys
        from pathlib import Path
        from steerscope.runs import write_json
        import time
        w = int(sys.argv[1])
        while not Path({str(tmp_path / "go")!r}).exists():
            time.sleep(0.01)
        for i in range(400):
            write_json(Path({str(target)!r}), {{"writer": w, "i": i, "payload": list(range(2000))}})
    """
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(w)], env=ENV,
                                stderr=subprocess.PIPE, text=True) for w in (0, 1)]
    time.sleep(3)  # both writers imported and waiting
    (tmp_path / "go").touch()
    reads = torn = 0
    while any(p.poll() is None for p in writers):
        try:
            rec = json.loads(target.read_text())
            assert rec["payload"] in ([], list(range(2000)))
        except (ValueError, AssertionError):
            torn += 1
        reads += 1
    errs = [p.stderr.read() for p in writers]
    assert [p.returncode for p in writers] == [0, 0], errs
    assert torn == 0 and reads > 10
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_run_on_a_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = _py(f"""
        import time
        from steerscope.runs import Run
        r = Run({str(folder)!r}, config={{"a": 1}})
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert holder.stdout.readline().strip() == "ready"
    with pytest.raises(StudyError, match=f"in use by process {holder.pid}") as e:
        Run(folder, config={"a": 1})
    assert "\n" not in str(e.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / ".lock").read_text().split()[0] == str(holder.pid)  # the stale lock is still on disk
    with Run(folder, config={"a": 1}) as run:
        assert (folder / ".lock").read_text().split()[0] == str(os.getpid())
        assert run.step("s", lambda: {"x": 1})["x"] == 1


def test_a_corrupt_record_is_reported_in_one_line_and_recomputed(tmp_path, capfd):
    calls = []
    with Run(tmp_path / "r", config={"a": 1}) as run:
        run.step("s", lambda: calls.append(1) or {"x": 2})
    rec = tmp_path / "r" / "steps" / "s.json"
    for damage in (rec.read_text()[:15], "[1, 2]", rec.read_text().replace('"x": 2', '"x": 3'), "\xff"):
        rec.write_text(damage)
        with Run(tmp_path / "r", config={"a": 1}) as run:
            assert run.step("s", lambda: calls.append(1) or {"x": 2})["x"] == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("warning:") and "recomputing" in err[0], err
    assert len(calls) == 5
    with Run(tmp_path / "r", config={"a": 1}) as run:  # intact now: reused, no warning
        run.step("s", lambda: calls.append(1) or {"x": 2})
    assert len(calls) == 5 and capfd.readouterr().err == ""


def test_a_corrupt_config_is_rewritten_and_steps_of_another_config_are_not_reused(tmp_path, capfd):
    with Run(tmp_path / "r", config={"a": 1}) as run:
        run.step("s", lambda: {"x": 1})
    (tmp_path / "r" / "config.json").write_text('{"a": ')
    with Run(tmp_path / "r", config={"a": 1}) as run:
        assert run.step("s", lambda: {"x": 99})["x"] == 1  # same config: reused
    assert "unreadable" in capfd.readouterr().err
    (tmp_path / "r" / "config.json").write_text('{"a": ')
    with Run(tmp_path / "r", config={"a": 2}) as run:  # config lost, and this is another one
        assert run.step("s", lambda: {"x": 2})["x"] == 2
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"a": 2}


def test_a_damaged_tensor_artefact_invalidates_its_step(tmp_path, capfd):
    def step(run: Run) -> dict:
        save_tensors(run.path("tensors", "t.safetensors"), {"t": torch.arange(4.0)})
        return {"file": str(run.path("tensors", "t.safetensors"))}

    with Run(tmp_path / "r", config={"a": 1}) as run:
        rec = run.step("s", lambda: step(run))
    p = Path(rec["file"])
    p.write_bytes(p.read_bytes()[:-3])
    with Run(tmp_path / "r", config={"a": 1}) as run:
        rec = run.step("s", lambda: step(run))
    assert "damaged" in capfd.readouterr().err
    assert load_tensors(rec["file"])["t"].tolist() == [0, 1, 2, 3]


def test_a_copied_run_folder_reads_its_own_artefacts_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def step(run: Run, scale: float) -> dict:
        path = run.path("vectors", "v.safetensors")
        ss.SteeringVector({1: scale * torch.ones(4)}).save(path)
        return {"files": {"v": str(path)}}

    with Run("orig", config={"a": 1}) as run:  # a relative --out
        run.step("vectors", lambda: step(run, 1.0))
    stored = json.loads((tmp_path / "orig" / "steps" / "vectors.json").read_text())
    assert stored["files"]["v"] == "vectors/v.safetensors"
    shutil.copytree("orig", "copy")
    (tmp_path / "orig" / "vectors" / "v.safetensors").write_bytes(b"corrupt")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    with Run(tmp_path / "copy", config={"a": 1}) as run:
        rec = run.step("vectors", lambda: pytest.fail("the copy's record must be reused"))
    assert Path(rec["files"]["v"]) == tmp_path / "copy" / "vectors" / "v.safetensors"
    assert ss.SteeringVector.load(rec["files"]["v"])[1].tolist() == [1.0] * 4


def test_records_are_strict_json_and_out_that_is_a_file_is_refused(tmp_path):
    with Run(tmp_path / "r", config={"a": 1}) as run:
        run.step("s", lambda: {"x": float("nan"), "y": float("inf")})
    text = (tmp_path / "r" / "steps" / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (tmp_path / "f").write_text("x")
    with pytest.raises(StudyError, match="is a file"):
        Run(tmp_path / "f", config={"a": 1})


def test_a_resumed_record_equals_the_computed_one_with_nan_and_inf(tmp_path):
    # The file is strict JSON (NaN/inf stored as null), yet a resumed study must read what the first
    # run computed: a report that formats a NaN broke on resume when it read None instead.
    rec = {"auc": float("nan"), "rows": [{"p": float("inf")}, {"p": 0.5}], "m": {"q": float("-inf")}, "ci": None}
    with Run(tmp_path / "r") as run:
        first = run.step("s", lambda: rec)
    text = (tmp_path / "r" / "steps" / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)  # strict
    with Run(tmp_path / "r") as run:
        again = run.step("s", lambda: pytest.fail("a valid record must not be recomputed"))
    assert again["auc"] != again["auc"] and first["auc"] != first["auc"]
    assert again["rows"][0]["p"] == float("inf") and again["rows"][1]["p"] == 0.5
    assert again["m"]["q"] == float("-inf") and again["ci"] is None


def test_a_lock_file_symlinked_elsewhere_is_never_followed(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(StudyError, match="symlink"):
        Run(folder, config={"a": 1})
    assert victim.read_text() == "precious\n"  # opened with O_NOFOLLOW: not truncated, not written


# -- issue 26: nothing a run writes or reads leaves its folder ------------------------------------
def test_a_lock_that_is_a_fifo_or_folder_is_refused_without_blocking_or_truncating(tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / ".lock")
    with pytest.raises(StudyError, match="not a regular file"):
        Run(folder, config={"a": 1})
    (folder / ".lock").unlink()
    (folder / ".lock").mkdir()
    with pytest.raises(StudyError, match="not a regular file"):
        Run(folder, config={"a": 1})


def _run_folder_with_symlinked(tmp_path: Path, sub: str) -> tuple[Path, Path]:
    """(run folder, the folder outside it) where ``run/sub`` is a symlink to the outside one."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / sub).symlink_to(elsewhere, target_is_directory=True)
    return folder, elsewhere


def test_a_symlinked_steps_folder_is_refused_and_nothing_is_written_through_it(tmp_path) -> None:
    folder, elsewhere = _run_folder_with_symlinked(tmp_path, "steps")
    with pytest.raises(StudyError, match="steps is a symlink"):
        Run(folder, config={"a": 1})
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_vectors_folder_is_refused_inside_a_step(tmp_path) -> None:
    folder, elsewhere = _run_folder_with_symlinked(tmp_path, "vectors")
    with Run(folder, config={"a": 1}) as run:
        with pytest.raises(StudyError, match="leads outside the run folder"):
            run.step("s", lambda: {"p": str(run.path("vectors", "v.safetensors"))})
    assert list(elsewhere.iterdir()) == []


def test_report_html_and_figures_replace_a_symlink_and_never_write_through_it(tmp_path) -> None:
    from steerscope.report.html import Report as HtmlReport

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    report = tmp_path / "report.html"
    report.symlink_to(victim)
    HtmlReport("t").write(report)
    assert victim.read_text() == "precious\n"
    assert not report.is_symlink() and report.read_text().startswith("<!doctype html>")


def _tamper(folder: Path, name: str, **changes) -> None:
    from steerscope.runs import _checksum

    p = folder / "steps" / f"{name}.json"
    rec = json.loads(p.read_text())
    rec.update(changes)
    rec["_checksum"] = _checksum(rec)
    p.write_text(json.dumps(rec))


@pytest.mark.parametrize("rel", ["../victim.txt", "/dev/zero", "/etc/hostname"])
def test_a_record_artefact_outside_the_folder_is_not_trusted(tmp_path, rel, capsys) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "run"
    with Run(folder, config={"a": 1}) as run:
        run.step("s", lambda: {"x": 1})
    _tamper(folder, "s", _files={rel: "0" * 64})
    with Run(folder, config={"a": 1}) as run:
        assert not run.done("s")
        assert run.step("s", lambda: {"x": 2})["x"] == 2
    assert "outside the run folder; recomputing" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["../victim.txt", "/dev/zero"])
def test_a_record_relpath_outside_the_folder_is_not_trusted(tmp_path, value) -> None:
    folder = tmp_path / "run"
    with Run(folder, config={"a": 1}) as run:
        run.step("s", lambda: {"p": "x"})
    _tamper(folder, "s", p=value, _relpaths=[["p"]])
    with Run(folder, config={"a": 1}) as run:
        with pytest.raises(StudyError, match="outside the run folder"):
            run.load("s")


@pytest.mark.parametrize("field", ["_checksum", "_config"])
def test_a_record_without_its_integrity_fields_is_recomputed_with_a_warning(tmp_path, field, capsys) -> None:
    folder = tmp_path / "run"
    with Run(folder, config={"a": 1}) as run:
        run.step("s", lambda: {"x": 1})
    p = folder / "steps" / "s.json"
    rec = json.loads(p.read_text())
    del rec[field]
    p.write_text(json.dumps(rec))
    with Run(folder, config={"a": 1}) as run:
        assert run.step("s", lambda: {"x": 2})["x"] == 2
    assert "integrity fields" in capsys.readouterr().err


def test_disk_full_while_writing_leaves_the_old_file_no_tmp_and_names_the_file(tmp_path, monkeypatch) -> None:
    import errno

    import steerscope._files as files
    from steerscope.report.html import Report as HtmlReport

    report = tmp_path / "report.html"
    report.write_text("old report\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(StudyError, match=r"cannot write .*report\.html \(No space left on device\)"):
        HtmlReport("t").write(report)
    assert report.read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_an_interrupt_inside_the_write_window_leaves_no_tmp_file(tmp_path, monkeypatch) -> None:
    import steerscope._files as files

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_the_write_window_exits_143_and_leaves_no_tmp_file(tmp_path) -> None:
    """A terminated command (SIGTERM, as a scheduler or `kill` sends) runs its finally blocks: the atomic write in
    progress removes its temp file, and the command exits 143 with one line."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import steerscope._files as files\n"
        "from steerscope._cliargs import run_guarded\n"
        "files.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGTERM)  # the signal arrives mid-write\n"
        "sys.exit(run_guarded(lambda: files.atomic_write(Path(sys.argv[1]) / 'x.json', b'{}')))\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143, (r.returncode, r.stderr)
    assert r.stderr.strip() == "terminated; finished steps are saved"
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_sweeps_the_temp_files_a_killed_run_left(tmp_path) -> None:
    """SIGKILL leaves temp files no handler can remove: the next run that takes the folder's lock removes them
    (files, folders, symlinks unlinked, never followed) and nothing else."""
    from steerscope.runs import Run

    folder = tmp_path / "run"
    (folder / "steps").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    stale = [folder / ".config.json.ab12cd_9.tmp", folder / "steps" / ".eval_base.json.zz00xx11.tmp"]
    for p in stale:
        p.write_text("{")
    (folder / ".vectors.q1w2e3r4.tmp").mkdir()
    (folder / "steps" / ".x.json.k9k9k9k9.tmp").symlink_to(victim)
    kept = [folder / "notes.tmp", folder / ".hidden.tmp", folder / "steps" / "a.json"]
    for p in kept:
        p.write_text("mine")
    with pytest.warns(UserWarning, match="removed 4 temporary file"):
        run = Run(folder)
    run.close()
    assert not any(p.exists() or p.is_symlink() for p in [*stale, folder / ".vectors.q1w2e3r4.tmp",
                                                         folder / "steps" / ".x.json.k9k9k9k9.tmp"])
    assert all(p.read_text() == "mine" for p in kept) and victim.read_text() == "keep"
