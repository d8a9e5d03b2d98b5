"""jaxedit.io: staged (atomic) files and folders, the git revision, progress lines."""

import re

import pytest

from jaxedit import io


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.atomic_write(path, "old")
    io.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_failed_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), io.staged(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), io.staged(out, directory=True) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with io.staged(out, directory=True) as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "config.json").read_text() == "{}"


def test_existing_directory_is_kept_only_when_asked(tmp_path):
    out = tmp_path / "model"
    (out / "theirs").mkdir(parents=True)
    with pytest.raises(OSError), io.staged(out, directory=True) as staging:
        (staging / "mine").write_text("")
    with io.staged(out, directory=True, keep_existing=True) as staging:
        (staging / "mine").write_text("")
    assert [p.name for p in out.iterdir()] == ["theirs"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_git_revision_of_this_checkout():
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", io.git_revision())


def test_say_prints_a_timestamped_line_on_stderr(capsys):
    io.say("loading gemma-3-270m")
    io.logger.debug("sharding: hidden note")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] loading gemma-3-270m\n", captured.err)
