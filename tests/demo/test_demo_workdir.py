"""`prospect demo --workdir` empties only an earlier demo's folder: `--workdir .` must not delete
the user's files."""

import pytest
from typer.testing import CliRunner

import worker.demo.loop
from service.cli import app as cli


def _flat(output: str) -> str:
    """The error box's text as one line (rich wraps it at the terminal width)."""
    return " ".join(output.replace("│", " ").split())


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, monkeypatch):
    def not_this_far(*_a, **_k):  # the demo itself must not start (minutes)
        pytest.fail("the demo started in a folder that is not a demo's")

    monkeypatch.setattr(worker.demo.loop, "build_base", not_this_far)
    keep = tmp_path / "thesis.tex"
    keep.write_text("years of work")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["demo", "--workdir", "."])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "--workdir" in r.output and "not a demo folder" in _flat(r.output)
    assert keep.read_text() == "years of work"
    r = CliRunner().invoke(cli, ["demo", "--workdir", "thesis.tex"])
    assert r.exit_code == 2 and "is a file" in _flat(r.output) and keep.exists()


def test_an_earlier_demo_folder_is_emptied(tmp_path):
    from worker.demo.loop import WORKDIR_MARKER, WorkdirNotDemo, _clear_workdir

    marked = tmp_path / "new"
    marked.mkdir()
    (marked / WORKDIR_MARKER).touch()
    (marked / "prospect.db").write_text("x")
    old = tmp_path / "old"  # made before the marker: its model and both databases
    (old / "base-model").mkdir(parents=True)
    (old / "prospect.db").write_text("x")
    (old / "broker.db").write_text("x")
    for d in (marked, old):
        _clear_workdir(d)
        assert not d.exists()
    project = tmp_path / "project"  # someone's own folder that happens to hold a base-model/
    (project / "base-model").mkdir(parents=True)
    (project / "notes.txt").write_text("keep")
    with pytest.raises(WorkdirNotDemo):
        _clear_workdir(project)
    assert (project / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _clear_workdir(empty)
    _clear_workdir(tmp_path / "missing")
