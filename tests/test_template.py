"""combireg.template: the pinned autoafids wheel behind the simulator (moved here from
test_synth.py with the code they test)."""
import zipfile

import pytest

from combireg import template
from combireg.errors import CombiregError


def test_template_wheel_is_unpacked_flat(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("autoafids/resources/a.fcsv", "x")
        zf.writestr("autoafids/resources/sub/../b.txt", "y")
        zf.writestr(f"autoafids-{template.AUTOAFIDS_VERSION}.dist-info/LICENSE", "MIT")
        zf.writestr("autoafids/__init__.py", "")
    template._extract_resources(wheel, tmp_path / "resources")
    assert sorted(p.name for p in (tmp_path / "resources").iterdir()) == ["LICENSE.autoafids", "a.fcsv", "b.txt"]


def test_a_corrupt_cached_wheel_is_refused(tmp_path):
    (tmp_path / template.AUTOAFIDS_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(CombiregError, match="sha256"):
        template.fetch_template(tmp_path)
