"""Serving benchmark: ``clap-fast serve`` (Triton) throughput and latency from ``tritonclient``.

    python -m bench.bench_serve                                   # tiny: HTSAT-mini, 16 requests
    python -m bench.bench_serve --model HTSAT-tiny --requests 128 --engines eager,onnx \\
        --out bench/results/serve_cpu-2core_DATE                   # the full CPU report

For each engine, the server runs once with dynamic batching off (every request its own
execution) and once with it on; at each concurrency (1, 4, 16 by default) that many client
threads, each with its own HTTP client, send 10 s clips until ``--requests`` are answered.
Reported per row: throughput (clips/s), p50 / p99 latency (ms). Goal (issue 16): at
concurrency 16, batching on gives >= 2x the throughput of batching off with p99 <= 2x the
batch-1 latency (batching off, concurrency 1); >= 5x on a GPU. Random weights (timing does not
depend on them); every answer is checked once against the eager model (cosine >= 0.999).
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


def _load(url: str, wave: np.ndarray, concurrency: int, n: int) -> dict[str, float]:
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
            client.infer("clap_audio", [inp])
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


def run(
    model_name: str = "HTSAT-mini",
    engines: tuple[str, ...] = ("eager",),
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests: int = 16,
    max_batch: int = 16,
    delay_us: int = 5000,
    workdir: str | Path | None = None,
) -> list[dict]:
    """Rows of {engine, batching, concurrency, clips_per_s, p50_ms, p99_ms, mean_ms}."""
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
    rows = []
    for engine in engines:
        for batching in (False, True):
            args = ["--engine", engine, "--max-batch", str(max_batch), "--onnx-dir",
                    str(work / "onnx"), "--max-queue-delay-us", str(delay_us)]  # fmt: skip
            if not batching:
                args.append("--no-dynamic-batching")
            log_path = work / f"server-{engine}-{batching}.log"
            with ServerProcess(work / "ckpt", args, log_path=log_path) as srv:
                client = http.InferenceServerClient(srv.http_url)
                inp = http.InferInput("waveform", list(wave.shape), "FP32")
                inp.set_data_from_numpy(wave)
                got = client.infer("clap_audio", [inp]).as_numpy("embedding")  # also warms up
                cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
                if cos < 0.999:
                    raise RuntimeError(f"{engine} server answers wrong embeddings (cos {cos})")
                for c in concurrency:
                    r = _load(srv.http_url, wave, c, max(requests, c))
                    rows.append({"engine": engine, "batching": batching, "concurrency": c, **r})
                    log.info("%s", json.dumps(rows[-1]))
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Goal lines: batching on vs off at the highest concurrency, p99 vs batch-1 latency."""
    out = []
    for engine in sorted({r["engine"] for r in rows}):
        rs = [r for r in rows if r["engine"] == engine]
        c = max(r["concurrency"] for r in rs)
        on = next(r for r in rs if r["batching"] and r["concurrency"] == c)
        off = next(r for r in rs if not r["batching"] and r["concurrency"] == c)
        one = min((r for r in rs if not r["batching"]), key=lambda r: r["concurrency"])
        speed = on["clips_per_s"] / off["clips_per_s"]
        p99 = on["p99_ms"] / one["p50_ms"]
        out.append(
            f"{engine}: concurrency {c}, batching on / off throughput {speed:.2f}x (goal >= 2x); "
            f"p99 {on['p99_ms']:.0f} ms = {p99:.2f}x the batch-1 latency (goal <= 2x)"
        )
    return out


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Serving benchmark ({meta['model']}, {meta['machine']}, {meta['date']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Versions: {meta['versions']}",
        "",
        "| engine | dynamic batching | concurrency | clips/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | "
            f"{r['clips_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    return "\n".join([*lines, "", *[f"- {s}" for s in summarize(rows)], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__)
    p.add_argument("--model", default="HTSAT-mini")
    p.add_argument("--engines", default="eager")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=5000)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    rows = run(
        args.model, tuple(args.engines.split(",")),
        tuple(int(c) for c in args.concurrency.split(",")), args.requests, args.max_batch,
        args.max_queue_delay_us,
    )  # fmt: skip
    meta = {
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m bench.bench_serve", *(argv or sys.argv[1:])]),
        "versions": f"torch {torch.__version__}, tritonserver 2.51 (nvidia-pytriton 0.7.0)",
    }
    text = report(rows, meta)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        Path(f"{args.out}.md").write_text(text)
    return 0


def test_bench_serve_smoke(tmp_path):
    """``pytest bench``: the same code on two concurrency levels and a few requests."""
    import pytest

    from clap_fast.serve import SETUP_HINT, find_serve_env

    if find_serve_env() is None:
        pytest.skip(f"no serving environment; create it with: {SETUP_HINT}")
    pytest.importorskip("tritonclient.http")
    rows = run(concurrency=(1, 2), requests=2, workdir=tmp_path)
    assert len(rows) == 4 and all(r["clips_per_s"] > 0 for r in rows)
    assert "batching on / off" in report(rows, {k: "-" for k in ("model", "machine", "date",
                                                                  "command", "versions")})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
