"""Training end to end on the CPU: 2-process FSDP2 (gloo) learning, kill -9 + resume, bad data.

Runs are tiny (1 s clips, HTSAT-mini, a 2-layer text tower) but real: the model must learn the
synthetic classes well above chance, a resumed run must reproduce an uninterrupted one, and
every planted fault must be reported by name.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from clap_fast import synth

PY = sys.executable
COMMON = [
    "--dataset-type", "webdataset", "--datasetnames", "synth", "--datasetinfos", "train",
    "--model", "HTSAT-mini", "--tmodel", "transformer",
    "--text-overrides", '{"width": 64, "layers": 2, "heads": 2}',
    "--clip-samples", "48000", "--batch-size", "8", "--lr", "2e-3", "--wd", "0.1",
    "--warmup", "4", "--workers", "1", "--seed", "3",
]  # fmt: skip


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    env.pop("RANK", None)
    return env


def _torchrun(args: list[str], tmp: Path, **kw) -> subprocess.Popen:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "clap_fast.train", *args]
    return subprocess.Popen(cmd, env=_env(tmp), start_new_session=True, **kw)


def _descendants(pid: int) -> list[int]:
    """pid's process tree (children first found through /proc), pid included."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def _kill9(p: subprocess.Popen) -> list[int]:
    """kill -9 torchrun and every worker it started (workers live in their own sessions)."""
    pids = _descendants(p.pid)
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait()
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _run(args: list[str], tmp: Path, timeout: float = 900) -> str:
    p = _torchrun(args, tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _results(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from clap_fast.checkpoint import read_state_dict

    return read_state_dict(path)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synth.write_webdataset(
        root, "synth", {"train": 128, "test": 32}, shard_size=32, duration=1.0, progress=False
    )
    synth.write_folder(root / "folder", 32, duration=1.0, split="test")
    (root / "folder" / "classnames.json").write_text(json.dumps(synth.CLASS_NAMES))
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process FSDP2 run: 4 epochs x 8 steps, evaluated at the end."""
    tmp = tmp_path_factory.mktemp("ref")
    args = COMMON + ["--datasetpath", str(data), "--epochs", "4", "--val-frequency", "4"]
    args += ["--zeroshot-folder", str(data / "folder"), "--save-every-n-steps", "4"]
    args += ["--use-bn-sync", "--logdir", str(tmp), "--name", "ref"]
    _run(args, tmp)
    return tmp / "ref"


def test_fsdp2_two_process_learns(reference: Path) -> None:
    res = _results(reference)
    losses = [r["train_loss"] for r in res if r["kind"] == "data"]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.3, losses
    ev = [r for r in res if r["kind"] == "eval"][-1]
    assert ev["step"] == 32
    # 32 held-out clips: chance R@10 is 10/32; classes are learnt, so far above it.
    assert ev["synth/text_to_audio_R@10"] >= 0.6, ev
    assert ev["synth/audio_to_text_R@10"] >= 0.6, ev
    assert ev["synth/5cap_text_to_audio_R@10"] >= 0.6, ev
    assert 0 < ev["synth/5cap_cumulative_loss"] < math.log(32), ev  # LAION's; below chance
    assert ev["zeroshot/top1"] >= 0.25, ev  # 8 classes: chance 1/8
    assert json.loads((reference / "params.json").read_text())["parallel"] == "fsdp"
    # the exported LAION-layout file loads into a model
    import clap_fast

    model = clap_fast.CLAP.from_pretrained(reference / "checkpoints" / "final_laion.pt")
    assert model.cfg.audio.htsat.embed_dim == 8


def test_short_fine_tune_stops_reading_and_warns(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """--max-steps 2 of a 16-step epoch: the loader stops (the rest of the epoch is neither
    decoded nor counted), the default-length warm-up is flagged, --pretrained is logged."""
    args = COMMON + ["--datasetpath", str(data), "--epochs", "1", "--max-steps", "2"]
    args += ["--pretrained", str(reference / "checkpoints" / "final_laion.pt"), "--no-eval"]
    args += ["--warmup", "10000", "--logdir", str(tmp_path), "--name", "ft"]  # later wins
    p = subprocess.run([PY, "-m", "clap_fast.train", *args], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    log = (tmp_path / "ft" / "out.log").read_text()
    assert "--pretrained: loaded" in log and "HTSAT-mini" in log
    assert "--warmup 10000 is not shorter than the run's 2 steps" in log
    data_entry = [r for r in _results(tmp_path / "ft") if r["kind"] == "data"][0]
    assert data_entry["stopped_at_max_steps"] is True
    # 2 steps x 8 clips, plus what the one worker had prefetched; not the epoch's 128
    assert 16 <= data_entry["clips"] <= 64, data_entry


def test_kill_and_resume_matches_uninterrupted(data: Path, reference: Path, tmp_path: Path) -> None:
    args = COMMON + ["--datasetpath", str(data), "--epochs", "4", "--val-frequency", "4"]
    args += ["--zeroshot-folder", str(data / "folder"), "--save-every-n-steps", "4"]
    args += ["--use-bn-sync", "--logdir", str(tmp_path), "--name", "run"]
    ckpt = tmp_path / "run" / "checkpoints"
    p = _torchrun(args, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:  # kill -9 the whole job once a mid-run checkpoint (step >= 12: mid epoch 1) exists
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and p.poll() is None:
            meta = ckpt / "epoch_latest" / "meta.json"
            if meta.exists() and json.loads(meta.read_text())["step"] >= 12:
                break
            time.sleep(0.2)
        assert p.poll() is None, "the run ended before it could be killed"
    finally:
        pids = _kill9(p)
    time.sleep(1)
    assert len(pids) >= 3 and not [q for q in pids if _alive(q)], "processes survived kill -9"
    killed_at = json.loads((ckpt / "epoch_latest" / "meta.json").read_text())["step"]
    assert 12 <= killed_at < 32
    assert not (ckpt / "final_laion.pt").exists()
    _run(args + ["--resume", "latest"], tmp_path)
    meta = json.loads((ckpt / "epoch_latest" / "meta.json").read_text())
    assert meta["step"] == 32
    a, b = _weights(reference / "checkpoints" / "final_laion.pt"), _weights(ckpt / "final_laion.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def _rewrite(path: Path, edit) -> None:
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m, b in members:
            m.size = len(b)
            t.addfile(m, io.BytesIO(b))
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> tuple[Path, set[tuple[str, str]]]:
    """4 shards of 8; shard 0: garbage flac, broken json, a sample without audio;
    shard 1: truncated inside a member."""
    root = tmp_path_factory.mktemp("bad")
    synth.write_webdataset(
        root, "synth", {"train": 32, "test": 16}, shard_size=8, duration=1.0, progress=False
    )
    split = root / "synth" / "train"

    def edit0(members):
        out = []
        for m, b in members:
            if m.name == "train_000001.flac":
                b = b"garbage, not a flac file" * 40
            elif m.name == "train_000002.json":
                b = b'{"text": ["broken'
            elif m.name == "train_000003.flac":
                continue
            out.append((m, b))
        return out

    _rewrite(split / "0.tar", edit0)
    raw = (split / "1.tar").read_bytes()
    with tarfile.open(split / "1.tar") as t:
        cut = next(m for m in t.getmembers() if m.name == "train_000012.flac")
    (split / "1.tar").write_bytes(raw[: cut.offset_data + 300])
    expected = {
        ("undecodable_audio", "train_000001.flac"),
        ("bad_json", "train_000002.json"),
        ("missing_audio", "train_000003"),
        ("truncated_tar", "train_000012.flac"),
    }
    return root, expected


def _named(details) -> set[tuple[str, str]]:
    return {(reason, member.split(" ")[0]) for reason, _, member in details}


def test_bad_data_is_skipped_and_reported(bad_data, tmp_path: Path) -> None:
    root, expected = bad_data
    args = COMMON + ["--datasetpath", str(root), "--epochs", "2", "--save-frequency", "1"]
    args += ["--freeze-text", "--logdir", str(tmp_path), "--name", "bad", "--batch-size", "4"]
    proc = subprocess.run(
        [PY, "-m", "clap_fast.train", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "bad"
    data_entries = [r for r in _results(run) if r["kind"] == "data"]
    assert len(data_entries) == 2
    for r in data_entries:  # every epoch reports exactly the planted faults
        assert r["skipped"] == {
            "undecodable_audio": 1,
            "bad_json": 1,
            "missing_audio": 1,
            "truncated_tar": 1,
        }
        assert _named(r["skipped_items"]) == expected
        assert r["clips"] == 32 - 3 - 4  # shard 1 lost train_000012..15 to the truncation
    assert "skipped (bad_json)" in (run / "out.log").read_text()
    # check-ckpt: under --freeze-text the text tower is unchanged, the audio tower is not.
    from clap_fast.tools import check_ckpt_diff, check_ckpt_main

    e1, e2 = run / "checkpoints" / "epoch_1", run / "checkpoints" / "epoch_2"
    assert check_ckpt_diff(e1, e2, "text_branch") == []
    assert check_ckpt_main([str(e1), str(e2), "--key", "text_branch"]) == 0
    assert len(check_ckpt_diff(e1, e2, "audio_branch.layers")) > 0
    assert check_ckpt_main([str(e1), str(e2), "--key", "audio_branch"]) == 1


def test_test_tars_names_exactly_the_broken_members(bad_data, capsys) -> None:
    from clap_fast.tools import test_tars_main

    root, expected = bad_data
    split = root / "synth" / "train"
    assert test_tars_main(["--tar-path", str(split), "--start", "0", "--end", "4", "--order"]) == 1
    lines = [x.split("\t") for x in capsys.readouterr().out.splitlines() if "\t" in x]
    assert _named(lines) == expected
    # the pipe: form and --exclude: only the clean shards 2 and 3 remain
    assert (
        test_tars_main(
            ["--tar-path", f"pipe:cat {split}", "--start", "0", "--end", "4", "--exclude", "0", "1"]
        )
        == 0
    )


def test_params_accept_the_seed_readme_command() -> None:
    from clap_fast.train.params import parse_args

    cmd = """--save-frequency 50 --save-top-performance 3 --save-most-recent --dataset-type=webdataset
    --precision=fp32 --pretrained=openai --warmup 10000 --batch-size=184 --lr=1e-3 --wd=0.1 --epochs=400
    --workers=10 --use-bn-sync --freeze-text --model HTSAT-tiny --report-to wandb --wandb-notes n
    --resample-method=None --datasetnames Clotho audiocaps BBCSoundEffects --datasetinfos train
    unbalanced_train balanced_train --datasetpath /some/where""".split()
    cfg = parse_args(cmd)
    assert (cfg.save_frequency, cfg.save_top_performance, cfg.save_most_recent) == (50, 3, True)
    assert (cfg.batch_size, cfg.lr, cfg.wd, cfg.epochs, cfg.workers, cfg.warmup) == (
        184,
        1e-3,
        0.1,
        400,
        10,
        10000,
    )
    assert (
        cfg.use_bn_sync
        and cfg.freeze_text
        and cfg.model == "HTSAT-tiny"
        and cfg.tmodel == "transformer"
    )
    assert cfg.datasetnames == ["Clotho", "audiocaps", "BBCSoundEffects"]
    assert cfg.datasetinfos == ["train", "unbalanced_train", "balanced_train"]
    assert parse_args(cmd + ["--lp-mlp"]).ignored_flags == ["--lp-mlp"]
    with pytest.raises(SystemExit):
        parse_args(cmd + ["--not-a-laion-flag"])


def test_schedule_and_param_groups() -> None:
    import clap_fast
    from clap_fast.train import cosine_lr, param_groups

    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0)
    m = clap_fast.create_model(
        "HTSAT-mini", text="transformer", text_overrides={"width": 32, "layers": 1, "heads": 1}
    )
    names = {id(p): n for n, p in m.named_parameters()}
    no_wd, wd = param_groups(m, 0.1)
    no_wd_names = {names[id(p)] for p in no_wd["params"]}
    assert {"logit_scale_a", "audio_branch.bn0.weight"} <= no_wd_names
    assert any("relative_position_bias_table" in n for n in no_wd_names)
    assert all(not n.endswith("bias") for n in (names[id(p)] for p in wd["params"]))
    assert wd["weight_decay"] == 0.1 and no_wd["weight_decay"] == 0.0
