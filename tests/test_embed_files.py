"""Embedding files that record their model; search refuses a mismatch; label files; CLI checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clap_fast.cli import main
from clap_fast.embed_files import (
    identity_mismatch,
    model_identity,
    read_embeddings,
    read_labels_file,
    sidecar_path,
    write_embeddings,
)
from tests.helpers import signals, small_model

sf = pytest.importorskip("soundfile")  # not on the GPU image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ef")
    a, b = small_model(text="transformer"), small_model(text="transformer")
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")  # another random init: other weights, same architecture
    audio = root / "audio"
    audio.mkdir()
    for i, x in enumerate(signals(3, 48000).numpy()):
        sf.write(audio / f"{i}.wav", x, 48000)
    return root


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_identity_round_trips_and_detects_other_weights(setup, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    model = small_model(text="transformer")
    ident = model_identity(model, setup / "a")
    assert ident["checkpoint_sha256"] and len(ident["weights_sha256"]) == 64
    emb = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    out = tmp_path / f"e{suffix}"
    write_embeddings(out, [f"f{i}" for i in range(5)], emb, ident)
    names, got, stored = read_embeddings(out)
    np.testing.assert_array_equal(got, emb)
    assert names == [f"f{i}" for i in range(5)] and stored == ident
    assert identity_mismatch(stored, ident) is None
    other = small_model(text="transformer")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert "weights_sha256" in identity_mismatch(stored, model_identity(other, None))
    if suffix == ".npy":
        assert json.loads(sidecar_path(out).read_text()) == ident


def test_parquet_with_variable_list_rows_is_read_through_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    pq.write_table(pa.table({"path": ["a", "b"], "embedding": rows}), tmp_path / "v.parquet")
    names, emb, ident = read_embeddings(tmp_path / "v.parquet")
    np.testing.assert_allclose(emb, np.array(rows, np.float32))
    assert names == ["a", "b"] and ident is None
    pq.write_table(pa.table({"path": ["a", "b"], "embedding": [[0.1], [0.2, 0.3]]}),
                   tmp_path / "r.parquet")  # fmt: skip
    with pytest.raises(ValueError, match="different lengths"):
        read_embeddings(tmp_path / "r.parquet")


def test_search_refuses_other_model_unless_told_and_batches_queries(setup, capsys):
    pytest.importorskip("open_clip")
    root = setup
    out = root / "e.npy"
    assert main(["embed", str(root / "audio"), "--checkpoint", str(root / "a"),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads(sidecar_path(out).read_text())["checkpoint"] == str(root / "a")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["search", str(out), "--query", "dog", "--checkpoint", str(root / "b")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "weights_sha256" in err and "--allow-model-mismatch" in err
    assert main(["search", str(out), "--query", "dog", "--checkpoint", str(root / "b"),
                 "--allow-model-mismatch", "--top", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["search", str(out), "--query", "a dog", "rain", "--top", "2",
                 "--checkpoint", str(root / "a")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# a dog" and lines[3] == "# rain" and len(lines) == 6


def test_search_without_checkpoint_and_missing_gpu_fail_in_one_line(setup, capsys, monkeypatch):
    root = setup
    with pytest.raises(SystemExit) as e:
        main(["search", str(root / "e.npy"), "--query", "dog"])
    assert e.value.code == 2 and "needs --checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["embed", str(root / "audio"), "--out", str(root / "x.npy"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device" in err and "Traceback" not in err


def test_labels_files(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(["dog", "rain"]))
    (tmp_path / "idx.json").write_text(json.dumps({"Speech": 0, "Dog": 2, "Music": 1}))
    (tmp_path / "idx.csv").write_text(
        'index,mid,display_name\n1,/m/b,"Male speech, man speaking"\n0,/m/a,Speech\n'
    )
    (tmp_path / "l.txt").write_text("dog\n\n rain \n")
    assert read_labels_file(tmp_path / "l.json") == ["dog", "rain"]
    assert read_labels_file(tmp_path / "idx.json") == ["Speech", "Music", "Dog"]
    assert read_labels_file(tmp_path / "idx.csv") == ["Speech", "Male speech, man speaking"]
    assert read_labels_file(tmp_path / "l.txt") == ["dog", "rain"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(ValueError, match="each once"):
        read_labels_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        read_labels_file(tmp_path / "none.txt")


def test_zero_shot_labels_file(setup, tmp_path, capsys):
    pytest.importorskip("open_clip")
    root = setup
    (tmp_path / "idx.json").write_text(json.dumps({"dog": 0, "rain": 1}))
    assert main(["zero-shot", str(root / "audio"), "--labels-file", str(tmp_path / "idx.json"),
                 "--checkpoint", str(root / "a")]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.split()[1] in ("dog", "rain") for line in out[1:])
    with pytest.raises(SystemExit):
        main(["zero-shot", str(root / "audio"), "--labels-file", str(tmp_path / "no.json")])
    assert "does not exist" in capsys.readouterr().err


def test_embed_long_audio_precision_workers_flags(setup, tmp_path, capsys):
    root = setup
    long = tmp_path / "long.wav"
    tone, bursts = signals(1, 480_000, seed=9)[0], signals(3, 48000 * 3, seed=9)[2]
    sf.write(long, torch.cat([tone, bursts]).numpy(), 48000)  # 13 s: the last 3 s differ
    out = tmp_path / "l.npy"
    assert main(["embed", str(long), "--checkpoint", str(root / "a"), "--out", str(out),
                 "--long-audio", "first", "--precision", "bf16", "--workers", "1"]) == 0  # fmt: skip
    from clap_fast import CLAP

    model = CLAP.from_pretrained(root / "a")
    want = model.embed_audio_files([long], long_audio="first", autocast=torch.bfloat16,
                                   progress=False)  # fmt: skip
    np.testing.assert_allclose(np.load(out), want.numpy(), atol=1e-6)
    sliding = model.embed_audio_files([long], autocast=torch.bfloat16, progress=False)
    assert np.abs(np.load(out) - sliding.numpy()).max() > 1e-5  # --long-audio took effect
    with pytest.raises(SystemExit) as e:
        main(["embed", str(long), "--out", str(out), "--workers", "0"])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err
