"""Build a synthetic dataset: scenes in worker processes, shards on disk, a report and a contact
sheet. The result depends only on ``(n, seed)`` and the settings, not on the number of workers:
scene ``i`` always comes from its own random stream and lands in shard ``i // shard_size``."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from im2hands_model.data.shards import FACES_FILE, write_index, write_shard


@dataclass(frozen=True)
class SynthSettings:
    n: int
    seed: int
    points_per_hand: int = 16384
    image_size: int = 256
    full_frame: bool = False
    shard_size: int = 64
    skin_cues: bool = False
    realism: bool = False


_GENERATOR = None


def _init_worker(settings: SynthSettings) -> None:
    global _GENERATOR
    import torch

    torch.set_num_threads(1)  # one core per worker process,
    os.environ.setdefault("LP_NUM_THREADS", "1")  # for Mesa's rasteriser too
    from im2hands_model.data.synthetic import SceneGenerator

    _GENERATOR = SceneGenerator(
        settings.points_per_hand, settings.image_size, settings.full_frame, settings.skin_cues,
        settings.realism,
    )  # fmt: skip


def _generate_chunk(args: tuple[int, list[int]]) -> tuple[np.ndarray, list[tuple[dict, dict]]]:
    """Scenes of a chunk, with the (constant) mesh faces so the parent needs no Anny model."""
    seed, indices = args
    assert _GENERATOR is not None
    out = []
    for i in indices:
        scene = _GENERATOR.generate(seed, i)
        out.append((scene.arrays, scene.info))
    return _GENERATOR.faces, out


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def build_dataset(
    settings: SynthSettings, out_dir: Path, workers: int = 1, progress: bool = True
) -> dict:
    """Generate ``settings.n`` scenes into ``out_dir``; returns the report (also written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunk = 4 if workers > 1 else 1
    tasks = [(settings.seed, c) for c in _chunks(settings.n, chunk)]
    counts: list[int] = []
    pending: list[dict] = []
    stats: list[dict] = []
    example: dict | None = None
    bar = tqdm(total=settings.n, desc="scenes", unit="scene", disable=not progress, smoothing=0.1)

    first_result: list[float] = []
    faces = None

    def consume(chunk: tuple[np.ndarray, list[tuple[dict, dict]]]) -> None:
        nonlocal example, faces
        faces, results = chunk
        if not first_result:
            first_result.append(time.perf_counter())
        for arrays, info in results:
            pending.append(arrays)
            stats.append(info)
            example = example or arrays
            if len(pending) == settings.shard_size:
                counts.append(write_shard(out_dir, len(counts), pending))
                pending.clear()
        bar.update(len(results))

    if workers <= 1:
        _init_worker(settings)
        for task in tasks:
            consume(_generate_chunk(task))
    else:
        ctx = mp.get_context("spawn")  # EGL contexts and Warp do not survive fork
        with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
            for chunk in pool.imap(_generate_chunk, tasks):
                consume(chunk)
    if pending:
        counts.append(write_shard(out_dir, len(counts), pending))
    bar.close()
    np.save(out_dir / FACES_FILE, faces.astype(np.int32))
    elapsed = time.perf_counter() - start
    meta = {"generator": asdict(settings), "workers": workers}
    write_index(out_dir, counts, example, meta)
    report = _report(settings, stats, elapsed, workers, len(counts))
    # Throughput once the workers are up (Anny and EGL start-up excluded), over the scenes after
    # the first chunk; equal to the overall rate when everything came in one chunk.
    steady = elapsed - (first_result[0] - start)
    later = len(stats) - len(tasks[0][1])
    report["startup_s"] = round(first_result[0] - start, 2)
    report["scenes_per_s_after_startup"] = (
        round(later / steady, 3) if later > 0 and steady > 0 else report["scenes_per_s"]
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _report(
    settings: SynthSettings, stats: list[dict], elapsed: float, workers: int, shards: int
) -> dict:
    def values(key: str) -> list[float]:
        return [s[key] for s in stats if key in s]

    depth = values("max_depth_mm")
    sizes = [x for s in stats for x in s["hand_size_m"]]
    relax = [x for s in stats for x in s["pose_relax"]]
    return {
        "scenes": len(stats),
        "seed": settings.seed,
        "shards": shards,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "seconds": round(elapsed, 2),
        "scenes_per_s": round(len(stats) / elapsed, 3),
        "points_per_hand": settings.points_per_hand,
        "image_size": settings.image_size,
        "full_frame": settings.full_frame,
        "skin_cues": settings.skin_cues,
        "realism": settings.realism,
        "layouts": dict(Counter(s["layout"] for s in stats)),
        "hands": sum(1 if s["layout"] == "single" else 2 for s in stats),
        "children": sum(bool(s["child"]) for s in stats),
        "hand_size_m": {"min": round(min(sizes), 4), "max": round(max(sizes), 4)},
        "poses_relaxed_fraction": round(float(np.mean(np.array(relax) < 1.0)), 3),
        "touching_max_depth_before_split_mm": round(max(depth, default=0.0), 2),
        "points_reassigned_by_split": int(sum(values("reassigned_points"))),
    }
