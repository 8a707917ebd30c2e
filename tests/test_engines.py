"""Inference engines (clap_fast.engines): auto's rules, validation, and each engine's fidelity
to fp32 eager on tiny models (exported engines export once per test module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clap_fast import engine_runtimes, engines
from clap_fast.cli import main
from clap_fast.engines import INT8_MIN_COSINE, CpuInfo, auto_engine
from clap_fast.synth import generate_clip
from tests.helpers import randomize_bn, signals, small_model

sf = pytest.importorskip("soundfile")  # not on the GPU image

pytest.importorskip("onnxruntime")

AVX2 = CpuInfo("test avx2", frozenset({"avx2", "fma"}), "AVX2")
BF16 = CpuInfo("test bf16", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), "AVX512")
AMX = CpuInfo("test amx", frozenset({"avx2", "amx_bf16", "amx_int8"}), "AVX512")
CPU = torch.device("cpu")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(engines.ENV, raising=False)


@pytest.fixture(scope="module")
def model():
    m = small_model()
    randomize_bn(m)
    return m


@pytest.fixture(scope="module")
def synth_clips() -> list[np.ndarray]:
    """Built-in sound set: one clip per class, 3–12 s (two longer than 10 s: sliding windows)."""
    return [generate_clip(i, seed=3, split="engines").waveform for i in range(8)]


@pytest.fixture(scope="module")
def tokens(model):
    from export.encoders import sample_tokens

    return sample_tokens(model, 5, seed=1)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


# ----------------------------------------------------------------------------- auto's rules
@pytest.mark.parametrize(
    ("info", "device", "autocast", "tower", "want"),
    [
        (BF16, CPU, None, "audio", "bf16"),
        (BF16, CPU, None, "text", "bf16"),
        (AMX, CPU, None, "audio", "bf16"),
        (AVX2, CPU, None, "audio", "eager"),
        (CpuInfo("no /proc/cpuinfo"), CPU, None, "audio", "eager"),
        (BF16, CPU, torch.float16, "audio", "eager"),
        (BF16, torch.device("cuda"), None, "audio", "eager"),
    ],
)
def test_auto_rules(no_env, info, device, autocast, tower, want):
    engine, reason = auto_engine(device, autocast=autocast, info=info, tower=tower)
    assert engine == want and reason


@pytest.mark.parametrize(
    ("info", "clips", "built", "want"),
    [
        (BF16, None, False, "bf16"),
        (BF16, engines.AUTO_INT8_CLIPS["bf16"] - 1, False, "bf16"),
        (BF16, engines.AUTO_INT8_CLIPS["bf16"], False, "int8_compile"),
        (AMX, 10**6, False, "int8_compile"),
        (AVX2, engines.AUTO_INT8_CLIPS["eager"] - 1, False, "eager"),
        (AVX2, engines.AUTO_INT8_CLIPS["eager"], False, "int8_compile"),
        (BF16, 1, True, "int8_compile"),
        (AVX2, None, True, "int8_compile"),
        (CpuInfo("no /proc/cpuinfo"), 10**6, True, "eager"),  # not known to be x86
    ],
)
def test_auto_picks_int8_compile_where_its_build_pays_back(
    no_env, monkeypatch, info, clips, built, want
):
    """Audio jobs of AUTO_INT8_CLIPS clips or more (or a model that has it built already) get
    int8_compile on x86 with torchao; never the text tower, never without torchao."""
    monkeypatch.setattr(engines, "torchao_available", lambda: True)
    engine, reason = auto_engine(CPU, info=info, clips=clips, built=built)
    assert engine == want and reason
    assert auto_engine(CPU, info=info, clips=clips, built=built, tower="text")[0] != "int8_compile"
    assert auto_engine(CPU, info=info, clips=clips, autocast=torch.bfloat16)[0] == "eager"
    monkeypatch.setattr(engines, "torchao_available", lambda: False)
    assert auto_engine(CPU, info=info, clips=clips, built=built)[0] != "int8_compile"


def test_auto_counts_the_clips_of_the_whole_job(no_env, monkeypatch, tmp_path):
    """embed_audio decides on its clips, embed_audio_files on all its files (not per batch), and
    a built int8_compile is kept for later calls of any size."""
    m = small_model()
    built = []

    def build(model, engine, tower):
        built.append(engine)
        return model.encode_audio

    monkeypatch.setattr(engines, "torchao_available", lambda: True)
    monkeypatch.setattr(engines, "cpu_info", lambda: BF16)
    monkeypatch.setattr(engines, "AUTO_INT8_CLIPS", {"bf16": 3, "eager": 3})
    monkeypatch.setattr(engine_runtimes, "build", build)
    assert engines.select(m, "auto", "audio", clips=2).engine == "bf16"
    m.embed_audio(signals(2, 48000), engine="auto")
    assert built == []
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav", signals(1, 48000, seed=i)[0].numpy(), 48000)
    files = sorted(tmp_path.glob("*.wav"))
    m.embed_audio_files(files, batch_size=2, engine="auto", progress=False)
    assert built == ["int8_compile"]  # 3 files in batches of 2: the job counts
    assert engines.select(m, "auto", "audio", clips=1).engine == "int8_compile"
    assert engines.select(m, "auto", "text").engine == "bf16"
    assert built == ["int8_compile"]


@pytest.mark.parametrize(
    ("env", "value", "bf16"),
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", False),
        ("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni", False),
        ("DNNL_MAX_CPU_ISA", "AVX512_CORE", False),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
        ("ONEDNN_MAX_CPU_ISA", "ALL", True),
        ("ATEN_CPU_CAPABILITY", "avx2", False),
        ("ATEN_CPU_CAPABILITY", "default", False),
    ],
)
def test_auto_respects_isa_limits(no_env, monkeypatch, env, value, bf16):
    """The AVX2 simulation of issue 21 (oneDNN / ATen limited on a bf16 CPU): bf16 would be
    emulated, so auto must not pick it; limits at or above AVX512_CORE_BF16 keep it."""
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(env, value)
    flags = BF16.flags  # the CPU has the units; only the limit differs
    cap = value.upper() if env == "ATEN_CPU_CAPABILITY" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    monkeypatch.setattr(engines, "_read_proc_cpuinfo", lambda: ("test cpu", flags))
    engines.cpu_info.cache_clear()
    try:
        info = engines.cpu_info()
        assert info.flags == flags and info.bf16_units is bf16
        engine, reason = auto_engine(CPU, tower="audio")
        assert engine == ("bf16" if bf16 else "eager"), reason
        assert auto_engine(CPU, tower="text")[0] == engine
        if env != "ATEN_CPU_CAPABILITY":
            assert value.upper() in info.isa()  # the limit is in the logged reason
    finally:
        engines.cpu_info.cache_clear()


@pytest.mark.parametrize(
    "flags, isa, want",
    [
        ({"avx2", "avx512_vnni"}, "", True),
        ({"avx2", "avx512_vnni"}, "AVX512_CORE_VNNI", True),
        ({"avx2", "avx512_vnni"}, "AVX2", False),  # the AVX2 simulation: no VNNI for oneDNN
        ({"avx2", "avx512_vnni"}, "AVX512_CORE", False),
        ({"avx2", "avx_vnni"}, "AVX2_VNNI", True),
        ({"avx2", "fma"}, "", False),
    ],
)
def test_int8_dot_respects_the_onednn_isa_limit(flags, isa, want):
    """int8 engines quantise with reduced range where oneDNN has no VNNI / AMX int8 dot."""
    assert CpuInfo("test", frozenset(flags), "AVX2", isa).int8_dot is want


def test_auto_env_override(monkeypatch):
    monkeypatch.setenv(engines.ENV, "int8")
    assert auto_engine(CPU, info=BF16)[0] == "int8"
    monkeypatch.setenv(engines.ENV, "fast")
    with pytest.raises(ValueError, match="CLAP_FAST_ENGINE"):
        auto_engine(CPU, info=BF16)


def test_cpu_info_reads_this_machine():
    info = engines.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.bf16_units == any(f in info.flags for f in ("avx512_bf16", "amx_bf16"))


def test_select_validates(model):
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.select(model, "tensorrt", "audio")
    with pytest.raises(ValueError, match="normalize=True"):
        engines.select(model, "int8", "audio", normalize=False)
    with pytest.raises(ValueError, match="autocast"):
        engines.select(model, "bf16", "audio", autocast=torch.bfloat16)
    with pytest.raises(ValueError, match="engine must be one of"):
        model.embed_audio(signals(1, 48000), engine="fast")


def test_default_is_fp32_eager_and_auto_is_opt_in(no_env, model, caplog, monkeypatch):
    """No engine given: fp32 eager (LAION's numbers on every CPU); auto when asked, by argument
    or by CLAP_FAST_ENGINE=auto, and it says what it picked and why."""
    x = signals(2, 96000)
    assert engines.select(model, None, "audio").engine == "eager"
    want = auto_engine(CPU)[0]
    with caplog.at_level("INFO", logger="clap_fast.engines"):
        got = model.embed_audio(x, engine="auto")
    assert f"audio engine: {want}" in caplog.text  # auto says what it picked and why
    torch.testing.assert_close(got, model.embed_audio(x, engine=want), rtol=0, atol=0)
    monkeypatch.setenv("CLAP_FAST_ENGINE", "auto")
    assert engines.select(model, None, "audio").engine == want
    # normalize=False never lands on an exported engine (they return normalised rows)
    assert engines.select(model, "auto", "audio", normalize=False).engine in ("eager", "bf16")
    monkeypatch.setattr(engines, "auto_engine", lambda *a, **k: ("openvino_bf16", "test"))
    assert engines.select(model, "auto", "audio", normalize=False).engine == "bf16"


# ------------------------------------------------------------------------------ fidelity
def test_bf16_engine(model, synth_clips, tokens):
    ref = model.embed_audio(synth_clips, engine="eager")
    assert _min_cos(model.embed_audio(synth_clips, engine="bf16"), ref) >= 0.999
    ids, mask = tokens
    t_ref = model.embed_text_tokens(ids, mask, engine="eager")
    assert _min_cos(model.embed_text_tokens(ids, mask, engine="bf16"), t_ref) >= 0.999


def test_bf16_runs_the_cpu_audio_tower_in_chunks(model, monkeypatch):
    """On the CPU the bf16 engine calls the audio tower on MICRO_BATCH rows at a time (smaller
    intermediates) and gives the rows of one whole-batch call under bf16 autocast."""
    x = signals(5, 48000)
    want = model.embed_audio(x, engine="eager", autocast=torch.bfloat16, batch_size=5)
    seen = []
    real = model.encode_audio

    def spy(*args, **kwargs):
        seen.append(next(t for t in (*args, *kwargs.values()) if t is not None).shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "encode_audio", spy)
    got = model.embed_audio(x, engine="bf16", batch_size=5)
    assert seen == [2, 2, 1]
    assert _min_cos(got, want) >= 0.99999


def test_int8_engine_fidelity_on_the_sound_set(model, synth_clips, tokens):
    """int8 audio embeddings of the built-in sound set within INT8_MIN_COSINE of fp32."""
    ref = model.embed_audio(synth_clips, engine="eager", batch_size=4)
    got = model.embed_audio(synth_clips, engine="int8", batch_size=4)
    assert got.shape == ref.shape
    assert _min_cos(got, ref) >= INT8_MIN_COSINE
    assert not torch.equal(got, ref)  # it did run a quantised graph
    ids, mask = tokens
    t_ref = model.embed_text_tokens(ids, mask, engine="eager")
    assert _min_cos(model.embed_text_tokens(ids, mask, engine="int8"), t_ref) >= INT8_MIN_COSINE


def test_int8_quantises_only_linear_layers(model, tmp_path):
    from export.onnx import export_tower

    path = export_tower(model, "audio", tmp_path, verify_batches=(1,)).path
    nodes = engine_runtimes.int8_nodes(path)
    linear = sum(
        isinstance(m, torch.nn.Linear)
        for part in (model.audio_branch.layers, model.audio_projection)
        for m in part.modules()
    )
    assert len(nodes) == linear
    assert not any(n.startswith(engine_runtimes.FRONT_END_SCOPE) for n in nodes)
    assert not any(n.endswith("attn/MatMul") or n.endswith("attn/MatMul_1") for n in nodes)
    keep = engine_runtimes.KEEP_FP32_SCHEMES["keep_ends"]
    kept = set(nodes) - set(engine_runtimes.int8_nodes(path, keep))
    last = len(model.audio_branch.layers) - 1
    assert last == 3 and kept  # the scheme names HTSAT's fourth stage
    assert all(f"/layers.{last}/" in n or "/audio_projection/" in n for n in kept)
    assert sum("/audio_projection/" in n for n in kept) == sum(
        isinstance(m, torch.nn.Linear) for m in model.audio_projection.modules()
    )


def test_onnx_engine_is_exact_cached_and_rebuilt_on_new_weights(model, synth_clips):
    clips = synth_clips[:3]
    ref = model.embed_audio(clips, engine="eager")
    got = model.embed_audio(clips, engine="onnx")
    assert _min_cos(got, ref) >= 0.99999
    built = engines._BUILT[model][("onnx", "audio")]
    model.embed_audio(clips[:1], engine="onnx")
    assert engines._BUILT[model][("onnx", "audio")] is built  # no second export
    model.train()
    try:
        with torch.no_grad():
            model.audio_projection[0].weight.mul_(-1.0)  # in place: the version counter moves
        again = model.embed_audio(clips, engine="onnx")
        assert engines._BUILT[model][("onnx", "audio")] is not built
        assert model.training and model.audio_branch.training  # modes given back
        assert _min_cos(again, ref) < 0.999  # the new weights are the ones that ran
        model.eval()
        assert _min_cos(again, model.embed_audio(clips, engine="eager")) >= 0.99999
    finally:
        with torch.no_grad():
            model.audio_projection[0].weight.mul_(-1.0)
        model.eval()


def test_openvino_engine(model, synth_clips, tokens):
    pytest.importorskip("openvino")
    clips = synth_clips[:2]
    ref = model.embed_audio(clips, engine="eager")
    assert _min_cos(model.embed_audio(clips, engine="openvino"), ref) >= 0.99999
    ids, mask = tokens
    t_ref = model.embed_text_tokens(ids, mask, engine="eager")
    assert _min_cos(model.embed_text_tokens(ids, mask, engine="openvino"), t_ref) >= 0.99999


def test_openvino_bf16_engine(model, synth_clips):
    """bf16 inference precision: close to fp32 on this random-weight model (auto's bound; a
    trained HTSAT-mini measured far worse, see bench/results/int8_fidelity_*), and not the f32
    graph's output."""
    pytest.importorskip("openvino")
    clips = synth_clips[:3]
    ref = model.embed_audio(clips, engine="eager")
    f32 = model.embed_audio(clips, engine="openvino")
    got = model.embed_audio(clips, engine="openvino_bf16")
    assert got.shape == ref.shape
    assert _min_cos(got, ref) >= engines.AUTO_MIN_COSINE
    ov = pytest.importorskip("openvino")
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert not torch.equal(got, f32)  # it did run at bf16 (elsewhere OpenVINO runs f32)
    with pytest.raises(ValueError, match="precision"):
        engine_runtimes.OpenVinoRunner("unused.onnx", precision="int4")


def test_int8_compile_quantises_the_linear_layers(model, synth_clips):
    """quantise_audio_int8: every linear layer of the audio tower (Swin blocks, patch merging,
    projection) gets int8 weights and a calibrated uint8 input; the patch-embedding convolution
    and the front end stay fp32. Run eagerly (simulated int8) it stays within INT8_MIN_COSINE
    of fp32 on the built-in sound set, and the mel entry point equals the waveform one."""
    pytest.importorskip("torchao")
    from clap_fast.audio import prepare_batch

    q = engine_runtimes.quantise_audio_int8(model)
    targets = [str(n.target) for n in q.graph.nodes if n.op == "call_function"]
    linear = sum(  # ``head`` (AudioSet classes) is not on the embedding path
        isinstance(m, torch.nn.Linear)
        for part in (model.audio_branch.layers, model.audio_projection)
        for m in part.modules()
    )
    weights = sum("dequantize_per_channel" in t for t in targets)
    assert weights == linear  # one int8 weight per linear layer, none for the convolution
    assert sum(t.startswith("quantized_decomposed.quantize_per_tensor") for t in targets) >= linear
    assert sum("conv2d" in t for t in targets) == 1  # the patch embedding, fp32
    wave = prepare_batch(
        [torch.from_numpy(c) for c in synth_clips], model.cfg.audio, fusion=False
    ).waveform
    with torch.no_grad():
        mel = model.audio_branch.log_mel(wave)
        ref = model.encode_audio(wave)
        torch.testing.assert_close(model.encode_audio(mel=mel), ref, rtol=0, atol=0)
        got = q(mel)
    assert _min_cos(got, ref) >= INT8_MIN_COSINE and not torch.equal(got, ref)


def test_int8_compile_quantises_fusion_and_pann_towers():
    """The same PT2E flow on a fusion HTS-AT (mel views + longer as inputs) and on a PANN tower
    (only its linear layers are quantised; convolutions stay fp32): close to fp32 eagerly."""
    pytest.importorskip("torchao")
    from clap_fast.audio import prepare_batch

    clips = [torch.from_numpy(generate_clip(i, seed=5, split="engines").waveform) for i in range(4)]
    for m in (small_model(enable_fusion=True), small_model("PANN-10")):
        randomize_bn(m)
        q = engine_runtimes.quantise_audio_int8(m)
        batch = prepare_batch(clips, m.cfg.audio, fusion=m.cfg.enable_fusion)
        with torch.no_grad():
            if m.cfg.enable_fusion:
                args = (batch.mel_fusion, batch.longer)
                ref = m.encode_audio(mel_fusion=args[0], longer=args[1])
            else:
                args = (m.audio_branch.log_mel(batch.waveform),)
                ref = m.encode_audio(batch.waveform)
            got = q(*args)
        assert _min_cos(got, ref) >= INT8_MIN_COSINE and not torch.equal(got, ref)


def test_int8_compile_runs_in_chunks(model):
    """The compiled int8 graph sees MICRO_BATCH rows per call (the front end runs per chunk
    too), a short last chunk padded and cut off again, a single row unpadded; rows come back in
    order."""
    seen = []

    def graph(mel: torch.Tensor) -> torch.Tensor:
        seen.append(mel.shape[0])
        return mel.flatten(1)[:, :3] * 2

    encode = engine_runtimes._after_front_end(model, graph, chunk=engine_runtimes.MICRO_BATCH)
    wave = torch.randn(5, model.cfg.audio.clip_samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.audio_branch.log_mel(wave).flatten(1)[:, :3] * 2
        torch.testing.assert_close(encode(wave), want)
        assert seen == [2, 2, 2]
        seen.clear()
        torch.testing.assert_close(encode(wave[3:4]), want[3:4])
    assert seen == [1]


@pytest.mark.slow
def test_int8_compile_engine(model, synth_clips, tokens):
    """The engine end to end: oneDNN int8 linear kernels run (profiler), fidelity within
    INT8_MIN_COSINE of fp32 eager on 3 clips of the sound set, one clip length each, in one
    batch of 3 (chunks of MICRO_BATCH = 2 rows, the last one padded: one compiled size); text
    unchanged (fp32 eager)."""
    pytest.importorskip("torchao")
    from torch.profiler import ProfilerActivity, profile

    seconds = model.cfg.audio.clip_samples / model.cfg.audio.sample_rate
    clips = [generate_clip(i, seed=4, split="engines", duration=seconds).waveform for i in range(3)]
    ref = model.embed_audio(clips, engine="eager", batch_size=3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = model.embed_audio(clips, engine="int8_compile", batch_size=3)
    assert any("qlinear" in e.key for e in prof.key_averages())
    assert _min_cos(got, ref) >= INT8_MIN_COSINE and not torch.equal(got, ref)
    assert engines.select(model, "auto", "audio", clips=1).engine == "int8_compile"  # built
    ids, mask = tokens
    torch.testing.assert_close(
        model.embed_text_tokens(ids, mask, engine="int8_compile"),
        model.embed_text_tokens(ids, mask, engine="eager"),
        rtol=0, atol=0,
    )  # fmt: skip


@pytest.mark.slow
def test_compile_engine_pads_batches(model, tokens):
    ids, mask = tokens  # 5 rows: padded to 8, one graph
    ref = model.embed_text_tokens(ids, mask, engine="eager")
    got = model.embed_text_tokens(ids, mask, engine="compile")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- CLI
def test_cli_engine_flag(tmp_path):
    model = small_model(text="transformer")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", signals(1, 48000)[0].numpy(), 48000)
    args = ["embed", str(tmp_path / "audio"), "--checkpoint", str(tmp_path / "ckpt")]
    assert main([*args, "--out", str(tmp_path / "e.npy"), "--engine", "bf16"]) == 0
    want = model.embed_audio_files([tmp_path / "audio" / "a.wav"], progress=False, engine="bf16")
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want.numpy(), atol=1e-6)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "f.npy"), "--engine", "fast"])


def test_openvino_bf16_falls_back_to_f32(tmp_path, monkeypatch, caplog):
    """Where OpenVINO cannot compile at bf16 (seen under ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU:
    no bf16 Softmax), the runner compiles at f32 and says so."""
    ov = pytest.importorskip("openvino")
    from onnx import TensorProto, helper, save

    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", info[:1], info[1:])
    path = tmp_path / "relu.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    real = ov.Core.compile_model

    def compile_model(self, model, device_name=None, config=None):
        if (config or {}).get("INFERENCE_PRECISION_HINT") == "bf16":
            raise RuntimeError("Supported primitive descriptors list is empty for node: Softmax")
        return real(self, model, device_name, config)

    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    with caplog.at_level("WARNING", logger="clap_fast.engine_runtimes"):
        runner = engine_runtimes.OpenVinoRunner(path, "bf16")
    assert runner.precision == "f32" and "f32 instead" in caplog.text
    out = runner.run({"x": np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)})
    assert out.tolist() == [[0.0, 2.0, 0.0, 4.0]]
