"""The real suites' archives unpack on every supported Python (3.11.2 has no extraction filter)."""

import io
import tarfile

import pytest
from test_real_suites import _extract


def _tar(tmp_path, *members):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return tarfile.open(path)


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.fixture(params=["filter", "fallback"])
def how(request, monkeypatch):
    """Both paths on every Python: the "data" filter where it exists, and what 3.11.2 gets."""
    if request.param == "fallback":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no extraction filter (3.11.2)")
    return request.param


def test_extract_files(tmp_path, how):
    with _tar(tmp_path, _file("pkg-1/setup.py", b"print()"), _file("pkg-1/tests/t.py")) as tar:
        _extract(tar, tmp_path / "out")
    assert (tmp_path / "out/pkg-1/setup.py").read_bytes() == b"print()"


@pytest.mark.parametrize("name", ["../evil", "/abs/evil"])
def test_extract_refuses_names_outside(tmp_path, name, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # the fallback; the filter strips a leading /
    with _tar(tmp_path, _file(name)) as tar, pytest.raises(tarfile.TarError):
        _extract(tar, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_extract_refuses_links(tmp_path, how):
    link = tarfile.TarInfo("pkg/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with _tar(tmp_path, (link, None)) as tar, pytest.raises(tarfile.TarError):  # FilterError is one
        _extract(tar, tmp_path / "out")
