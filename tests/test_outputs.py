import os
import stat

import pytest

from combireg.errors import CombiregError
from combireg.outputs import atomic_output_dir


def test_output_appears_whole_with_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "a" / "b", overwrite=False) as tmp:
            (tmp / "x.txt").write_text("1")
            assert not (tmp_path / "a" / "b").exists()  # nothing visible before the end
    finally:
        os.umask(old)
    out = tmp_path / "a" / "b"
    assert (out / "x.txt").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_failure_leaves_nothing_and_keeps_old_contents(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "new" / "out", overwrite=False) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the parent it created is gone too
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(keep, overwrite=True):
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert (keep / "old.txt").read_text() == "old"
    with pytest.raises(CombiregError, match="not empty"):
        with atomic_output_dir(keep, overwrite=False):
            pass
