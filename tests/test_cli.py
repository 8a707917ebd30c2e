"""`clap-fast embed | zero-shot | search` end to end on generated files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clap_fast.cli import main
from tests.helpers import signals, small_model

sf = pytest.importorskip("soundfile")  # every test here decodes files; the GPU image has none


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = small_model(text="transformer")
    model.save_pretrained(root / "ckpt")
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    x = signals(3, 48000).numpy()
    sf.write(audio / "a.wav", x[0], 48000)
    sf.write(audio / "sub" / "b.flac", x[1], 48000)
    sf.write(audio / "c.flac", x[2], 32000)
    return root, model


def test_embed_npy_and_parquet(setup, capsys):
    root, model = setup
    assert (
        main(
            [
                "embed",
                str(root / "audio"),
                "--checkpoint",
                str(root / "ckpt"),
                "--out",
                str(root / "e.npy"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    emb = np.load(root / "e.npy")
    names = (root / "e.paths.txt").read_text().splitlines()
    assert emb.shape == (3, 512) and len(names) == 3 and names[0].endswith("a.wav")
    np.testing.assert_allclose(
        emb[0], model.embed_audio_files([names[0]], progress=False)[0].numpy(), atol=1e-5
    )
    pytest.importorskip("pyarrow")
    assert (
        main(
            [
                "embed",
                str(root / "audio"),
                "--checkpoint",
                str(root / "ckpt"),
                "--out",
                str(root / "e.parquet"),
            ]
        )
        == 0
    )


def test_embed_reports_broken_files(setup):
    root, _ = setup
    bad = root / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"garbage")
    sf.write(bad / "ok.wav", signals(1, 48000).numpy()[0], 48000)
    assert (
        main(["embed", str(bad), "--checkpoint", str(root / "ckpt"), "--out", str(root / "b.npy")])
        == 1
    )
    assert np.load(root / "b.npy").shape == (1, 512)
    assert list(json.loads((root / "b.failed.json").read_text())) == [str(bad / "x.wav")]


def test_zero_shot_and_search(setup, capsys):
    pytest.importorskip("open_clip")
    root, _ = setup
    assert (
        main(
            [
                "zero-shot",
                str(root / "audio"),
                "--labels",
                "dog",
                "rain",
                "--checkpoint",
                str(root / "ckpt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[1].split()[1] in ("dog", "rain")
    main(
        [
            "embed",
            str(root / "audio"),
            "--checkpoint",
            str(root / "ckpt"),
            "--out",
            str(root / "s.npy"),
        ]
    )
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                str(root / "s.npy"),
                "--query",
                "a tone",
                "--top",
                "2",
                "--checkpoint",
                str(root / "ckpt"),
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="neither"):
        main(["embed", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npy")])
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert main([]) == 2


def test_embed_frames(setup, capsys):
    """--frames: one parquet row per 0.3125 s frame, equal to embed_audio(frames=True);
    search ranks the frames (path#t=seconds)."""
    pa = pytest.importorskip("pyarrow.parquet")
    root, model = setup
    ck = ["--checkpoint", str(root / "ckpt")]
    with pytest.raises(SystemExit) as e:  # frames need a parquet file (a time per row)
        main(["embed", str(root / "audio"), *ck, "--frames", "--out", str(root / "f.npy")])
    assert e.value.code == 2
    for extra in (["--precision", "bf16"], ["--long-audio", "first"], ["--engine", "onnx"]):
        with pytest.raises(SystemExit) as e:
            main(["embed", str(root / "audio"), *ck, "--frames", *extra,
                  "--out", str(root / "f.parquet")])  # fmt: skip
        assert e.value.code == 2
    out = root / "f.parquet"
    assert main(["embed", str(root / "audio"), *ck, "--frames", "--out", str(out)]) == 0
    table = pa.read_table(out)
    assert table.column_names == ["path", "time", "embedding"]
    paths = table.column("path").to_pylist()
    a = [i for i, p in enumerate(paths) if p.endswith("a.wav")]
    want = model.embed_audio(sf.read(root / "audio" / "a.wav")[0], frames=True)[0]
    times = table.column("time").to_numpy()[a]
    np.testing.assert_allclose(times, want.times.numpy())
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)[a])
    np.testing.assert_allclose(emb, want.embeddings.numpy(), atol=1e-5)
    assert len(a) == 4 and len(paths) == 4 + 4 + 5  # frames start every 0.3125 s in 1, 1, 1.5 s
    capsys.readouterr()
    pytest.importorskip("open_clip")
    assert main(["search", str(out), "--query", "a tone", "--top", "3", *ck]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("#t=" in line for line in lines)


def test_readme_and_quickstart_agree_on_its_duration():
    """The quick start's duration is stated in two places; they must say the same."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = r"[Aa]bout (\d+) minutes of training on a 2-core CPU"
    script = re.findall(pattern, (root / "scripts" / "quickstart.sh").read_text())
    readme = re.findall(pattern, (root / "README.md").read_text())
    assert script and readme and set(script) == set(readme), (script, readme)
