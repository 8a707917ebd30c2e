"""Reliability: hostile and careless inputs over every entry point (issue 19).

Each test feeds one malformed input and asserts a clear error naming the problem (or a named,
counted drop), never a traceback from deep inside torch, a silent loss, or code run from a
file. Hostile pickles write a marker file when unpickled: every such test asserts the marker
does not exist afterwards.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_fast import safety, validate
from clap_fast.checkpoint import CheckpointError, read_state_dict
from clap_fast.cli import main as cli
from clap_fast.train.ckpt import load_checkpoint_into, resume, save_checkpoint
from clap_fast.train.dist import Dist
from tests.helpers import signals, small_model

sf = pytest.importorskip("soundfile")  # not on the GPU image

D = Dist()


class Payload:
    """Unpickling this creates ``marker`` (builtins.open): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    return m, opt


def _save(ckpt_dir: Path, name: str = "epoch_latest", step: int = 4, model=None) -> Path:
    m, opt = (model, torch.optim.AdamW(model.parameters())) if model is not None else _tiny()
    meta = {"step": step, "epoch": 1, "batches_in_epoch": 0, "best": []}
    save_checkpoint(ckpt_dir, name, m, opt, meta, D)
    return ckpt_dir / name


def _resume(path: str, ckpt_dir: Path):
    m, opt = _tiny()
    return resume(types.SimpleNamespace(resume=path), ckpt_dir, m, opt, D)


# ------------------------------------------------------------------ hostile pickles
def test_hostile_rng_pt_is_refused(tmp_path):
    folder = _save(tmp_path / "ck")
    (folder / "rng_0.safetensors").unlink()  # an older-format folder: rng_0.pt
    marker = tmp_path / "pwned"
    torch.save({"python": Payload(marker)}, folder / "rng_0.pt")
    m, opt = _tiny()
    with pytest.raises(safety.UnsafeCheckpointError, match="rng_0.pt"):
        load_checkpoint_into(folder, m, opt, D)
    assert not marker.exists()


def test_hostile_dcp_metadata_is_refused_on_resume(tmp_path):
    folder = _save(tmp_path / "ck")
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SystemExit, match="refused to unpickle io.open"):
        _resume(str(folder), tmp_path / "ck")
    assert not marker.exists()


def test_hostile_dcp_metadata_is_refused_by_check_ckpt(tmp_path, capsys):
    folder = _save(tmp_path / "ck", "epoch_1")
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert cli(["check-ckpt", str(folder)]) == 2
    assert "refused to unpickle io.open" in capsys.readouterr().err
    assert not marker.exists()


def test_check_ckpt_never_trusts_a_planted_cache(tmp_path, capsys):
    folder = _save(tmp_path / "ck", "epoch_1")
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "ck" / ".epoch_1.check.pt")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert cli(["check-ckpt", str(folder)]) == 0
    assert "0.weight\t[4, 3]" in capsys.readouterr().out
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before  # no cache written


def test_hostile_byte_item_in_a_shard_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m, opt = _tiny()
    msd, osd = get_state_dict(m, opt)
    marker = tmp_path / "pwned"
    osd["param_groups"][0]["lr"] = Payload(marker)  # stored as a pickled byte item
    folder = tmp_path / "evil"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    assert not marker.exists()
    with pytest.raises(safety.UnsafeCheckpointError, match="optim.param_groups.0.lr"):
        safety.read_dcp_state_dict(folder)
    m2, opt2 = _tiny()
    with pytest.raises(safety.UnsafeCheckpointError, match="refused"):
        safety.load_dcp(
            {"model": get_state_dict(m2, opt2)[0], "optim": get_state_dict(m2, opt2)[1]}, folder
        )
    assert not marker.exists()


def test_hostile_laion_pt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_shard_name_leaving_the_folder_is_refused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder = _save(tmp_path / "ck", "epoch_1")
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own file: plain pickle is fine
    k = next(iter(md.storage_data))
    md.storage_data[k] = _StorageInfo("../../etc/passwd", 0, 10)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(safety.UnsafeCheckpointError, match="not a plain file name"):
        safety.check_dcp_folder(folder)


# ------------------------------------------------------------------ --resume
def test_resume_round_trip_restores_weights_and_rng(tmp_path):
    import random

    m, opt = _tiny()
    save_checkpoint(
        tmp_path, "epoch_latest", m, opt, {"step": 7, "epoch": 0, "batches_in_epoch": 7}, D
    )
    expect = (random.random(), float(np.random.rand()), torch.rand(3))
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    step, epoch, skip, _ = resume(
        types.SimpleNamespace(resume="latest"), tmp_path, m2, torch.optim.AdamW(m2.parameters()), D
    )
    assert (step, epoch, skip) == (7, 0, 7)
    assert (random.random(), float(np.random.rand())) == expect[:2]
    assert torch.equal(torch.rand(3), expect[2])
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "epoch_latest" / "rng_0.safetensors").is_file()
    assert not list((tmp_path / "epoch_latest").glob("*.pt"))


def test_resume_dangling_link_stops(tmp_path):
    _save(tmp_path)
    target = (tmp_path / "epoch_latest").resolve()
    import shutil

    shutil.rmtree(target)
    with pytest.raises(SystemExit, match="dangling link"):
        _resume("latest", tmp_path)


def test_resume_latest_without_link_but_with_checkpoints_stops(tmp_path):
    _save(tmp_path, "epoch_2")
    with pytest.raises(SystemExit, match="epoch_2"):
        _resume("latest", tmp_path)


def test_resume_latest_in_an_empty_run_starts_fresh(tmp_path, caplog):
    assert _resume("latest", tmp_path / "none") == (0, 0, 0, [])
    assert "starting fresh" in caplog.text


def test_resume_truncated_shard_stops(tmp_path):
    folder = _save(tmp_path)
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"truncated \(100 of"):
        _resume("latest", tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: (f / "meta.json").unlink(), "meta.json is missing"),
        (lambda f: (f / "meta.json").write_text("{step: 3"), "does not parse"),
        (lambda f: (f / "meta.json").write_text('{"step": "3"}'), "'step' must be an integer"),
        (lambda f: (f / "rng_0.safetensors").unlink(), "RNG state of rank 0"),
        (lambda f: (f / "rng_0.safetensors").write_bytes(b"\x00" * 7), "corrupt RNG state"),
        (lambda f: (f / ".metadata").write_bytes(b"\x80\x04garbage"), "truncated or corrupt"),
        (lambda f: next(f.glob("*.distcp")).unlink(), "is missing"),
    ],
    ids=["no-meta", "bad-meta", "meta-type", "no-rng", "bad-rng", "bad-metadata", "no-shard"],
)
def test_resume_broken_folder_stops_with_one_line(tmp_path, edit, match):
    folder = _save(tmp_path).resolve()
    edit(folder)
    with pytest.raises(SystemExit, match=match) as e:
        _resume(str(folder), tmp_path)
    assert "\n" not in str(e.value)


def test_resume_empty_folder_stops(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty folder"):
        _resume(str(tmp_path / "empty"), tmp_path)


def test_resume_pt_file_stops(tmp_path):
    small = torch.nn.Linear(2, 2)
    torch.save(small.state_dict(), tmp_path / "w.pt")
    with pytest.raises(SystemExit, match="is a file.*--pretrained"):
        _resume(str(tmp_path / "w.pt"), tmp_path)


def test_saving_a_step_twice_never_mixes_two_runs(tmp_path):
    torch.manual_seed(1)
    a = torch.nn.Linear(8, 8)
    torch.manual_seed(2)
    b = torch.nn.Linear(8, 8)
    _save(tmp_path, step=16, model=a)
    _save(tmp_path, "epoch_2", step=16, model=a)
    _save(tmp_path, step=16, model=b)  # a second run reaching an already-saved step
    _save(tmp_path, "epoch_2", step=16, model=b)
    for name in ("epoch_latest", "epoch_2"):
        sd = safety.read_dcp_state_dict(tmp_path / name)["model"]
        assert torch.equal(sd["weight"], b.weight) and torch.equal(sd["bias"], b.bias), name
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["epoch_2", "epoch_latest", "latest_00000016-1"]  # old folder removed whole


# ------------------------------------------------------------------ data and tools
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from clap_fast import synth

    root = tmp_path_factory.mktemp("shards")
    synth.write_webdataset(root, "synth", {"train": 12}, shard_size=6, duration=1.0, progress=False)
    return root


def test_test_tars_counts_good_samples(shards, capsys):
    split = shards / "synth" / "train"
    assert cli(["test-tars", "--tar-path", str(split), "--start", "0", "--end", "2"]) == 0
    assert "tested 2 tars, 12 good samples, 0 problems" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, match",
    [(None, "sizes.json is missing"), ("[1, 2", "not valid JSON"), ('{"0.tar": -3}', ">= 0")],
)
def test_test_tars_bad_sizes_json_is_clear(tmp_path, content, match, capsys):
    if content is not None:
        (tmp_path / "sizes.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        cli(["test-tars", "--tar-path", str(tmp_path)])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_garbage_sizes_json_is_not_taken_for_missing(tmp_path):
    from clap_fast.data import split_exists

    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "sizes.json").write_text("garbage")
    with pytest.raises(ValueError, match="sizes.json: not valid JSON"):
        split_exists(str(tmp_path), "ds", "train")


def _train_args(root: Path, tmp: Path, names: str = "synth") -> list[str]:
    return [
        "--datasetpath", str(root), "--datasetnames", *names.split(), "--datasetinfos", "train",
        "--model", "HTSAT-mini", "--tmodel", "transformer",
        "--text-overrides", '{"width": 32, "layers": 1, "heads": 2}', "--clip-samples", "48000",
        "--batch-size", "4", "--workers", "0", "--epochs", "1", "--no-eval",
        "--logdir", str(tmp), "--name", "run",
    ]  # fmt: skip


def test_misspelled_datasetname_is_an_error(shards, tmp_path):
    from clap_fast.train import main as train_main

    with pytest.raises(SystemExit, match=r"--datasetnames \['synht'\]"):
        train_main(_train_args(shards, tmp_path, "synth synht"))


def test_overcounting_sizes_json_is_reported(shards, tmp_path):
    import shutil

    from clap_fast.train import main as train_main

    root = tmp_path / "data"
    shutil.copytree(shards, root)
    sizes = root / "synth" / "train" / "sizes.json"
    sizes.write_text(json.dumps({k: v * 4 for k, v in json.loads(sizes.read_text()).items()}))
    assert train_main(_train_args(root, tmp_path)) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    short = [r for r in rows if r.get("kind") == "data_shortfall"]
    assert short and short[0]["planned_steps"] == 12 and short[0]["batches"] == 3
    assert "promised 48 samples" in (tmp_path / "run" / "out.log").read_text()


# ------------------------------------------------------------------ CLI: drops and early errors
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_cli")
    model = small_model(text="transformer")
    model.save_pretrained(root / "ckpt")
    with torch.no_grad():
        model.audio_projection[0].weight.fill_(float("nan"))
    model.save_pretrained(root / "nan_ckpt")
    audio = root / "audio"
    (audio / "locked").mkdir(parents=True)
    x = signals(2, 48000).numpy()
    sf.write(audio / "a.wav", x[0], 48000)
    sf.write(audio / "locked" / "hidden.wav", x[1], 48000)
    full = audio / "a.wav"
    sf.write(root / "long.wav", signals(1, 96000).numpy()[0], 48000, subtype="PCM_16")
    raw = (root / "long.wav").read_bytes()
    (audio / "cut.wav").write_bytes(raw[: int(len(raw) * 0.03)])
    return root, full


def test_nan_embeddings_are_named_and_fail_the_exit_status(cli_setup):
    root, full = cli_setup
    out = root / "nan.npy"
    args = ["embed", str(full), "--checkpoint", str(root / "nan_ckpt"), "--out", str(out)]
    assert cli(args) == 1
    assert np.load(out).shape == (0, 512)
    assert json.loads(out.with_suffix(".failed.json").read_text()) == {
        str(full): "non-finite embedding (NaN or inf from the model)"
    }
    assert cli(args + ["--allow-failures"]) == 0


def test_unreadable_folder_and_truncated_wav_are_named(cli_setup, monkeypatch):
    root, _ = cli_setup
    locked = root / "audio" / "locked"
    real = os.scandir

    def scandir(p="."):
        if Path(p) == locked:  # root ignores chmod: refuse the listing as the kernel would
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)
    out = root / "drops.npy"
    args = ["embed", str(root / "audio"), "--checkpoint", str(root / "ckpt"), "--out", str(out)]
    assert cli(args) == 1
    failed = json.loads(out.with_suffix(".failed.json").read_text())
    assert set(failed) == {str(locked), str(root / "audio" / "cut.wav")}
    assert (
        "unreadable folder" in failed[str(locked)]
        and "truncated" in failed[str(root / "audio" / "cut.wav")]
    )
    assert np.load(out).shape == (1, 512)


@pytest.fixture
def no_work(monkeypatch):
    """Any model load means the command started its work before rejecting its arguments."""

    def boom(args):
        raise AssertionError("work started before the arguments were validated")

    monkeypatch.setattr("clap_fast.cli_infer._load_model", boom)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--out", "{tmp}/x.csv"], ".npy or .parquet"),
        (["--out", "{tmp}/missing/x.npy"], "does not exist"),
        (["--out", "{tmp}/d.npy"], "is a folder"),
        (["--out", "{tmp}/x.npy", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ],
    ids=["csv", "missing-folder", "folder", "batch-0"],
)
def test_embed_rejects_bad_options_before_work(cli_setup, tmp_path, no_work, capsys, extra, match):
    root, full = cli_setup
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(SystemExit) as e:
        cli(["embed", str(full), *[x.replace("{tmp}", str(tmp_path)) for x in extra]])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_embed_rejects_read_only_folder_before_work(
    cli_setup, tmp_path, no_work, monkeypatch, capsys
):
    root, full = cli_setup
    monkeypatch.setattr(validate.os, "access", lambda p, mode: False)  # root ignores chmod
    with pytest.raises(SystemExit):
        cli(["embed", str(full), "--out", str(tmp_path / "x.npy")])
    assert "not a writable folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--template", "no placeholder"], "exactly one '{}'"),
        (["--template", "a {} and {x}"], "other format fields"),
        (["--out", "{tmp}/probs.txt"], "must end in .json"),
    ],
    ids=["no-braces", "extra-field", "out-suffix"],
)
def test_zero_shot_rejects_bad_options_before_work(
    cli_setup, tmp_path, no_work, capsys, extra, match
):
    root, full = cli_setup
    with pytest.raises(SystemExit):
        cli(
            [
                "zero-shot",
                str(full),
                "--labels",
                "dog",
                *[x.replace("{tmp}", str(tmp_path)) for x in extra],
            ]
        )
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: (np.save(p, np.zeros((2, 7), np.float32)), _names(p, 2)), "7 wide"),
        (lambda p: (np.save(p, np.zeros((2, 512), np.int64)), _names(p, 2)), "floating point"),
        (
            lambda p: (np.save(p, np.zeros((2, 512), np.float32)), _names(p, 3)),
            "2 embeddings but 3",
        ),
        (lambda p: np.save(p, np.zeros((2, 512), np.float32)), "paths.txt is missing"),
        (lambda p: np.save(p, np.array([{"a": 1}]), allow_pickle=True), "unreadable .npy"),
    ],
    ids=["width", "dtype", "names", "no-names", "pickled-npy"],
)
def test_search_checks_its_embeddings(cli_setup, tmp_path, capsys, make, match):
    root, _ = cli_setup
    p = tmp_path / "e.npy"
    make(p)
    with pytest.raises(SystemExit) as e:
        cli(["search", str(p), "--query", "dog", "--checkpoint", str(root / "ckpt")])
    assert e.value.code == 2 and match in capsys.readouterr().err


def _names(p: Path, n: int) -> None:
    p.with_suffix(".paths.txt").write_text("".join(f"f{i}.wav\n" for i in range(n)))


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_onnx_export_rejects_bad_out_before_work(tmp_path, monkeypatch, capsys, where):
    onnx_cli = pytest.importorskip("export.onnx")
    monkeypatch.setattr(onnx_cli, "export_model", lambda *a, **k: pytest.fail("export started"))
    out = tmp_path / "taken"
    if where == "file":
        out.write_text("x")
    else:
        out.mkdir()
        monkeypatch.setattr(validate.os, "access", lambda p, mode: False)
    with pytest.raises(SystemExit) as e:
        onnx_cli.main(["--out", str(out), "--tower", "text"])
    msg = "exists and is not a folder" if where == "file" else "not writable"
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_trt_export_rejects_an_existing_file_as_out(tmp_path, monkeypatch, capsys):
    trt_cli = pytest.importorskip("export.trt")
    monkeypatch.setattr(trt_cli, "load_model", lambda *a, **k: pytest.fail("export started"))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as e:
        trt_cli.main(["--out", str(tmp_path / "taken"), "--tower", "text"])
    assert e.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ API validation holes
@pytest.fixture(scope="module")
def model():
    return small_model(text="transformer")


@pytest.mark.parametrize("sr", [True, 1, 10, 999, 10**7, 48000.0, -48000])
def test_sample_rate_outside_the_range_is_refused(model, sr):
    with pytest.raises(
        ValueError, match=r"sample_rate must be an integer number of Hz in \[1000, 768000\]"
    ):
        model.embed_audio(torch.randn(1, 4800) * 0.1, sample_rate=sr)


def test_zero_shot_single_string_label_is_refused(model):
    a = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    with pytest.raises(ValueError, match="single string 'dog'"):
        model.zero_shot(a, "dog")


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.full((1, 77), 49408), r"token ids must lie in \[0, 49407\]"),
        (torch.full((1, 77), -1), r"token ids must lie in \[0, 49407\]"),
        (torch.zeros(1, 200, dtype=torch.long), "exactly 77 ids"),
    ],
    ids=["oov", "negative", "too-long"],
)
def test_bad_token_ids_are_refused(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model.embed_text_tokens(ids)


def test_over_long_tokens_for_an_hf_tower_are_refused():
    m = small_model(text="roberta")
    with pytest.raises(ValueError, match="1 to 512 ids"):
        m.embed_text_tokens(torch.ones(1, 600, dtype=torch.long))


def test_text_batch_size_zero_is_refused(model):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        model.embed_text_tokens(torch.zeros(1, 77, dtype=torch.long), batch_size=0)


def test_paths_given_to_embed_audio_are_refused(model):
    with pytest.raises(ValueError, match="embed_audio_files"):
        model.embed_audio(["a.wav", "b.wav"])


def test_int32_weights_in_safetensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    m = small_model(text="transformer")
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    sd = load_file(str(f))
    sd["audio_projection.0.weight"] = sd["audio_projection.0.weight"].to(torch.int32)
    save_file(sd, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="integer tensors for float weights.*torch.int32"):
        type(m).from_pretrained(tmp_path)


def test_random_bytes_pt_is_a_checkpoint_error(tmp_path):
    (tmp_path / "r.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="r.pt"):
        read_state_dict(tmp_path / "r.pt")


# ------------------------------------------------------------------ metrics
def test_multi_caption_cumulative_loss_is_laions():
    from torch.nn import functional as F

    from clap_fast.metrics import retrieval_metrics_multi_caption

    g = torch.Generator().manual_seed(0)
    n, c = 6, 5
    a = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    t = F.normalize(torch.randn(n * c, 16, generator=g), dim=-1)
    scale = 20.0
    out = retrieval_metrics_multi_caption(a, t, logit_scale=scale)
    # LAION's evaluate_clotho_audiocaps, written out: captions 5i..5i+4 belong to audio i
    la = scale * a @ t.T
    labels = torch.arange(n)
    a2t = [F.cross_entropy(la.reshape(n, n, c)[:, :, d], labels) for d in range(c)]
    t2a = [F.cross_entropy(la.T.reshape(n, c, n)[:, d, :], labels) for d in range(c)]
    expect = (torch.stack(a2t).mean() + torch.stack(t2a).mean()) / 2
    assert out["cumulative_loss"] == pytest.approx(float(expect), rel=1e-5)
    assert "cumulative_loss" not in retrieval_metrics_multi_caption(a, t)
