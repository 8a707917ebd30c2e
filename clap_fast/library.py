"""Embed an audio library: in one process, or on Ray Data across a cluster.

    embed_library(SOURCE, OUT, model)                  one process: decode threads + the model
    embed_library(SOURCE, OUT, model, ray_address="")  Ray Data: decode tasks (CPU) ->
                                                       embed actors (one per GPU, else CPU actors)

Both paths run the same two functions — ``decode_batch`` (decode, downmix, resample to the
model's rate, exactly as ``embed_audio_files``) and ``LibraryEmbedder`` (``model.embed_audio``
with the same fill and long-audio policies, then one Parquet shard per batch) — so they give the
same embeddings. Sources, the output layout and resumption are described in
``clap_fast.library_io``. Every item ends either in an embeddings shard or in a failures shard
with its reason; a rerun with the same ``OUT`` skips both (``retry_failed=True`` retries the
failures).

On Ray, an embed actor that dies is restarted by Ray Data and its batch retried; the retried
batch rewrites the same shard (shards are named by their items), so nothing is lost or doubled.
Decode tasks ask for 0.5 CPU; CPU embed actors for up to one CPU each, leaving one CPU of the
cluster to the decode tasks (or they would wait for the actors forever). When the two ask for the
same resources Ray Data fuses the decode into the actors (one process decodes and embeds). The
GPU actor path (``num_gpus=1`` per actor, ``device="cuda"``) has not been run here: no GPU was
available when it was written.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from clap_fast.library_io import LibraryStore, decode_item, list_library, model_fingerprint

__all__ = ["embed_library", "decode_batch", "LibraryEmbedder", "LibraryRun"]

log = logging.getLogger(__name__)


@dataclass
class LibraryRun:
    """What one ``embed_library`` call did."""

    total: int
    """Items in the source."""
    skipped: int
    """Items already embedded or failed in ``out`` by an earlier run."""
    embedded: int
    """Items embedded by this run."""
    failed: dict[str, str]
    """{item: reason} of the items this run could not decode or embed."""
    out: str


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def decode_batch(
    batch: dict[str, np.ndarray], sample_rate: int, pool: Executor | None = None
) -> dict[str, object]:
    """Decode a batch of items (a Ray Data map_batches function).

    Args:
        batch: {"path": (N,) str}.
        sample_rate: the model's rate; clips are resampled to it.
        pool: decode in these threads (the in-process path); None decodes in turn.

    Returns:
        {"path": (N,) str, "waveform": N float32 arrays (empty for a failure), "duration": (N,)
        float64 seconds, "sample_rate": (N,) int32 of the file, "error": (N,) str, "" when decoded}.
    """
    paths = [str(p) for p in batch["path"]]

    def one(item: str):
        try:
            return decode_item(item, sample_rate)
        except Exception as exc:  # every undecodable item is reported with its reason
            return f"{type(exc).__name__}: {exc}"

    results = list(pool.map(one, paths) if pool is not None else map(one, paths))
    ok = [not isinstance(r, str) for r in results]
    empty = np.zeros(0, np.float32)
    return {
        "path": np.array(paths, dtype=object),
        "waveform": [r[0] if good else empty for r, good in zip(results, ok)],
        "duration": np.array([r[1] if good else np.nan for r, good in zip(results, ok)]),
        "sample_rate": np.array([r[2] if good else 0 for r, good in zip(results, ok)], np.int32),
        "error": np.array(["" if good else r for r, good in zip(results, ok)], dtype=object),
    }


class LibraryEmbedder:
    """Embeds decoded batches and writes each as a shard (the Ray Data actor, and the in-process worker).

    Args:
        model: a CLAP model (in process), or ``(config, state_dict)`` / an object ref of it
            (each actor builds its own copy on ``device``).
        out: the output directory (path or fsspec URL).
        batch_size: clips per forward pass.
        embed_kwargs: ``long_audio`` / ``data_filling`` for ``embed_audio``.
        device: where an actor builds the model; "auto" = the GPU Ray assigned, else the CPU.
        crash_marker: testing hook: the first actor to finish a batch while this file does not
            exist creates it and kills its own process (SIGKILL) after writing the shard.
    """

    def __init__(
        self,
        model,
        out: str,
        *,
        batch_size: int = 32,
        embed_kwargs: dict | None = None,
        device: str = "auto",
        crash_marker: str | None = None,
    ) -> None:
        from clap_fast import ops
        from clap_fast.model import CLAP, no_init

        if not isinstance(model, CLAP):
            if not isinstance(model, tuple):  # a Ray object ref
                import ray

                model = ray.get(model)
            cfg, state = model
            with no_init():
                model = CLAP(cfg)
            model.load_state_dict(state)
            model = model.to(ops.resolve_device(device)).eval()
        self.model = model
        self.store = LibraryStore(out)
        self.batch_size = batch_size
        self.embed_kwargs = dict(embed_kwargs or {})
        self.crash_marker = crash_marker

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        sr = self.model.cfg.audio.sample_rate
        emb = self.model.embed_audio(clips, sr, batch_size=self.batch_size, **self.embed_kwargs)
        return emb.numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed and write one decoded batch; returns {"path", "error"} for accounting."""
        paths = [str(p) for p in batch["path"]]
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        dim = self.model.cfg.joint_embed_shape
        emb = np.zeros((len(ok), dim), np.float32)
        if ok:
            clips = [np.array(batch["waveform"][i], np.float32) for i in ok]  # writable copies
            try:
                emb = self._embed(clips)
            except ValueError:  # one bad clip must not sink the batch: find it
                for j, (i, clip) in enumerate(zip(ok, clips)):
                    try:
                        emb[j] = self._embed([clip])[0]
                    except ValueError as exc:
                        errors[i] = f"ValueError: {exc}"
        good = [j for j, i in enumerate(ok) if not errors[i]]
        rows = [ok[j] for j in good]
        self.store.write_batch(
            [paths[i] for i in rows],
            emb[good],
            np.asarray(batch["duration"])[rows],
            np.asarray(batch["sample_rate"])[rows],
            {paths[i]: errors[i] for i in range(len(paths)) if errors[i]},
        )
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object)}


def _run_local(todo, store, model, opts, num_workers) -> Iterator[dict]:
    embedder = LibraryEmbedder(model, store.url, **opts)
    sr = model.cfg.audio.sample_rate
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for chunk in _chunks(todo, opts["batch_size"]):
            decoded = decode_batch({"path": np.array(chunk, dtype=object)}, sr, pool)
            yield embedder(decoded)


def _run_ray(todo, store, model, opts, address, num_cpu_actors) -> Iterator[dict]:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address or None
        )  # None: $RAY_ADDRESS, a running local cluster, or a new one
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    bs = opts["batch_size"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = ray.put((model.cfg, state))  # one copy in the object store, fetched by each actor
    ds = ray.data.from_items(
        [{"path": p} for p in todo], override_num_blocks=max(1, min(-(-len(todo) // bs), 4096))
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=bs,
        fn_kwargs={"sample_rate": model.cfg.audio.sample_rate},
        num_cpus=0.5,
    )
    if gpus:  # unverified here (no GPU): one actor per GPU
        size, actor_res = gpus, {"num_gpus": 1, "num_cpus": 1}
    else:  # leave a CPU for the decode tasks, or they wait for the actors forever
        size = num_cpu_actors
        actor_res = {"num_cpus": max(0.25, min(1.0, (cpus - 1) / max(1, size)))}
    log.info(
        "Ray: %d items, %d %s embed actors, %.0f CPUs, %d GPUs",
        len(todo), size, "GPU" if gpus else "CPU", cpus, gpus,
    )  # fmt: skip
    ds = ds.map_batches(
        LibraryEmbedder,
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_args=(weights, store.url),
        fn_constructor_kwargs={**opts, "device": "cuda" if gpus else "cpu"},
        **actor_res,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def embed_library(
    source: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    model,
    *,
    ray_address: str | None = None,
    use_ray: bool | None = None,
    num_cpu_actors: int = 2,
    batch_size: int = 32,
    num_workers: int = 4,
    long_audio: str | None = None,
    data_filling: str = "repeatpad",
    retry_failed: bool = False,
    progress: bool = True,
    crash_marker: str | None = None,
) -> LibraryRun:
    """Embed every audio item of ``source`` into Parquet shards under ``out`` (resumable).

    Args:
        source: a folder, ``.tar``, audio file or list file (local or fsspec URL; see
            ``clap_fast.library_io``), or a list of items.
        out: output directory (local or fsspec URL).
        model: a CLAP model; its weights are shipped to each Ray actor.
        ray_address: run on Ray Data: "" or "auto" = $RAY_ADDRESS / a running local cluster /
            a new local one; "ray://host:10001" or "host:6379" = that cluster. With neither this
            nor ``use_ray`` the library is embedded in this process.
        num_cpu_actors: embed actors when the cluster has no GPUs.
        batch_size: items per batch (= per shard) and clips per forward pass.
        num_workers: decode threads of the in-process path.
        long_audio, data_filling: as in ``embed_audio``.
        retry_failed: decode the items an earlier run listed as failed again.
        crash_marker: testing hook (see ``LibraryEmbedder``).
    """
    if batch_size < 1 or num_cpu_actors < 1:
        raise ValueError(
            f"batch_size and num_cpu_actors must be >= 1, got {batch_size} and {num_cpu_actors}"
        )
    items = list(source) if isinstance(source, (list, tuple)) else list_library(source)
    if len(set(items)) != len(items):
        raise ValueError(f"{len(items) - len(set(items))} duplicate items in the source")
    store = LibraryStore(out)
    store.check_run(
        {
            "model": model_fingerprint(model),
            "audio": f"{model.cfg.audio.model_type}-{model.cfg.audio.model_name}",
            "sample_rate": model.cfg.audio.sample_rate,
            "embed_dim": model.cfg.joint_embed_shape,
            "long_audio": long_audio or ("fusion" if model.cfg.enable_fusion else "sliding"),
            "data_filling": data_filling,
        }
    )
    done = store.done()
    if retry_failed:
        done -= set(store.failures())
    todo = [p for p in items if p not in done]
    log.info(
        "%d items, %d already done, %d to embed into %s",
        len(items),
        len(items) - len(todo),
        len(todo),
        store.url,
    )
    opts = {
        "batch_size": batch_size,
        "embed_kwargs": {"long_audio": long_audio, "data_filling": data_filling},
        "crash_marker": crash_marker,
    }
    failed: dict[str, str] = {}
    embedded = 0
    if todo:
        on_ray = use_ray if use_ray is not None else ray_address is not None
        results = (
            _run_ray(todo, store, model, opts, ray_address, num_cpu_actors)
            if on_ray
            else _run_local(todo, store, model, opts, num_workers)
        )
        bar = tqdm(total=len(todo), desc="embed library", unit="file", disable=not progress)
        for res in results:
            for path, err in zip(res["path"], res["error"]):
                if err:
                    failed[str(path)] = str(err)
                    log.warning("could not embed %s: %s", path, err)
                else:
                    embedded += 1
            bar.update(len(res["path"]))
        bar.close()
    store.write_failures_file()
    log.info(
        "embedded %d, failed %d, skipped %d of %d items",
        embedded,
        len(failed),
        len(items) - len(todo),
        len(items),
    )
    return LibraryRun(len(items), len(items) - len(todo), embedded, failed, store.url)
