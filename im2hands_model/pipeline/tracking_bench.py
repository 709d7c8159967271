"""``im2hands bench-tracking``: meshes at camera rate on moving hands, against full reconstructions.

A rendered sequence (:mod:`~im2hands_model.data.sequences`: hands moving, turning, closing,
touching and separating at 30 Hz, ground truth per frame) is played in real time by a camera
process, as the synthetic camera node plays its pre-rendered frames: frame ``i`` is sent at
``start + i / fps`` through a queue (pickled, copied between processes, like a DDS sample), and
the consumer takes the newest frame whenever it is free (older ones are dropped, as the node's
newest-frame worker does). ``camera_process=False`` plays them from this process instead.

Three ways to turn the frames into meshes, on the same frames:

* **tracked** -- :class:`~im2hands_model.pipeline.video.VideoReconstruction`: keypoints every
  frame, full reconstructions on a worker thread, re-posed meshes in between. Measured: the rate
  of frames with meshes for every hand found, latency from the frame's time to its meshes, IoU
  of each frame's meshes against that frame's ground truth, CPU use of each process;
* **held** -- what the node did before: the latest full reconstruction's meshes, unchanged,
  until the next (the IoU of the tracked run's shapes without re-posing; its rate is that of the
  full reconstructions);
* **full** -- a full reconstruction of every tracked frame, after the real-time run (IoU only).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from im2hands_model.io import cpu_seconds
from im2hands_model.pipeline.bench import BenchFrame, frame_iou

__all__ = ["TRACKING_SEED", "run_tracking_bench", "sequence_frames", "format_tracking_report"]

TRACKING_SEED = 4343  #: seed of the key scenes (not a training or test seed)


def sequence_frames(seed: int = TRACKING_SEED, keys: int = 4, fps: float = 30.0,
                    seconds_per_key: float = 1.0) -> list[tuple[float, BenchFrame]]:  # fmt: skip
    """``(stamp, frame)`` of a rendered sequence through ``keys`` two-hand key scenes."""
    from im2hands_model.data.sequences import SequenceRenderer

    renderer = SequenceRenderer(fps, seconds_per_key)
    try:
        out = [
            (f.stamp, BenchFrame(f.image, f.K, f.joints, np.ones(2, bool), f.vertices, f.faces,
                                 f.layout, f.depth))  # fmt: skip
            for f in renderer.frames(seed, keys)
        ]
    finally:
        renderer.release()
    return out


def _camera(channel: Any, fps: float, start: float, frames: int) -> None:
    """The camera process: send ``(index, image)`` at ``start + index / fps`` (monotonic);
    ``channel`` is ``(queue, images, latest sent index)``."""
    queue, images, latest = channel
    for i in range(frames):
        time.sleep(max(0.0, start + i / fps - time.monotonic()))
        queue.put((i, images[i]))
        latest.value = i
    queue.put(None)
    latest.value = frames


def _cores(before: float | None, after: float | None, seconds: float) -> float | None:
    """CPU cores used between two :func:`~im2hands_model.io.cpu_seconds` readings."""
    return None if before is None or after is None else (after - before) / seconds


def run_tracking_bench(model: Any, frames: list[tuple[float, BenchFrame]], fps: float = 30.0,
                       camera_process: bool = True, iou_points: int = 20_000,
                       progress: bool = True, max_part_turn_deg: float | None = None,
                       shortcut_every: int = 3, worker: str = "auto",
                       ) -> dict[str, Any]:  # fmt: skip
    """Play ``frames`` in real time through the three variants (module docstring)."""
    from tqdm import tqdm

    from im2hands_model.pipeline.frame import Frame
    from im2hands_model.pipeline.keypoints import given_keypoints
    from im2hands_model.pipeline.video import VideoReconstruction, carried_occupancy

    given = model.config.keypoint_source == "given"
    # warm-up: the first calls with a new input size are slow on the CPU
    for _, frame in frames[:2]:
        model(frame.image, frame.K, keypoints=frame.keypoints if given else None)
    model.reset_tracking()
    video = VideoReconstruction(model, worker=worker, **({} if max_part_turn_deg is None else
                                           {"max_part_turn_deg": max_part_turn_deg}))
    played: list[dict[str, Any]] = []
    proc, queue = None, None
    start = time.monotonic() + (4.0 if camera_process else 0.0)
    if camera_process:
        ctx = mp.get_context("spawn")
        queue, latest = ctx.Queue(), ctx.Value("i", -1)
        images = [f.image for _, f in frames]
        proc = ctx.Process(target=_camera, args=((queue, images, latest), fps, start,
                                                 len(frames)), daemon=True)  # fmt: skip
        proc.start()
    cpu0 = cpu_seconds()
    cam0 = cpu_seconds(proc.pid) if proc else None
    worker0 = cpu_seconds(video.worker_pid) if video.worker_pid else None
    last = -1
    bar = tqdm(total=len(frames), desc="real time", unit="frame", disable=not progress)
    try:
        while last < len(frames) - 1:
            if queue is not None:
                item = queue.get(timeout=60)
                # newest frame only: the camera says which one it sent last
                while item is not None and item[0] < min(latest.value, len(frames) - 1):
                    item = queue.get(timeout=60)
                if item is None:
                    break
                newest, image = item
            else:
                now = time.monotonic() - start
                newest = min(len(frames) - 1, int(now * fps))
                if newest <= last:
                    time.sleep(max(0.0, (last + 1) / fps - now))
                    continue
                image = frames[newest][1].image
            stamp, frame = frames[newest]
            result = video(image, frame.K, keypoints=frame.keypoints if given else None,
                           depth=frame.depth, stamp=stamp)  # fmt: skip
            done = time.monotonic() - start
            # the shape this frame was made from (its result unchanged: the held variant)
            played.append({"index": newest, "result": result, "latency_ms": (done - stamp) * 1e3,
                           "shape": video._shape})  # fmt: skip
            bar.update(newest - last)
            last = newest
    finally:
        bar.close()
        duration = max(time.monotonic() - start, 1e-6)
        cpu = _cores(cpu0, cpu_seconds(), duration)
        cam_cpu = _cores(cam0, cpu_seconds(proc.pid) if proc else None, duration)
        worker_cpu = _cores(worker0, cpu_seconds(video.worker_pid) if video.worker_pid else None,
                            duration)  # fmt: skip
        video.close()
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    counts = dict(video.counts)

    def meshed(result: Any) -> bool:
        hands = [h for h in result.hands if h is not None]
        return bool(hands) and all(h.mesh is not None for h in hands)

    with_meshes = [p for p in played if meshed(p["result"])]
    reposed = [p for p in played if p["result"].kind == "reposed"]
    per_frame = []
    full_model = video.full_model
    for i, p in enumerate(tqdm(played, desc="full per frame", unit="frame", disable=not progress)):
        stamp, frame = frames[p["index"]]
        row: dict[str, Any] = {"index": p["index"], "stamp": stamp, "kind": p["result"].kind,
                               "latency_ms": p["latency_ms"],
                               "shape_age_s": p["result"].shape_age_s}  # fmt: skip
        if meshed(p["result"]):
            row["iou_tracked"] = frame_iou(p["result"], frame, iou_points, i)
            keypoints = frame.keypoints if given else _keypoints_of(p["result"])
            full = full_model(frame.image, frame.K, keypoints=keypoints)
            row["iou_full"] = frame_iou(full, frame, iou_points, i)
        if p["shape"] is not None:
            row["iou_held"] = frame_iou(p["shape"].result, frame, iou_points, i)
        per_frame.append(row)
    scored = [r for r in per_frame if r["kind"] == "reposed" and "iou_tracked" in r]
    # the full reconstruction with and without its shortcuts, on the same frames, interleaved
    plain = full_model.configured(skip_r_gap_m=None, refine_radius_m=None)
    speed: dict[str, list[float]] = {"on": [], "off": [], "iou_on": [], "iou_off": []}
    for i, p in enumerate(tqdm(played[::shortcut_every], desc="shortcuts on/off", unit="frame",
                               disable=not progress)):  # fmt: skip
        stamp, frame = frames[p["index"]]
        keypoints = frame.keypoints if given else _keypoints_of(p["result"])
        if p["result"].empty:
            continue
        found = given_keypoints(keypoints, Frame.from_input(frame.image, frame.K))
        prior = carried_occupancy(p["shape"], found)
        for key, m in (("off", plain), ("on", full_model)):
            r = m(frame.image, frame.K, keypoints=keypoints, prior=prior if key == "on" else None)
            speed[key].append(r.timings_ms["total"])
            speed[f"iou_{key}"].append(frame_iou(r, frame, iou_points, i))
    fulls = len({id(p["shape"]) for p in played if p["shape"] is not None})
    report = {
        "frames": len(frames),
        "fps": fps,
        "seconds": duration,
        "camera_process": camera_process,
        "keypoint_source": model.config.keypoint_source,
        "worker": video.worker,
        "frames_processed": len(played),
        "frames_with_meshes": len(with_meshes),
        "mesh_rate_hz": len(with_meshes) / duration,
        "full_rate_hz": fulls / duration,
        "kinds": counts,
        "latency_ms_reposed_median": _median([p["latency_ms"] for p in reposed]),
        "latency_ms_reposed_p95": _pct([p["latency_ms"] for p in reposed], 95),
        "iou_reposed": _mean([r["iou_tracked"] for r in scored]),
        "iou_full": _mean([r["iou_full"] for r in scored]),
        "iou_held": _mean([r["iou_held"] for r in scored if "iou_held" in r]),
        "frames_scored": len(scored),
        "cpu_cores_used": {"pipeline": cpu, "camera": cam_cpu, "worker_process": worker_cpu},
        "full_speedup": sum(speed["off"]) / sum(speed["on"]) if speed["on"] else float("nan"),
        "full_ms_median": {"shortcuts": _median(speed["on"]),
                           "no_shortcuts": _median(speed["off"])},  # fmt: skip
        "full_iou": {"shortcuts": _mean(speed["iou_on"]), "no_shortcuts": _mean(speed["iou_off"])},
        "full_speedup_frames": len(speed["on"]),
        "full_reconstructions": fulls,
        "per_frame": per_frame,
    }
    return report


def _keypoints_of(result: Any) -> np.ndarray:
    kp = np.full((2, 21, 3), np.nan)
    for h, hand in enumerate(result.hands):
        if hand is not None:
            kp[h] = hand.keypoints
    return kp


def _mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else float("nan")


def _median(v: list[float]) -> float:
    return float(np.median(v)) if v else float("nan")


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


def format_tracking_report(report: dict[str, Any]) -> str:
    """The headline figures as a few readable lines."""
    return "\n".join([
        f"{report['frames_processed']} of {report['frames']} frames processed in "
        f"{report['seconds']:.1f} s ({report['keypoint_source']} keypoints, {report['worker']} "
        f"worker, camera process "
        f"{'on' if report['camera_process'] else 'off'}); kinds {report['kinds']}",
        f"meshes {report['mesh_rate_hz']:.1f} Hz (full reconstructions "
        f"{report['full_rate_hz']:.2f} Hz); re-posed latency median "
        f"{report['latency_ms_reposed_median']:.0f} ms, p95 {report['latency_ms_reposed_p95']:.0f}",
        f"IoU: re-posed {report['iou_reposed']:.1f}, full per frame {report['iou_full']:.1f}, "
        f"held (no re-posing) {report['iou_held']:.1f}",
        "CPU cores used: " + ", ".join(
            f"{name.replace('_', ' ')} {cores:.2f}"
            for name, cores in report["cpu_cores_used"].items() if cores is not None
        ),
        f"full reconstruction with its shortcuts {report['full_speedup']:.2f}x as fast "
        f"(median {report['full_ms_median']['shortcuts']:.0f} vs "
        f"{report['full_ms_median']['no_shortcuts']:.0f} ms; IoU "
        f"{report['full_iou']['shortcuts']:.1f} vs {report['full_iou']['no_shortcuts']:.1f}; "
        f"{report['full_speedup_frames']} frames)",
    ])  # fmt: skip


def plot_tracking(report: dict[str, Any], path: str | os.PathLike) -> str:
    """A PNG of IoU per frame over the sequence (tracked, full per frame, held) above the
    latency of each processed frame, drawn with PIL (the project has no plotting library)."""
    from PIL import Image, ImageDraw

    rows = report["per_frame"]
    width, height, left, top = 960, 420, 56, 30
    plot_w, iou_h, lat_h = width - left - 20, 220, 100
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    t_max = max((r["stamp"] for r in rows), default=1.0) or 1.0

    def x_of(stamp: float) -> float:
        return left + plot_w * stamp / t_max

    def y_iou(v: float) -> float:
        return top + iou_h * (1.0 - v / 100.0)

    lat_top = top + iou_h + 40
    lat_max = max([r["latency_ms"] for r in rows] + [100.0])

    def y_lat(v: float) -> float:
        return lat_top + lat_h * (1.0 - v / lat_max)

    for v in (0, 25, 50, 75, 100):
        draw.line([(left, y_iou(v)), (left + plot_w, y_iou(v))], fill=(225, 225, 225))
        draw.text((8, y_iou(v) - 6), f"{v:3d}", fill="black")
    draw.text((left, 8), "IoU per frame (%): tracked (blue), full per frame (grey), held "
              "without re-posing (red); bottom: latency (ms), 100 ms line", fill="black")
    for key, colour in (("iou_full", (150, 150, 150)), ("iou_held", (220, 60, 50)),
                        ("iou_tracked", (30, 90, 220))):  # fmt: skip
        pts = [(x_of(r["stamp"]), y_iou(r[key])) for r in rows if key in r]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
    draw.line([(left, y_lat(100)), (left + plot_w, y_lat(100))], fill=(200, 120, 0))
    for r in rows:
        colour = {"reposed": (30, 90, 220), "full": (40, 160, 60)}.get(r["kind"], (200, 0, 0))
        x = x_of(r["stamp"])
        draw.line([(x, y_lat(0)), (x, y_lat(r["latency_ms"]))], fill=colour, width=2)
    draw.text((8, lat_top - 6), f"{lat_max:.0f}", fill="black")
    draw.text((8, y_lat(0) - 6), "0", fill="black")
    draw.text((left, height - 16), f"time (s), 0 to {t_max:.1f}; mesh rate "
              f"{report['mesh_rate_hz']:.1f} Hz, full {report['full_rate_hz']:.2f} Hz",
              fill="black")  # fmt: skip
    img.save(path)
    return str(path)
