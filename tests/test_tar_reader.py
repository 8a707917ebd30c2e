"""The loader's tar reader (one read per member) against tarfile, on every header flavour."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from clap_fast.data import SkipStats, read_tar_samples

LONG = "deep/" * 30 + "clip_0001"  # > 100 characters: a GNU long name or a pax path record


def _tar(path: Path, fmt: int, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=fmt) as t:
        d = tarfile.TarInfo("folder/")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


MEMBERS = [
    ("folder/a.flac", b"\x01" * 700),
    ("folder/a.json", b'{"text": "a"}'),
    ("README", b"no extension"),
    (LONG + ".flac", b"\x02" * 512),
    (LONG + ".json", b'{"text": "\xc3\xa9"}'),
    ("b.tar.gz.npy", b"\x03" * 1),
]
EXPECTED = [
    ("folder/a", {"flac": b"\x01" * 700, "json": b'{"text": "a"}'}),
    (LONG, {"flac": b"\x02" * 512, "json": b'{"text": "\xc3\xa9"}'}),
    ("b", {"tar.gz.npy": b"\x03"}),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_matches_every_format(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "x.tar"
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    _tar(path, fmt, members)
    expected = EXPECTED if fmt != tarfile.USTAR_FORMAT else [EXPECTED[0], EXPECTED[2]]
    for url in (str(path), f"pipe:cat {path}"):
        stats = SkipStats()
        assert list(read_tar_samples(url, stats)) == expected
        assert not stats.details


def test_reader_reports_breaks_like_tarfile(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    _tar(path, tarfile.PAX_FORMAT, MEMBERS[:2] + [("c.flac", b"\x04" * 2000), ("c.json", b"{}")])
    raw = path.read_bytes()
    with tarfile.open(path) as t:
        c = t.getmember("c.flac")
    cases = {  # bytes kept -> (samples yielded, named member)
        c.offset_data + 100: (["folder/a"], "c.flac"),  # inside a member: the sample before stays
        c.offset: ([], "after folder/a"),  # at a header: the last sample may be incomplete
        0: ([], "(start)"),  # empty
    }
    for keep, (keys, where) in cases.items():
        (tmp_path / "cut.tar").write_bytes(raw[:keep])
        stats = SkipStats()
        assert [k for k, _ in read_tar_samples(str(tmp_path / "cut.tar"), stats)] == keys
        assert [(r, m.split(" (")[0]) for r, _, m in stats.details] == [("truncated_tar", where)]
    garbage = raw[: c.offset] + b"\x07" * 512 + raw[c.offset + 512 :]  # an invalid header
    (tmp_path / "bad.tar").write_bytes(garbage)
    stats = SkipStats()
    assert [k for k, _ in read_tar_samples(str(tmp_path / "bad.tar"), stats)] == []
    assert stats.details[0][0] == "truncated_tar" and "invalid header" in stats.details[0][2]
    stats = SkipStats()
    assert list(read_tar_samples(str(tmp_path / "missing.tar"), stats)) == []
    assert stats.details[0][0] == "unreadable_tar"
