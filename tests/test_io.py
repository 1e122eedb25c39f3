"""The one atomic-write helper: content, modes under the umask, failure leaves the old file, directories."""

import os
import stat

import pytest

from kvzap_lab import io


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_and_json(tmp_path, umask_022):
    path = io.atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert path.read_text() == "hello"
    assert _mode(path) == 0o644  # what open() would give under umask 022, not mkstemp's 0600
    io.atomic_write_json(tmp_path / "c.json", {"x": 1})
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 1\n}\n'
    assert not list(tmp_path.rglob("*.tmp"))


def test_failed_write_keeps_the_old_file(tmp_path):
    target = io.atomic_write_text(tmp_path / "f.txt", "old")

    def broken(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    with io.atomic_directory(target) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert (target / "w.bin").read_bytes() == b"1"
    assert _mode(target) == 0o755 and _mode(target / "w.bin") == 0o644
    with pytest.raises(RuntimeError):
        with io.atomic_directory(target) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("killed")
    assert (target / "w.bin").read_bytes() == b"1"
    with io.atomic_directory(target) as tmp:
        (tmp / "other.bin").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_remove_temporaries(tmp_path):
    (tmp_path / ".x.json.abc.tmp").write_text("torn")
    (tmp_path / ".ckpt.def.tmp").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    assert io.remove_temporaries(tmp_path) == [".ckpt.def.tmp", ".x.json.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_check_writable_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write to"):
        io.check_writable(tmp_path / "file" / "out")
    assert io.check_writable(tmp_path / "new" / "dir").is_dir()
