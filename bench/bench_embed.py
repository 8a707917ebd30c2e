"""End to end: HTSAT-tiny audio embeddings of 10 s clips and RoBERTa text embeddings.

Three implementations, the same random weights, the same inputs, the same run:

  clap_fast           ``model.embed_audio(waveforms)`` / ``model.embed_text_tokens(ids, mask)``
  clap_fast_compiled  the same with ``audio_branch`` / ``text_branch`` under ``torch.compile``
                      (static shapes; GPU by default, CPU only with CLAP_BENCH_COMPILE=1 since it
                      compiles for minutes on 2 cores)
  laion_clap          laion_clap 1.1.x's own modules, its ``hook.CLAP_Module`` path: int16 round
                      trip per clip in NumPy, a {"waveform", "longer"} dict per clip,
                      ``CLAP.get_audio_embedding`` (conv STFT, eager Swin attention that collects
                      and averages the attention maps) / ``CLAP.get_text_embedding``
  transformers        ``ClapFeatureExtractor`` (fmin 50 Hz as LAION, NumPy STFT on the host)
                      + ``ClapModel.get_audio_features`` / ``get_text_features``

The weights are drawn once by ``transformers.ClapModel`` (seeded), converted to LAION's layout
by ``clap_fast.checkpoint.from_hf_state_dict`` (the STFT / filterbank buffers HF does not carry
come from clap_fast's deterministic values) and loaded strictly into laion_clap's model, so all
three compute the same function. laion_clap is built offline: its package ``__init__`` (which
loads RoBERTa / BERT / BART tokenizers from the hub) is bypassed by importing
``laion_clap.clap_module.{model,factory}`` under stub parent packages, ``RobertaModel
.from_pretrained("roberta-base")`` is redirected to a randomly initialised ``RobertaModel`` of
the same config, and ``h5py`` (imported but unused on this path) is stubbed when missing.
Install: ``pip install --no-deps laion_clap torchlibrosa`` (the ``bench`` extra).

Every benchmark records in ``extra_info`` the agreement of its embeddings with the reference
(laion_clap, else transformers): max |Δ| and min cosine, asserted within ``ATOL`` (1e-4 on the
CPU; on a GPU the Triton kernels and cuDNN use TF32, so the bound there is 2e-3). Inputs are
host NumPy arrays (audio) or CPU tensors (token ids) and every provider returns CPU embeddings,
so the host timer covers the device work (the final copy is a sync).

CPU: fp32, audio batches 2 and 8, text batches 8 and 32 (``--benchmark-disable`` smoke runs the
smallest only). GPU: fp32 audio batches 8, 32, 128 and text 64, 256. Both: clap_fast under bf16
autocast (agreement recorded, not asserted; the CPU has AVX512-BF16 here). clap_fast runs with
``engine="eager"`` here; the engines and ``auto`` are compared in ``bench_cpu_engines.py``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
import clap_fast  # noqa: E402
from bench.sizes import TINY, largest_last  # noqa: E402
from clap_fast import checkpoint as ck  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ATOL = 2e-3 if HAS_CUDA else 1e-4
CLIP = 480_000
SR = 48_000
TOKENS = 77
COMPILE = HAS_CUDA or os.environ.get("CLAP_BENCH_COMPILE") == "1"

if HAS_CUDA:
    AUDIO_BATCHES, TEXT_BATCHES, ROUNDS = [8, 32, 128], [64, 256], 10
else:
    AUDIO_BATCHES, TEXT_BATCHES, ROUNDS = [2, 8], [8, 32], 5
if TINY:  # gpu_run.sh --dry-run
    AUDIO_BATCHES, TEXT_BATCHES, ROUNDS = [1, 2], [2, 4], 1
REFERENCE_ORDER = ["laion_clap", "transformers"]  # the first available is the reference
PROVIDERS = ["laion_clap", "transformers", "clap_fast", "clap_fast_compiled", "clap_fast_bf16"]
ROLE = {"clap_fast": "ours", "clap_fast_compiled": "ours", "clap_fast_bf16": "ours"}


# ------------------------------------------------------------------------ models
@functools.cache
def hf_model():
    """transformers' ClapModel (HTSAT-tiny + RoBERTa-base sizes), seeded random weights."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        projection_hidden_act="relu",
    )  # fmt: skip
    cfg = transformers.ClapConfig(
        text_config=text, audio_config=dict(enable_fusion=False), projection_dim=512
    )
    return transformers.ClapModel(cfg).eval().to(DEVICE)


@functools.cache
def cf_model():
    """clap_fast's model holding the ClapModel's weights (converted by our HF loader)."""
    model = clap_fast.create_model("HTSAT-tiny", text="roberta", device="cpu")
    sd = {k: v.cpu() for k, v in hf_model().state_dict().items()}
    ck.load_into(model, ck.from_hf_state_dict(sd), fill_missing=ck.HF_FILLED)
    return model.eval().to(DEVICE)


@functools.cache
def cf_compiled():
    model = copy.deepcopy(cf_model())
    model.audio_branch.compile(dynamic=False)
    model.text_branch.compile(dynamic=False)
    return model


def _import_laion():
    """laion_clap's model modules without its package __init__ (which needs the network)."""
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("laion_clap is not installed (pip install --no-deps laion_clap torchlibrosa)")
    pytest.importorskip("torchlibrosa")
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("laion_clap", root), ("laion_clap.clap_module", f"{root}/clap_module")):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    if importlib.util.find_spec("h5py") is None:
        sys.modules["h5py"] = types.ModuleType("h5py")  # imported by its utils, unused here
    try:
        from laion_clap.clap_module import factory, model
    except ImportError as exc:  # e.g. a transformers version it predates
        pytest.skip(f"laion_clap's modules do not import here: {exc}")
    return factory, model


@functools.cache
def laion_model():
    """laion_clap's CLAP (factory.create_model) with clap_fast's weights loaded strictly."""
    factory, lmodel = _import_laion()
    text_cfg = cf_model().text_branch.config

    class _OfflineRoberta:
        @staticmethod
        def from_pretrained(name: str):
            assert name == "roberta-base", name
            return transformers.RobertaModel(text_cfg)

    saved, lmodel.RobertaModel = lmodel.RobertaModel, _OfflineRoberta
    try:
        model, _ = factory.create_model(
            "HTSAT-tiny", "roberta", pretrained="", precision="fp32", device="cpu",
            enable_fusion=False, fusion_type="None",
        )  # fmt: skip
    finally:
        lmodel.RobertaModel = saved
    sd = {k.removeprefix("module."): v for k, v in ck.to_laion_state_dict(cf_model()).items()}
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or k != "text_branch.embeddings.position_ids"}
    model.load_state_dict(sd, strict=True)
    return model.eval().to(DEVICE)


# ------------------------------------------------------------------------ inputs
@functools.cache
def audio_batch(batch: int) -> np.ndarray:
    """(batch, 480000) float32 host clips: tones + noise at different loudness (never zeros)."""
    g = np.random.default_rng(batch)
    t = np.arange(CLIP) / SR
    f0 = g.uniform(100, 4000, size=(batch, 1))
    amp = np.linspace(0.05, 0.6, batch)[:, None]
    x = amp * np.sin(2 * np.pi * f0 * t) + 0.1 * amp * g.standard_normal((batch, CLIP))
    return x.astype(np.float32)


@functools.cache
def text_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa-style (batch, 77) ids and mask: <s> … </s> then padding, lengths 6..60."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 50000, (batch, TOKENS), generator=g)
    lengths = torch.randint(6, 61, (batch,), generator=g)
    pos = torch.arange(TOKENS)[None]
    mask = (pos < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[pos == (lengths[:, None] - 1)] = 2
    ids[mask == 0] = 1
    return ids, mask


def _int16_round_trip(x: np.ndarray) -> np.ndarray:
    """laion_clap.training.data.float32_to_int16 / int16_to_float32 (copied: that module
    loads tokenizers from the hub at import)."""
    q = (np.clip(x, a_min=-1.0, a_max=1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


# ---------------------------------------------------------------------- providers
def audio_fn(provider: str, batch: int):
    """A callable () -> (batch, 512) L2-normalised CPU embeddings."""
    x = audio_batch(batch)
    if provider in ("clap_fast", "clap_fast_compiled", "clap_fast_bf16"):
        model = cf_compiled() if provider == "clap_fast_compiled" else cf_model()
        amp = torch.bfloat16 if provider == "clap_fast_bf16" else None
        return lambda: model.embed_audio(x, SR, batch_size=batch, autocast=amp, engine="eager")
    if provider == "laion_clap":
        model = laion_model()

        def laion() -> torch.Tensor:  # hook.CLAP_Module.get_audio_embedding_from_data
            clips = [
                {
                    "waveform": torch.from_numpy(_int16_round_trip(w)).float(),
                    "longer": torch.tensor([False]),
                }
                for w in x
            ]
            with torch.no_grad():
                return model.get_audio_embedding(clips).cpu()

        return laion
    if provider == "transformers":
        model = hf_model()
        fe = transformers.ClapFeatureExtractor(
            frequency_min=50, frequency_max=14000, truncation="rand_trunc", padding="repeatpad"
        )

        def hf() -> torch.Tensor:
            # ClapFeatureExtractor has no int16 round trip: apply LAION's, as its users must.
            inputs = fe(list(_int16_round_trip(x)), sampling_rate=SR, return_tensors="pt")
            with torch.inference_mode():
                out = model.get_audio_features(**{k: v.to(DEVICE) for k, v in inputs.items()})
            return F.normalize(_tensor(out), dim=-1).cpu()

        return hf
    raise ValueError(provider)


def text_fn(provider: str, batch: int):
    ids, mask = text_batch(batch)
    if provider in ("clap_fast", "clap_fast_compiled", "clap_fast_bf16"):
        model = cf_compiled() if provider == "clap_fast_compiled" else cf_model()
        if provider == "clap_fast_bf16":
            return lambda: _autocast(
                lambda: model.embed_text_tokens(ids, mask, batch_size=batch, engine="eager")
            )
        return lambda: model.embed_text_tokens(ids, mask, batch_size=batch, engine="eager")
    if provider == "laion_clap":
        model = laion_model()

        def laion() -> torch.Tensor:  # hook.CLAP_Module.get_text_embedding after tokenizing
            with torch.no_grad():
                return model.get_text_embedding(
                    {"input_ids": ids.clone(), "attention_mask": mask.clone()}
                ).cpu()

        return laion
    if provider == "transformers":
        model = hf_model()

        def hf() -> torch.Tensor:
            with torch.inference_mode():
                out = model.get_text_features(
                    input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)
                )
            return F.normalize(_tensor(out), dim=-1).cpu()

        return hf
    raise ValueError(provider)


def _autocast(fn):
    with torch.autocast("cuda" if HAS_CUDA else "cpu", dtype=torch.bfloat16):
        return fn()


def _tensor(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or a model output (some 5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


# --------------------------------------------------------------------- agreement
_outputs: dict[tuple[str, int, str], torch.Tensor] = {}


def _reference(kind: str, batch: int) -> tuple[str, torch.Tensor]:
    """The reference embeddings (laion_clap's, else transformers'), computed once."""
    for provider in REFERENCE_ORDER:
        key = (kind, batch, provider)
        if key not in _outputs:
            try:
                fn = (audio_fn if kind == "audio" else text_fn)(provider, batch)
            except pytest.skip.Exception:
                continue
            _outputs[key] = fn()
        return provider, _outputs[key]
    pytest.skip("no reference implementation available")


def _agreement(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.float(), want.float()
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "min_cosine": float(F.cosine_similarity(got, want, dim=-1).min()),
    }


# -------------------------------------------------------------------------- tests
def _cases(batches: list[int]) -> list[tuple[int, str]]:
    cases = [(b, p) for b in batches for p in PROVIDERS]  # laion_clap first: the reference
    return largest_last(cases, lambda case: case[0] == batches[-1])


def _run(benchmark, request, kind: str, batch: int, provider: str) -> None:
    smallest = (AUDIO_BATCHES if kind == "audio" else TEXT_BATCHES)[0]
    if request.config.getoption("benchmark_disable", False) and batch != smallest:
        pytest.skip("smoke run (--benchmark-disable): smallest batch only")
    if provider == "clap_fast_compiled" and not COMPILE:
        pytest.skip("torch.compile on the CPU takes minutes on 2 cores (CLAP_BENCH_COMPILE=1)")
    if (
        provider == "clap_fast_compiled"
        and batch != (AUDIO_BATCHES if kind == "audio" else TEXT_BATCHES)[-1]
    ):
        pytest.skip("compiled at the largest batch only (each static shape compiles anew)")
    fn = (audio_fn if kind == "audio" else text_fn)(provider, batch)
    ref_name, ref = _reference(kind, batch)
    peak = None
    if HAS_CUDA:
        fn()  # warm-up (compile) before measuring memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    # transformers' feature extractor runs in NumPy on the host: few rounds keep the GPU run short
    rounds = 3 if HAS_CUDA and kind == "audio" and provider == "transformers" else ROUNDS
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0 if HAS_CUDA else 1)
    _outputs[(kind, batch, provider)] = out
    agree = {} if provider == ref_name else {ref_name: _agreement(out, ref)}
    other = "transformers" if ref_name == "laion_clap" else None
    if provider.startswith("clap_fast") and other and (kind, batch, other) in _outputs:
        agree[other] = _agreement(out, _outputs[(kind, batch, other)])
    info = dict(
        kind=kind,
        provider=provider,
        role=ROLE.get(provider, "baseline"),
        batch=batch,
        items=batch,
        item_unit="clips" if kind == "audio" else "texts",
        dtype="bf16-autocast" if provider.endswith("bf16") else "fp32",
        device=DEVICE,
        reference=ref_name,
        agreement=agree,
        peak_mem_mib=None if peak is None else round(peak, 1),
        input="10 s clips, 48 kHz (HTSAT-tiny)"
        if kind == "audio"
        else f"{TOKENS} token ids (RoBERTa-base)",
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        sec = stats.stats.median
        info[f"{info['item_unit']}_per_s"] = round(batch / sec, 3)
        if kind == "audio":
            info["audio_hours_per_s"] = round(batch * CLIP / SR / 3600 / sec, 5)
    benchmark.extra_info.update(info)
    assert out.shape == (batch, 512)
    if provider != ref_name and not provider.endswith("bf16"):
        a = agree[ref_name]
        assert a["max_abs_diff"] <= ATOL and a["min_cosine"] >= 1 - ATOL, (provider, ref_name, a)


@pytest.mark.parametrize(("batch", "provider"), _cases(AUDIO_BATCHES))
def test_embed_audio(benchmark, request, batch: int, provider: str) -> None:
    benchmark.group = f"embed_audio-b{batch}"
    _run(benchmark, request, "audio", batch, provider)


@pytest.mark.parametrize(("batch", "provider"), _cases(TEXT_BATCHES))
def test_embed_text(benchmark, request, batch: int, provider: str) -> None:
    benchmark.group = f"embed_text-b{batch}"
    _run(benchmark, request, "text", batch, provider)
