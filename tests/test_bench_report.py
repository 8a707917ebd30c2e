"""bench/report.py on a small synthetic pytest-benchmark JSON: schema, tables, ratios, plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

_SPEC = importlib.util.spec_from_file_location(
    "bench_report", Path(__file__).resolve().parent.parent / "bench" / "report.py"
)
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def _bench(file: str, name: str, params: dict, data: list[float], group=None, extra=None) -> dict:
    ids = "-".join(str(v) for v in params.values())
    return {
        "group": group,
        "name": f"{name}[{ids}]",
        "fullname": f"bench/{file}::{name}[{ids}]",
        "params": params,
        "param": ids,
        "extra_info": extra or {},
        "options": {},
        "stats": {"data": data, "median": sorted(data)[len(data) // 2], "mean": sum(data) / len(data),
                  "min": min(data), "rounds": len(data)},
    }  # fmt: skip


@pytest.fixture
def results(tmp_path: Path) -> Path:
    env = {"device_name": "cpu: Test CPU x2", "torch": "2.11.0", "git_commit": "abc123",
           "command": "pytest bench", "loadavg_1m": 1.5}  # fmt: skip
    benches = []
    for batch in (2, 8):
        for provider, per_item in (("clap_fast", 0.1), ("laion_clap", 0.3), ("transformers", 0.2)):
            t = per_item * batch
            extra = {"provider": provider, "batch": batch, "items": batch, "item_unit": "clips",
                     "kind": "audio", "role": "ours" if provider == "clap_fast" else "baseline",
                     "env": env}  # fmt: skip
            if provider != "laion_clap":
                extra["agreement"] = {"laion_clap": {"max_abs_diff": 5e-8, "min_cosine": 1.0}}
            # five rounds: t, 1.1t, 1.2t, 1.3t, 1.4t -> median 1.2t, p20 1.08t, p80 1.32t
            data = [t * (1 + 0.1 * i) for i in range(5)]
            benches.append(
                _bench("bench_embed.py", "test_embed_audio", {"batch": batch, "provider": provider},
                       data, group=f"embed_audio-b{batch}", extra=extra)
            )  # fmt: skip
    for provider, t in (("reference", 0.01), ("naive_eager", 0.04)):
        benches.append(
            _bench("bench_contrastive.py", "test_loss", {"provider": provider, "N": 768}, [t, t])
        )
    doc = {
        "machine_info": {"clap_fast": env, "cpu": {"brand_raw": "Test CPU"}},
        "commit_info": {"id": "abc123"},
        "datetime": "2026-11-24T10:00:00+00:00",
        "benchmarks": benches,
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    return path


def test_reports_written(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert report.main([str(results), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "contrastive_cpu-2core_2026-11-24.json", "contrastive_cpu-2core_2026-11-24.md",
        "contrastive_cpu-2core_2026-11-24.png", "embed_cpu-2core_2026-11-24.json",
        "embed_cpu-2core_2026-11-24.md", "embed_cpu-2core_2026-11-24.png",
    ]  # fmt: skip
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_rows_percentiles_and_ratios(results: Path) -> None:
    reports = report.load_rows([results])
    emb = reports[("embed", "cpu-2core", "2026-11-24")]
    rows = {r["name"]: r for r in emb["rows"]}
    cf = rows["test_embed_audio[8-clap_fast]"]
    assert set(report.COLUMNS) <= set(cf)
    assert cf["median_ms"] == pytest.approx(960.0)  # 0.8 s * 1.2
    assert cf["p20_ms"] == pytest.approx(864.0) and cf["p80_ms"] == pytest.approx(1056.0)
    assert cf["items_per_s"] == pytest.approx(8 / 0.96, rel=1e-4)
    assert cf["role"] == "ours" and cf["group"] == "embed_audio-b8"
    ratios = {(r["group"], r["provider"], r["baseline"]): r["speedup"] for r in emb["ratios"]}
    assert ratios[("embed_audio-b8", "clap_fast", "laion_clap")] == pytest.approx(3.0)
    assert ratios[("embed_audio-b8", "clap_fast", "transformers")] == pytest.approx(2.0)
    assert ratios[("embed_audio-b2", "transformers", "laion_clap")] == pytest.approx(1.5)
    # Without extra_info: provider from the parameter, role from the baseline regex.
    con = reports[("contrastive", "cpu-2core", "2026-11-24")]
    roles = {r["provider"]: r["role"] for r in con["rows"]}
    assert roles == {"reference": "ours", "naive_eager": "baseline"}
    assert con["ratios"][0]["speedup"] == pytest.approx(4.0)
    assert {r["group"] for r in con["rows"]} == {"test_loss[N=768]"}


def test_markdown_tables(results: Path, tmp_path: Path) -> None:
    report.main([str(results), "--out", str(tmp_path)])
    md = (tmp_path / "embed_cpu-2core_2026-11-24.md").read_text()
    assert "## embed_audio-b8" in md and "## embed_audio-b2" in md
    assert "| provider | role | items | median ms | p20 ms | p80 ms | min ms | clips/s |" in md
    line = next(
        ln for ln in md.splitlines() if ln.startswith("| **clap_fast** |") and "| 8 |" in ln
    )
    assert "960" in line and "864" in line and "1056" in line
    assert "3×" in line and "2×" in line  # vs laion_clap, vs transformers
    assert "max\\|Δ\\| 5.0e-08" in line
    assert "commit: abc123" in md and "`pytest bench`" in md
    assert "![embed](embed_cpu-2core_2026-11-24.png)" in md
    doc = json.loads((tmp_path / "embed_cpu-2core_2026-11-24.json").read_text())
    assert doc["schema"]["rows"] == report.COLUMNS and len(doc["rows"]) == 6
