"""The built-in synthetic sound set: deterministic, captioned, 48 kHz mono sounds.

Eight classes (``CLASSES``) chosen to differ in ways a log-mel front end sees at once:

=============  =====================================================  ==========================
class          sound                                                  attributes
=============  =====================================================  ==========================
tone           a steady sine                                          pitch, loudness
white_noise    flat-spectrum noise                                    loudness
pink_noise     1/f power noise                                        loudness
brown_noise    1/f² power noise (a rumble)                            loudness
chirp_up       repeated log sweeps over two octaves, rising           pitch, loudness
chirp_down     the same, falling                                      pitch, loudness
beeps          short sine bursts (80–200 ms)                          pitch, loudness, rhythm
clicks         2–5 ms decaying noise clicks                           loudness, rhythm
=============  =====================================================  ==========================

Pitch bands: low 100–250 Hz, mid 400–900 Hz, high 1.5–4 kHz (sweeps: low 100→400, mid
400→1600, high 1500→6000 Hz). Loudness is the peak level: quiet 0.03–0.08, loud 0.5–0.9.
Rhythm: ``steady`` for continuous sounds, ``slow`` or ``fast`` pulses for beeps and clicks.
Durations are drawn from 1–12 s (about 1 in 6 clips is longer than 10 s, which exercises the
long-audio policy) unless ``duration`` fixes them. Every clip carries five captions and tags
``[class, pitch?, loudness, rhythm]``; ``CLASS_NAMES`` gives the words to put in a zero-shot
prompt ("This is a sound of {}.").

Clip ``index`` of ``split`` under ``seed`` comes from its own ``numpy`` generator seeded with
``(seed, crc32(split), index)``: a clip does not depend on which other clips are generated, and
the same arguments give the same samples and, once written, byte-identical tars.

On disk: :func:`write_webdataset` writes LAION's layout ``<root>/<name>/<split>/N.tar`` plus
``sizes.json``; :func:`write_folder` writes ``<root>/<class>/<file>.flac`` for zero-shot demos.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SAMPLE_RATE = 48000
CLASSES = (
    "tone",
    "white_noise",
    "pink_noise",
    "brown_noise",
    "chirp_up",
    "chirp_down",
    "beeps",
    "clicks",
)
CLASS_NAMES = {
    "tone": "a steady tone",
    "white_noise": "white noise",
    "pink_noise": "pink noise",
    "brown_noise": "brown noise",
    "chirp_up": "a rising chirp",
    "chirp_down": "a falling chirp",
    "beeps": "beeping",
    "clicks": "clicking",
}
"""Natural-language name of each class, for zero-shot prompts."""

DEFAULT_SPLITS = {"train": 256, "valid": 64, "test": 64}
NUM_CAPTIONS = 5
MIN_DURATION, MAX_DURATION = 1.0, 12.0

_PITCH_HZ = {"low": (100.0, 250.0), "mid": (400.0, 900.0), "high": (1500.0, 4000.0)}
_SWEEP_HZ = {"low": (100.0, 400.0), "mid": (400.0, 1600.0), "high": (1500.0, 6000.0)}
_PEAK = {"quiet": (0.03, 0.08), "loud": (0.5, 0.9)}
_PULSE_HZ = {
    "beeps": {"slow": (1.0, 2.0), "fast": (4.0, 6.0)},
    "clicks": {"slow": (2.0, 3.0), "fast": (10.0, 20.0)},
}
_PITCHED = {"tone", "chirp_up", "chirp_down", "beeps"}
_NOISE_FLOOR = 2e-4  # a few int16 steps: no digital silence between pulses
_MTIME = 946684800  # 2000-01-01: tar members carry a fixed time so tars are reproducible

_WORDS = {
    "low": ("low-pitched", "low", "deep"),
    "mid": ("mid-pitched", "medium-pitched", "moderately pitched"),
    "high": ("high-pitched", "high", "shrill"),
    "quiet": ("quiet", "soft", "faint"),
    "loud": ("loud", "strong", "intense"),
    "slow": ("slow", "leisurely"),
    "fast": ("fast", "rapid", "quick"),
}
_TEMPLATES = {
    "tone": (
        "a {pitch} steady tone",
        "a {loud} {pitch} sine tone",
        "a {loud} continuous tone",
        "a pure {pitch} tone that holds steady",
        "a {loud} unwavering {pitch} hum",
        "one {pitch} note sustained without change",
    ),
    "white_noise": (
        "a {loud} burst of white noise",
        "{loud} white noise",
        "a {loud} hiss of static",
        "bright broadband hissing noise",
        "a {loud} steady hiss like a detuned radio",
        "white noise, {loud} and constant",
    ),
    "pink_noise": (
        "{loud} pink noise",
        "a {loud} rush of pink noise",
        "a soft-edged {loud} noise like a waterfall",
        "a {loud} steady rushing sound",
        "pink noise, balanced and {loud}",
        "a {loud} noise like steady rain",
    ),
    "brown_noise": (
        "{loud} brown noise",
        "a {loud} low rumble of brown noise",
        "a deep {loud} rumbling noise",
        "a {loud} muffled roar",
        "brown noise rumbling like distant thunder",
        "a dark {loud} steady rumble",
    ),
    "chirp_up": (
        "a {loud} rising chirp",
        "a {pitch} chirp sweeping upward",
        "{loud} tones gliding up in pitch again and again",
        "a {pitch} upward sweep that repeats",
        "a {loud} {pitch} siren-like rising sweep",
        "repeated {pitch} chirps going up",
    ),
    "chirp_down": (
        "a {loud} falling chirp",
        "a {pitch} chirp sweeping downward",
        "{loud} tones gliding down in pitch again and again",
        "a {pitch} downward sweep that repeats",
        "a {loud} {pitch} descending sweep like a falling whistle",
        "repeated {pitch} chirps going down",
    ),
    "beeps": (
        "{rate} {pitch} beeps",
        "a {loud} {pitch} beep repeating at a {rate} pace",
        "a series of {loud} {rate} beeps",
        "short {pitch} beeps, {rate} and regular",
        "an electronic device beeping, {loud} and {rate}",
        "{loud} {pitch} tone bursts in a {rate} rhythm",
    ),
    "clicks": (
        "a {rate} train of clicks",
        "{loud} {rate} clicking",
        "a {loud} series of sharp clicks",
        "{rate} ticking like a clock",
        "{loud} clicks repeating at a {rate} rate",
        "a {rate} pulse train of {loud} clicks",
    ),
}


@dataclass
class SynthClip:
    """One generated sound and its text."""

    waveform: np.ndarray
    """(T,) float32 mono samples in [-1, 1]."""
    captions: list[str]
    """``NUM_CAPTIONS`` distinct captions."""
    tags: list[str]
    """``[label, pitch?, loudness, rhythm]`` (pitch only for pitched classes)."""
    label: str
    """The class, one of ``CLASSES``."""
    attributes: dict = field(default_factory=dict)
    """Everything that determined the sound (frequencies, rates, duration, seed, index)."""


def _rng(index: int, seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float], log: bool = False) -> float:
    lo, hi = lo_hi
    if log:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return float(rng.uniform(lo, hi))


def _fade(n: int, sr: int, seconds: float) -> np.ndarray:
    """(n,) raised-cosine ramp-in/ramp-out envelope."""
    env = np.ones(n)
    k = min(int(seconds * sr), n // 2)
    if k:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        env[:k], env[n - k :] = ramp, ramp[::-1]
    return env


def _colored_noise(rng: np.random.Generator, n: int, sr: int, exponent: float) -> np.ndarray:
    """Noise with power ∝ f^-exponent (0 white, 1 pink, 2 brown), shaped in the FFT domain."""
    white = rng.standard_normal(n)
    if exponent == 0:
        return white
    spec = np.fft.rfft(white)
    f = np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0)  # flat below 20 Hz: no DC drift
    return np.fft.irfft(spec * f ** (-exponent / 2), n)


def _pulses(n: int, sr: int, rate: float, offset: float, burst: np.ndarray) -> np.ndarray:
    """Place ``burst`` every 1/rate s from ``offset`` s on."""
    out = np.zeros(n)
    for start in np.arange(offset, n / sr, 1 / rate):
        i = int(start * sr)
        piece = burst[: n - i]
        out[i : i + piece.size] += piece
    return out


def _synthesize(label: str, a: dict, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    if label == "tone":
        return np.sin(2 * np.pi * a["frequency_hz"] * t + rng.uniform(0, 2 * np.pi))
    if label.endswith("_noise"):
        exponent = {"white_noise": 0, "pink_noise": 1, "brown_noise": 2}[label]
        return _colored_noise(rng, n, sr, exponent)
    if label.startswith("chirp"):
        f0, f1 = a["start_hz"], a["end_hz"]
        period = a["sweep_seconds"]
        m = max(1, int(period * sr))
        tau = np.arange(m) / sr
        k = np.log(f1 / f0) / period
        sweep = np.sin(2 * np.pi * f0 * np.expm1(k * tau) / k) * _fade(m, sr, 0.01)
        return np.tile(sweep, -(-n // m))[:n]
    if label == "beeps":
        m = int(a["burst_seconds"] * sr)
        burst = np.sin(2 * np.pi * a["frequency_hz"] * np.arange(m) / sr) * _fade(m, sr, 0.005)
        return _pulses(n, sr, a["rate_hz"], a["offset_seconds"], burst)
    m = int(a["burst_seconds"] * sr)  # clicks: exponentially decaying noise
    burst = rng.standard_normal(m) * np.exp(-np.arange(m) / (0.2 * m))
    return _pulses(n, sr, a["rate_hz"], a["offset_seconds"], burst)


def _attributes(label: str, rng: np.random.Generator, duration: float) -> dict:
    a: dict = {"duration_seconds": duration, "loudness": str(rng.choice(list(_PEAK)))}
    a["peak"] = _uniform(rng, _PEAK[a["loudness"]])
    if label in _PITCHED:
        a["pitch"] = str(rng.choice(list(_PITCH_HZ)))
    if label in ("tone", "beeps"):
        a["frequency_hz"] = _uniform(rng, _PITCH_HZ[a["pitch"]], log=True)
    if label.startswith("chirp"):
        lo, hi = _SWEEP_HZ[a["pitch"]]
        a["start_hz"], a["end_hz"] = (lo, hi) if label == "chirp_up" else (hi, lo)
        a["sweep_seconds"] = min(_uniform(rng, (0.5, 1.5)), duration)
    if label in _PULSE_HZ:
        a["rhythm"] = str(rng.choice(["slow", "fast"]))
        a["rate_hz"] = _uniform(rng, _PULSE_HZ[label][a["rhythm"]])
        a["burst_seconds"] = _uniform(rng, (0.08, 0.2) if label == "beeps" else (0.002, 0.005))
        a["burst_seconds"] = min(a["burst_seconds"], 0.5 / a["rate_hz"])
        a["offset_seconds"] = _uniform(rng, (0.0, min(1 / a["rate_hz"], duration / 2)))
    else:
        a["rhythm"] = "steady"
    return a


def _captions(label: str, a: dict, rng: np.random.Generator) -> list[str]:
    templates = _TEMPLATES[label]
    chosen = rng.permutation(len(templates))[:NUM_CAPTIONS]
    out = []
    slots = {"pitch": a.get("pitch"), "loud": a["loudness"], "rate": a["rhythm"]}
    for i in chosen:
        words = {k: str(rng.choice(_WORDS[v])) for k, v in slots.items() if v in _WORDS}
        text = templates[i].format(**words)
        out.append(re.sub(r"\ba ([aeiou])", r"an \1", text))
    return out


def generate_clip(
    index: int,
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
    duration: float | None = None,
    split: str = "",
) -> SynthClip:
    """Generate clip ``index`` of the synthetic set.

    Args:
        index: clip number ≥ 0; the class is ``CLASSES[index % len(CLASSES)]`` (balanced).
        seed: base seed of the set.
        sample_rate: output rate in Hz (the sounds stay below 6.5 kHz, so any rate ≥ 16 kHz
            holds them).
        duration: seconds; ``None`` draws it from [1, 12].
        split: a namespace, so that e.g. "train" and "valid" hold different clips.

    Returns:
        A :class:`SynthClip`; ``waveform`` is (round(duration · sample_rate),) float32.
    """
    if index < 0:
        raise ValueError(f"index must be ≥ 0, got {index}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    rng = _rng(index, seed, split)
    label = CLASSES[index % len(CLASSES)]
    drawn = round(_uniform(rng, (MIN_DURATION, MAX_DURATION)), 2)
    seconds = float(duration) if duration is not None else drawn
    n = max(1, round(seconds * sample_rate))
    a = _attributes(label, rng, seconds)
    x = _synthesize(label, a, rng, n, sample_rate) * _fade(n, sample_rate, 0.01)
    x *= a["peak"] / max(float(np.abs(x).max()), 1e-12)
    x += _NOISE_FLOOR * rng.standard_normal(n)
    a.update(index=index, seed=seed, split=split, sample_rate=sample_rate, label=label)
    tags = [label] + ([a["pitch"]] if "pitch" in a else []) + [a["loudness"], a["rhythm"]]
    return SynthClip(
        waveform=np.clip(x, -1.0, 1.0).astype(np.float32),
        captions=_captions(label, a, rng),
        tags=tags,
        label=label,
        attributes=a,
    )


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """(T,) float waveform → FLAC bytes (16-bit PCM, mono); deterministic."""
    import soundfile as sf  # here, not at module level: the GPU image has no soundfile

    buf = io.BytesIO()
    sf.write(buf, waveform, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    root: str | Path,
    name: str = "synth",
    splits: dict[str, int] | None = None,
    shard_size: int = 64,
    seed: int = 0,
    duration: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    progress: bool = True,
) -> dict[str, dict]:
    """Write the set in LAION's webdataset layout.

    Files: ``<root>/<name>/<split>/0.tar, 1.tar, …`` and ``<root>/<name>/<split>/sizes.json``
    (``{"0.tar": count, …}``). Sample ``k`` of a split is stored under the key
    ``<split>_<k:06d>`` as ``<key>.flac`` (16-bit FLAC, mono) and ``<key>.json``
    (``{"text": [5 captions], "tag": [...], "original_data": {attributes}}``). The same
    arguments give byte-identical tars.

    Args:
        root: output directory (created).
        name: dataset name, the directory under ``root``.
        splits: samples per split; default ``DEFAULT_SPLITS`` (train 256, valid 64, test 64).
        shard_size: samples per tar.
        seed, duration, sample_rate: passed to :func:`generate_clip`.
        progress: show a progress bar (on a terminal).

    Returns:
        ``{split: {"dir": str, "shards": [tar paths], "pattern": brace pattern of the shards,
        "num_samples": int}}``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    out: dict[str, dict] = {}
    bar = tqdm(total=sum(splits.values()), desc=f"synth {name}", disable=None if progress else True)
    for split, count in splits.items():
        split_dir = Path(root) / name / split
        split_dir.mkdir(parents=True, exist_ok=True)
        sizes, shards = {}, []
        for shard, start in enumerate(range(0, count, shard_size)):
            path = split_dir / f"{shard}.tar"
            members = range(start, min(start + shard_size, count))
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                for k in members:
                    clip = generate_clip(k, seed, sample_rate, duration, split)
                    meta = {"text": clip.captions, "tag": clip.tags}
                    meta["original_data"] = clip.attributes
                    key = f"{split}_{k:06d}"
                    _add_member(tar, f"{key}.flac", encode_flac(clip.waveform, sample_rate))
                    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                    bar.update()
            sizes[path.name] = len(members)
            shards.append(str(path))
        (split_dir / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
        pattern = str(split_dir / f"{{0..{len(shards) - 1}}}.tar") if shards else ""
        out[split] = {
            "dir": str(split_dir),
            "shards": shards,
            "pattern": pattern,
            "num_samples": count,
        }
        log.info("wrote %d %s samples in %d shards to %s", count, split, len(shards), split_dir)
    bar.close()
    return out


def write_folder(
    root: str | Path,
    n: int,
    seed: int = 0,
    duration: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    audio_format: str = "flac",
    split: str = "folder",
) -> list[Path]:
    """Write ``n`` clips as plain files in class-named folders for zero-shot demos.

    Layout: ``<root>/<class>/<class>_<i:05d>.<ext>``; the folder name is the label
    (one of ``CLASSES``; ``CLASS_NAMES`` maps it to prompt words).

    Args:
        root: output directory (created).
        n: number of clips; classes are balanced (clip i has class ``CLASSES[i % 8]``).
        seed, duration, sample_rate, split: passed to :func:`generate_clip`.
        audio_format: ``"flac"`` or ``"wav"`` (16-bit PCM either way).

    Returns:
        The written paths, in clip order.
    """
    if audio_format not in ("flac", "wav"):
        raise ValueError(f"audio_format must be 'flac' or 'wav', got {audio_format!r}")
    import soundfile as sf  # here, not at module level: the GPU image has no soundfile

    paths = []
    for i in range(n):
        clip = generate_clip(i, seed, sample_rate, duration, split)
        path = Path(root) / clip.label / f"{clip.label}_{i:05d}.{audio_format}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, clip.waveform, sample_rate, format=audio_format.upper(), subtype="PCM_16")
        paths.append(path)
    log.info("wrote %d clips to %s", n, root)
    return paths
