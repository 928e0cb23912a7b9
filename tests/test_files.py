"""clipvip.files: atomic writes, whoever writes the temporary file, and atomic folders."""
import os

import pytest

from clipvip.files import atomic_folder, atomic_path, atomic_write_text, current_umask


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_current_umask_is_the_process_umask():
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
    finally:
        os.umask(old)
    assert current_umask() == old


def test_an_atomic_file_gets_the_umask_mode_even_from_a_private_temporary_file(tmp_path):
    """A writer that makes its file 0600 (safetensors, tempfile.mkstemp) no longer decides the mode."""
    target = tmp_path / "weights.bin"
    with atomic_path(str(target)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)
        assert _mode(tmp) == 0o600
    assert _mode(target) == 0o666 & ~current_umask()
    atomic_write_text(str(tmp_path / "a.txt"), "a")
    assert _mode(tmp_path / "a.txt") == _mode(target)


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "folder"
    with atomic_folder(str(out)) as staging:
        (open(os.path.join(staging, "a"), "w")).close()
        os.chmod(os.path.join(staging, "a"), 0o600)
        assert not out.exists()
    assert os.listdir(out) == ["a"] and _mode(out / "a") == 0o666 & ~current_umask()
    with pytest.raises(RuntimeError):  # a failed replacement leaves the old folder in place
        with atomic_folder(str(out), replace=True) as staging:
            open(os.path.join(staging, "b"), "w").close()
            raise RuntimeError("interrupted")
    assert os.listdir(out) == ["a"]
    with atomic_folder(str(out), replace=True) as staging:
        open(os.path.join(staging, "b"), "w").close()
    assert os.listdir(out) == ["b"] and sorted(os.listdir(tmp_path)) == ["folder"]  # nothing left beside it
