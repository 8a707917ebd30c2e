"""pytest-benchmark JSON -> per-suite reports: ``<suite>_<device>_<date>.{json,md,png}``.

    python -m bench.report RESULTS.json [MORE.json ...] --out bench/results/

One schema for every suite (the ``rows`` of the JSON, one per benchmark; ``COLUMNS``):
suite, group, name, provider, role, items, item_unit, median_ms, p20_ms, p80_ms, mean_ms,
min_ms, rounds, items_per_s — plus ``ratios`` (group, provider, baseline, speedup =
baseline median / provider median, so > 1 means faster than the baseline) and the run's
provenance (``meta``). Percentiles come from the stored per-round times (pytest-benchmark's
``--benchmark-json`` keeps every round); ``extra_info`` is kept per row.

How rows are read, so that every suite fits without a registry of names:
* suite = the bench file (``bench/bench_embed.py`` -> ``embed``);
* provider = ``extra_info["provider"]``, else the ``provider`` / ``backend`` parameter, else the
  test's name;
* group = the benchmark's ``group``, else the test name with its other parameters (the rows that
  compare like with like);
* role = ``extra_info["role"]`` ("ours" / "baseline"), else "baseline" when the provider matches
  ``--baseline`` (default ``BASELINE_RE``: LAION, transformers, torchaudio, nnAudio, SDPA, Flex,
  naive, eager and compiled PyTorch) and "ours" otherwise;
* items = ``extra_info["items"]`` / ``["batch"]``, else a batch-like parameter (batch, B, N).

The PNG has up to two panels: throughput (items/s) against batch for each provider where a suite
has several batch sizes, and speed-up bars of each of ours against each baseline of its group
(where a group has none of ours, every provider against the LAION-like baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "BASELINE_RE", "load_rows", "write_reports", "main"]

COLUMNS = [
    "suite", "group", "family", "name", "provider", "role", "items", "item_unit", "median_ms", "p20_ms",
    "p80_ms", "mean_ms", "min_ms", "rounds", "items_per_s",
]  # fmt: skip
BASELINE_RE = (
    r"laion|transformers|^hf$|torchaudio|nnaudio|librosa|sdpa|flex|open_clip|naive|^eager$|compiled"
)
MAX_STORED_ROUNDS = 100
_BATCH_PARAMS = ("batch", "batch_size", "B", "N", "n", "b")
_PROVIDER_PARAMS = ("provider", "backend", "impl")
# extra_info fields worth a column when a suite has them: (key, header, format)
_METRICS = [
    ("audio_hours_per_s", "audio-h/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("gbps", "GB/s", "{:.3g}"),
    ("effective_gbps", "GB/s", "{:.3g}"),
    ("peak_mem_mib", "peak MiB", "{:.0f}"),
    ("peak_extra_mib", "peak MiB", "{:.0f}"),
]


# -------------------------------------------------------------------------- reading
def _percentile(sorted_data: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of sorted values."""
    if len(sorted_data) == 1:
        return sorted_data[0]
    pos = q * (len(sorted_data) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def _suite(fullname: str) -> str:
    stem = Path(fullname.split("::", 1)[0]).stem
    return stem.removeprefix("bench_").removeprefix("test_") or "bench"


def _provider(b: dict) -> str:
    extra = b.get("extra_info") or {}
    if extra.get("provider"):
        return str(extra["provider"])
    params = b.get("params") or {}
    for key in _PROVIDER_PARAMS:
        if key in params:
            return str(params[key])
    return b["name"].split("[", 1)[0]


def _group(b: dict) -> str:
    if b.get("group"):
        return str(b["group"])
    params = {k: v for k, v in (b.get("params") or {}).items() if k not in _PROVIDER_PARAMS}
    base = b["name"].split("[", 1)[0]
    return base + ("[" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]" if params else "")


def _family(b: dict) -> str:
    """The group without its batch size: the rows of one throughput-vs-batch line."""
    extra = b.get("extra_info") or {}
    if extra.get("family") or extra.get("kind"):
        return str(extra.get("family") or extra.get("kind"))
    if b.get("group"):
        return re.sub(r"[-_ ,]*\b(b|batch[ =]?)\d+\b", "", str(b["group"])).strip() or "all"
    skip = _PROVIDER_PARAMS + _BATCH_PARAMS
    params = {k: v for k, v in (b.get("params") or {}).items() if k not in skip}
    base = b["name"].split("[", 1)[0]
    return base + ("[" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]" if params else "")


def _items(b: dict) -> int | None:
    extra = b.get("extra_info") or {}
    for key in ("items", "batch"):
        if isinstance(extra.get(key), (int, float)):
            return int(extra[key])
    params = b.get("params") or {}
    for key in _BATCH_PARAMS:
        if isinstance(params.get(key), (int, float)):
            return int(params[key])
    return None


def _device_slug(meta: dict) -> str:
    name = str(meta.get("device_name") or "cpu")
    if name.startswith("cpu"):
        cores = re.search(r"x(\d+)$", name)
        return f"cpu-{cores.group(1)}core" if cores else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _meta(doc: dict, benchmarks: list[dict]) -> dict[str, Any]:
    machine = doc.get("machine_info") or {}
    env = dict(machine.get("clap_fast") or {})
    if not env:  # a JSON written without bench/conftest.py: use what pytest-benchmark has
        for b in benchmarks:
            env = dict((b.get("extra_info") or {}).get("env") or {})
            if env:
                break
    env.setdefault("device_name", f"cpu: {machine.get('cpu', {}).get('brand_raw', '?')}")
    commit = doc.get("commit_info") or {}
    env.setdefault("git_commit", commit.get("id", "unknown"))
    env["datetime"] = doc.get("datetime", "")
    env["python"] = machine.get("python_version")
    env["cpu"] = (machine.get("cpu") or {}).get("brand_raw")
    isa = {(b.get("extra_info") or {}).get("cpu_isa") for b in benchmarks} - {None}
    if isa:  # suites that record the CPU's ISA (bench_cpu_engines.py)
        env["cpu_isa"] = ", ".join(sorted(isa))
    loads = [((b.get("extra_info") or {}).get("env") or {}).get("loadavg_1m") for b in benchmarks]
    loads = [x for x in loads if isinstance(x, (int, float))]
    if loads:
        env["loadavg_1m_range"] = [min(loads), max(loads)]
    return env


def load_rows(paths: list[Path], baseline_re: str = BASELINE_RE) -> dict[tuple, dict]:
    """Read pytest-benchmark JSON files -> {(suite, device, date): {"meta", "rows"}}."""
    reports: dict[tuple, dict] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        by_suite: dict[str, list[dict]] = defaultdict(list)
        for b in doc.get("benchmarks", []):
            by_suite[_suite(b.get("fullname", b["name"]))].append(b)
        for suite, benchmarks in by_suite.items():
            meta = _meta(doc, benchmarks)
            key = (suite, _device_slug(meta), str(meta["datetime"])[:10] or "undated")
            rep = reports.setdefault(key, {"meta": meta, "rows": {}})
            for b in benchmarks:
                row = _row(suite, b, baseline_re)
                rep["rows"][row["name"]] = row  # a later file wins for the same benchmark
    for rep in reports.values():
        rep["rows"] = list(rep["rows"].values())
        rep["ratios"] = _ratios(rep["rows"])
    return reports


def _row(suite: str, b: dict, baseline_re: str) -> dict[str, Any]:
    stats = b.get("stats") or {}
    data = sorted(stats.get("data") or [])
    if data:
        med, p20, p80 = statistics.median(data), _percentile(data, 0.2), _percentile(data, 0.8)
    else:  # JSON without rounds: fall back to the stats pytest-benchmark kept
        med = stats.get("median")
        p20, p80 = stats.get("p20", stats.get("q1")), stats.get("p80", stats.get("q3"))
    extra = dict(b.get("extra_info") or {})
    provider = _provider(b)
    role = extra.get("role") or ("baseline" if re.search(baseline_re, provider) else "ours")
    items = _items(b)
    ms = lambda s: None if s is None else round(s * 1e3, 4)  # noqa: E731
    return {
        "suite": suite,
        "group": _group(b),
        "family": _family(b),
        "name": b["name"],
        "provider": provider,
        "role": role,
        "items": items,
        "item_unit": extra.get("item_unit", "items"),
        "median_ms": ms(med),
        "p20_ms": ms(p20),
        "p80_ms": ms(p80),
        "mean_ms": ms(stats.get("mean")),
        "min_ms": ms(stats.get("min")),
        "rounds": len(data) or stats.get("rounds"),
        "items_per_s": round(items / med, 4) if items and med else None,
        # every round when there are few (files stay small); percentiles above use them all
        "data_ms": [round(x * 1e3, 4) for x in data] if len(data) <= MAX_STORED_ROUNDS else None,
        "extra_info": {k: v for k, v in extra.items() if k != "env"},
    }


def _ratios(rows: list[dict]) -> list[dict]:
    """speedup = baseline median / provider median for every row against each baseline."""
    out = []
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, members in groups.items():
        for base in (m for m in members if m["role"] == "baseline" and m["median_ms"]):
            for r in members:
                if r is not base and r["median_ms"]:
                    speed = base["median_ms"] / r["median_ms"]
                    out.append(
                        dict(group=group, provider=r["provider"], role=r["role"],
                             baseline=base["provider"], speedup=round(speed, 4))
                    )  # fmt: skip
    return out


# -------------------------------------------------------------------------- writing
def _fmt(x: Any, spec: str = "{:.4g}") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 1000 and spec == "{:.4g}" else spec.format(x)
    return str(x)


def _agreement(extra: dict) -> str:
    agree = extra.get("agreement") or {}
    parts = [
        f"vs {k}: max\\|Δ\\| {v['max_abs_diff']:.1e}, cos ≥ {v['min_cosine']:.7f}"
        for k, v in agree.items()
        if isinstance(v, dict) and "max_abs_diff" in v
    ]
    return "; ".join(parts)


def markdown(suite: str, meta: dict, rows: list[dict], ratios: list[dict], png: str | None) -> str:
    """The report: provenance, then one table per group with ratios to each baseline."""
    lines = [
        f"# Benchmark `{suite}` — {meta.get('device_name')} — {str(meta['datetime'])[:10]}",
        "",
    ]
    prov = [
        ("commit", meta.get("git_commit")),
        ("command", f"`{meta.get('command')}`" if meta.get("command") else None),
        ("torch", meta.get("torch")),
        ("triton", meta.get("triton")),
        ("CUDA", meta.get("cuda")),
        ("torch threads", meta.get("torch_threads")),
        ("CPU", meta.get("cpu")),
        ("CPU ISA", meta.get("cpu_isa")),
        ("load average (1 min) during the run", meta.get("loadavg_1m_range")),
        ("run at", meta.get("datetime")),
    ]
    lines += [f"- {k}: {v}" for k, v in prov if v is not None]
    lines += [
        "",
        "Times are per call (all rounds stored in the JSON): median, p20, p80 and min in ms. "
        "`× base` = the baseline's median / this row's median (> 1: faster than that baseline).",
        "",
    ]
    speed = {(r["group"], r["provider"], r["baseline"]): r["speedup"] for r in ratios}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, members in groups.items():
        bases = [m["provider"] for m in members if m["role"] == "baseline"]
        metrics = [
            m for m in _METRICS if any(r["extra_info"].get(m[0]) is not None for r in members)
        ]
        has_agree = any(_agreement(r["extra_info"]) for r in members)
        unit = members[0]["item_unit"]
        head = ["provider", "role", "items", "median ms", "p20 ms", "p80 ms", "min ms", f"{unit}/s"]
        head += [h for _, h, _ in metrics] + [f"× {b}" for b in bases]
        head += ["agreement"] if has_agree else []
        lines += [f"## {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sorted(members, key=lambda r: (r["role"] != "ours", r["median_ms"] or 0)):
            cells = [f"**{r['provider']}**" if r["role"] == "ours" else r["provider"], r["role"]]
            cells += [_fmt(r[k]) for k in ("items", "median_ms", "p20_ms", "p80_ms", "min_ms")]
            cells += [_fmt(r["items_per_s"])]
            cells += [_fmt(r["extra_info"].get(k), f) for k, _, f in metrics]
            cells += [
                _fmt(speed.get((group, r["provider"], b)), "{:.3g}×") if b != r["provider"] else "1"
                for b in bases
            ]
            cells += [_agreement(r["extra_info"]) or "—"] if has_agree else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if png:
        lines += [f"![{suite}]({png})", ""]
    return "\n".join(lines)


def plot(path: Path, suite: str, meta: dict, rows: list[dict], ratios: list[dict]) -> bool:
    """Throughput vs batch and speed-up bars; False when there is nothing to draw."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["items"] and r["items_per_s"]:
            series[(r["family"], r["provider"])].append((r["items"], r["items_per_s"]))
    series = {k: sorted(v) for k, v in series.items() if len({b for b, _ in v}) >= 2}
    bars = [r for r in ratios if r["role"] == "ours"]
    if not bars:  # no row of ours in this suite (e.g. GPU-only kernels on a CPU): vs LAION
        bars = [r for r in ratios if "laion" in r["baseline"]]
    if not series and not bars:
        return False
    panels = [p for p in ("tput", "speed") if (p == "tput" and series) or (p == "speed" and bars)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "tput":
            units = {r["family"]: r["item_unit"] for r in rows}
            for (family, provider), pts in sorted(series.items()):
                label = f"{provider} ({family}, {units[family]}/s)" if len(units) > 1 else provider
                ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("batch")
            one_unit = len({units[f] for f, _ in series}) == 1
            ax.set_ylabel(f"{rows[0]['item_unit'] if one_unit else 'items'}/s (median)")
            ax.set_title("throughput vs batch")
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        else:
            labels = [f"{r['group']}\n{r['provider']} vs {r['baseline']}" for r in bars]
            values = [r["speedup"] for r in bars]
            colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
            bars_h = ax.barh(range(len(values)), values, color=colors)
            ax.bar_label(bars_h, labels=[f"{v:.2f}×" for v in values], fontsize=7, padding=2)
            ax.set_yticks(range(len(values)), labels, fontsize=6)
            ax.axvline(1.0, color="k", lw=0.8)
            if max(values) / min(values) > 10:  # wide range: log axis
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
            ax.set_xlim(right=max(values) * (1.6 if ax.get_xscale() == "log" else 1.15))
            ax.set_xlabel("speed-up (baseline median / median)")
            ax.set_title("speed-up over baselines")
            ax.invert_yaxis()
    fig.suptitle(f"{suite} — {meta.get('device_name')} — {str(meta['datetime'])[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_reports(reports: dict[tuple, dict], out: Path) -> list[Path]:
    """Write ``<suite>_<device>_<date>.{json,md,png}`` for every report; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (suite, device, date), rep in sorted(reports.items()):
        stem = f"{suite}_{device}_{date}"
        png = out / f"{stem}.png"
        has_png = plot(png, suite, rep["meta"], rep["rows"], rep["ratios"])
        doc = {
            "schema": {
                "rows": COLUMNS,
                "ratios": ["group", "provider", "role", "baseline", "speedup"],
            }
        }
        doc |= {"suite": suite, "meta": rep["meta"], "rows": rep["rows"], "ratios": rep["ratios"]}
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        md = markdown(suite, rep["meta"], rep["rows"], rep["ratios"], png.name if has_png else None)
        (out / f"{stem}.md").write_text(md)
        written += [out / f"{stem}.json", out / f"{stem}.md"] + ([png] if has_png else [])
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    ap.add_argument("--baseline", default=BASELINE_RE, help="regex: providers that are baselines")
    args = ap.parse_args(argv)
    reports = load_rows(args.results, args.baseline)
    if not reports:
        ap.error("no benchmarks in the given files (was the run made with --benchmark-disable?)")
    for p in write_reports(reports, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
