"""Serving benchmark: ``clap-fast serve`` (Triton) throughput and latency from ``tritonclient``.

    python -m bench.bench_serve                                   # tiny: HTSAT-mini, 16 requests
    python -m bench.bench_serve --model HTSAT-tiny --requests 128 --engines eager,onnx \\
        --out bench/results/serve_cpu-2core_DATE                   # the full CPU report

For each engine, the server runs once as batch-1 serving (``--max-batch 1
--no-dynamic-batching``, one model instance: every request its own execution, one at a time)
and once with dynamic batching on (``--max-batch``, the checking front model before
``clap_audio_batched``); at each concurrency (1, 4, 16 by default) that many client threads,
each with its own HTTP client, send 10 s clips until ``--requests`` are answered. Reported per
row: throughput (clips/s), p50 / p99 latency (ms), and with batching on the mean batch of the
batched model's executions (Triton's metrics); one more row sends to ``clap_audio_batched``
directly at the highest concurrency (the cost of the front model's extra hop). Goal (issue 16): at concurrency 16, batching on
gives >= 2x the throughput of batch-1 serving with p99 <= 2x the batch-1 latency (batch-1
serving, concurrency 1); >= 5x on a GPU. Next to it, the same engine in this process, without
a server: per-clip time of ``embed_audio`` at batch 1, 4 and 8, the
ceiling of what batching can gain on this machine. Random weights (timing does not depend on
them); every answer is checked once against the eager model (cosine >= 0.999).
``pytest bench`` runs a smoke test of the same code (two concurrency levels, few requests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["run", "main"]

log = logging.getLogger(__name__)


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _load(
    url: str, wave: np.ndarray, concurrency: int, n: int, model: str = "clap_audio"
) -> dict[str, float]:
    """Send n requests from `concurrency` threads; throughput and latency percentiles."""
    import tritonclient.http as http

    lat: list[float] = []
    lock = threading.Lock()
    left = [n]

    def worker() -> None:
        client = http.InferenceServerClient(url)
        inp = http.InferInput("waveform", list(wave.shape), "FP32")
        inp.set_data_from_numpy(wave)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            client.infer(model, [inp])
            with lock:
                lat.append(time.perf_counter() - t)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {
        "clips_per_s": n / wall,
        "p50_ms": _percentile(lat, 50) * 1e3,
        "p99_ms": _percentile(lat, 99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3,
    }


def _exec_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """(inferences, executions) of ``model`` from Triton's Prometheus endpoint."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        out.append(float(m.group(1)) if m else float("nan"))
    return out[0], out[1]


def inprocess(model, engine: str, batches: tuple[int, ...] = (1, 4, 8), clips: int = 24) -> dict:
    """Per-clip ms of ``embed_audio`` (10 s clips) at each batch size, no server: {batch:
    {"min": .., "median": ..}} over ``clips`` clips (after two warm-up calls). On a shared CPU
    the minimum is the steadier figure: a single call varies up to 10x with the load."""
    import torch

    runtime = {"compiled": "compile"}.get(engine, engine)
    wave = torch.from_numpy(
        np.random.default_rng(1).standard_normal((max(batches), 480000)).astype(np.float32) * 0.1
    )
    out = {}
    for b in batches:
        for _ in range(2):
            model.embed_audio(wave[:b], batch_size=b, engine=runtime)
        times = []
        for _ in range(max(3, clips // b)):
            t = time.perf_counter()
            model.embed_audio(wave[:b], batch_size=b, engine=runtime)
            times.append((time.perf_counter() - t) / b * 1e3)
        out[b] = {"min": min(times), "median": statistics.median(times)}
    return out


def run(
    model_name: str = "HTSAT-mini",
    engines: tuple[str, ...] = ("eager",),
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests: int = 16,
    max_batch: int = 16,
    delay_us: int = 5000,
    workdir: str | Path | None = None,
    inproc: bool = True,
) -> tuple[list[dict], dict]:
    """Rows of {engine, batching, concurrency, clips_per_s, p50_ms, p99_ms, mean_ms,
    mean_batch}, and {engine: {batch: in-process per-clip ms}}."""
    import torch
    import tritonclient.http as http

    import clap_fast
    from clap_fast.serve_process import ServerProcess

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    model = clap_fast.create_model(
        model_name, text="transformer", text_overrides={"width": 32, "layers": 1, "heads": 2}
    ).eval()
    model.save_pretrained(work / "ckpt")
    model = clap_fast.CLAP.from_pretrained(work / "ckpt").eval()
    wave = np.random.default_rng(0).standard_normal((1, 480000)).astype(np.float32) * 0.1
    want = model.embed_audio(torch.from_numpy(wave)).numpy()
    rows, per_clip = [], {}
    for engine in engines:
        if inproc:
            per_clip[engine] = inprocess(model, engine)
            log.info("%s in process, per-clip ms: %s", engine, per_clip[engine])
        for batching in (False, True):
            args = ["--engine", engine, "--onnx-dir", str(work / "onnx"),
                    "--max-queue-delay-us", str(delay_us)]  # fmt: skip
            if batching:
                args += ["--max-batch", str(max_batch)]
            else:  # batch-1 serving, as issue 16 means it
                args += ["--max-batch", "1", "--no-dynamic-batching"]
            log_path = work / f"server-{engine}-{batching}.log"
            with ServerProcess(work / "ckpt", args, log_path=log_path) as srv:
                client = http.InferenceServerClient(srv.http_url)
                inp = http.InferInput("waveform", list(wave.shape), "FP32")
                inp.set_data_from_numpy(wave)
                got = client.infer("clap_audio", [inp]).as_numpy("embedding")  # also warms up
                cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
                if cos < 0.999:
                    raise RuntimeError(f"{engine} server answers wrong embeddings (cos {cos})")
                metrics = f"127.0.0.1:{srv.metrics_port}"
                levels = [(c, "clap_audio") for c in concurrency]
                if batching:  # the batched model without its front: the cost of the extra hop
                    levels.append((max(concurrency), "clap_audio_batched"))
                for c, target in levels:
                    before = _exec_counts(metrics, "clap_audio_batched")
                    r = _load(srv.http_url, wave, c, max(requests, c), target)
                    after = _exec_counts(metrics, "clap_audio_batched")
                    n_exec = after[1] - before[1]
                    r["mean_batch"] = (after[0] - before[0]) / n_exec if n_exec > 0 else 1.0
                    r["front"] = target == "clap_audio"
                    rows.append({"engine": engine, "batching": batching, "concurrency": c, **r})
                    log.info("%s", json.dumps(rows[-1]))
    return rows, per_clip


def summarize(rows: list[dict], per_clip: dict | None = None) -> list[str]:
    """Goal lines: batching on vs batch-1 serving at the highest concurrency, p99 vs batch-1
    latency, and the in-process batch-8 / batch-1 per-clip speed-up (the ceiling)."""
    out = []
    for engine in sorted({r["engine"] for r in rows}):
        rs = [r for r in rows if r["engine"] == engine]
        c = max(r["concurrency"] for r in rs)
        on = next(r for r in rs if r["batching"] and r["front"] and r["concurrency"] == c)
        off = next(r for r in rs if not r["batching"] and r["concurrency"] == c)
        one = min((r for r in rs if not r["batching"]), key=lambda r: r["concurrency"])
        speed = on["clips_per_s"] / off["clips_per_s"]  # off = batch-1 serving
        p99 = on["p99_ms"] / one["p50_ms"]
        out.append(
            f"{engine}: concurrency {c}, batching on / batch-1 serving throughput {speed:.2f}x "
            f"(goal >= 2x); "
            f"p99 {on['p99_ms']:.0f} ms = {p99:.2f}x the batch-1 latency (goal <= 2x)"
        )
        if per_clip and engine in per_clip:
            pc = per_clip[engine]
            sizes = " / ".join(str(b) for b in pc)
            mins = " / ".join(f"{v['min']:.0f}" for v in pc.values())
            meds = " / ".join(f"{v['median']:.0f}" for v in pc.values())
            best = min(pc, key=lambda b: pc[b]["min"])
            out.append(
                f"{engine} in process (no server): per clip at batch {sizes}: min {mins} ms, "
                f"median {meds} ms; the best batch ({best}) gains "
                f"{pc[1]['min'] / pc[best]['min']:.2f}x per clip over batch 1 (min)"
            )
    return out


def report(rows: list[dict], meta: dict, per_clip: dict | None = None) -> str:
    lines = [
        f"# Serving benchmark ({meta['model']}, {meta['machine']}, {meta['date']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Versions: {meta['versions']}  ",
        f"Load average (1 min) before / after: {meta.get('load', '-')}",
        "",
        "| engine | serving | concurrency | clips/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = "dynamic batching" if r["batching"] else "batch-1"
        if not r.get("front", True):
            mode += " (clap_audio_batched directly, no front)"
        lines.append(
            f"| {r['engine']} | {mode} | {r['concurrency']} | {r['clips_per_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('mean_batch', 1.0):.1f} |"
        )
    return "\n".join([*lines, "", *[f"- {s}" for s in summarize(rows, per_clip)], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__)
    p.add_argument("--model", default="HTSAT-mini")
    p.add_argument("--engines", default="eager")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--no-inproc", action="store_true", help="skip the in-process measurement")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=5000)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    load0 = os.getloadavg()[0]
    rows, per_clip = run(
        args.model, tuple(args.engines.split(",")),
        tuple(int(c) for c in args.concurrency.split(",")), args.requests, args.max_batch,
        args.max_queue_delay_us, inproc=not args.no_inproc,
    )  # fmt: skip
    meta = {
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m bench.bench_serve", *(argv or sys.argv[1:])]),
        "versions": f"torch {torch.__version__}, tritonserver 2.51 (nvidia-pytriton 0.7.0)",
        "load": f"{load0:.2f} / {os.getloadavg()[0]:.2f}",
    }
    text = report(rows, meta, per_clip)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "inprocess_per_clip_ms": per_clip}, indent=2)
        )
        Path(f"{args.out}.md").write_text(text)
    return 0


def test_bench_serve_smoke(tmp_path):
    """``pytest bench``: the same code on two concurrency levels and a few requests."""
    import pytest

    from clap_fast.serve import SETUP_HINT, find_serve_env

    if find_serve_env() is None:
        pytest.skip(f"no serving environment; create it with: {SETUP_HINT}")
    pytest.importorskip("tritonclient.http")
    rows, per_clip = run(concurrency=(1, 2), requests=2, workdir=tmp_path, inproc=False)
    assert len(rows) == 5 and all(r["clips_per_s"] > 0 for r in rows)
    meta = {k: "-" for k in ("model", "machine", "date", "command", "versions")}
    assert "batch-1 serving throughput" in report(rows, meta, per_clip)


if __name__ == "__main__":
    sys.exit(main())
