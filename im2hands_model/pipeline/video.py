"""Meshes at camera rate: full reconstructions in the background, re-posed meshes in between.

:class:`VideoReconstruction` takes the frames of one video in order. On every frame it runs the
keypoint stages only (tracked MediaPipe: a few ms). A full K -> I -> R reconstruction runs on
its own worker (a thread, or a second process) whenever the previous one is done, always on
the newest frame. Every frame's meshes are the latest full reconstruction carried to that frame's
keypoints by its parts' rigid transforms (:mod:`~im2hands_model.pipeline.reposing`), and its
contacts and penetration are computed on those meshes. Each result says what it is
(:attr:`~im2hands_model.pipeline.result.Reconstruction.kind`) and how old its shape is.

The full reconstructions use the video's coherence: MISE starts from the previous shape carried
to the new keypoints (its coarse level is read off that shape instead of running I), and R is
skipped while the hands are apart (R refines how they meet); measured in ``docs/tracking.md``.

When a finger part has turned more than ``max_part_turn_deg`` since the full reconstruction,
carrying it would bend the surface too far: the frame gets keypoints only (``kind
"keypoints"``) until the next full reconstruction arrives. A hand found in the frame that the
shape does not have yet also waits for it.

``background=False`` runs the full reconstructions inline instead (deterministic, for tests and
benchmarks): one whenever ``full_every`` frames have passed, the pose moved too far, or a hand
appeared.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import trimesh

from im2hands_model.pipeline.contacts import hand_contacts
from im2hands_model.pipeline.reposing import (
    MAX_PART_TURN_DEG,
    MeshBinding,
    Reposed,
    ReposedOccupancy,
    bind_mesh,
    repose_meshes,
)
from im2hands_model.pipeline.result import (
    HAND_NAMES,
    ContactReport,
    HandResult,
    Keypoints,
    Reconstruction,
)

__all__ = ["PRIOR_MAX_TURN_DEG", "SKIP_R_GAP_M", "VideoReconstruction", "carried_occupancy"]

log = logging.getLogger(__name__)

#: Penetration-volume voxels of a re-posed frame at most (the voxel edge grows beyond; the
#: volume stays close to 1 mm voxels', docs/tracking.md): each costs a nearest-vertex query, and
#: a re-posed frame must stay within the camera period.
REPOSED_MAX_VOXELS = 20_000
#: The full reconstructions' R is skipped when the hands' skeletons are this far apart (metres).
SKIP_R_GAP_M = 0.06
#: Where they meet, R runs only within this distance of the other hand's bones (metres).
REFINE_RADIUS_M = 0.03
#: A full reconstruction starts MISE from the previous shape carried to its keypoints when no
#: finger part turned more than this (degrees) since that shape.
PRIOR_MAX_TURN_DEG = 30.0
#: Longest wait for the reconstruction process to build and warm up its networks (seconds).
WORKER_START_TIMEOUT_S = 300.0
#: Stamp step assumed when frames come without stamps (a 30 Hz camera).
DEFAULT_FRAME_PERIOD_S = 1.0 / 30.0


@dataclass
class _Shape:
    """A full reconstruction, bound to its keypoints for re-posing."""

    result: Reconstruction
    bindings: list[MeshBinding | None]
    stamp: float


class VideoReconstruction:
    """Two-hand meshes for every frame of a video (module docstring).

    Args:
        model: an :class:`~im2hands_model.pipeline.model.Im2Hands`; with the MediaPipe source
            its hands are tracked from frame to frame.
        background: run the full reconstructions in the background (default, see ``worker``)
            or inline.
        max_part_turn_deg: stop re-posing beyond this finger-part rotation since the shape.
        full_every: with ``background=False``, frames between full reconstructions.
        worker: where the full reconstructions run: ``process`` (a pipeline from
            ``Im2Hands.from_pretrained`` only): a second process with its own copy of the
            networks and one torch thread fewer, where torch runs as on a main thread and shares
            no interpreter lock with the frames, while this process's per-frame work runs on one
            torch thread (restored by :meth:`close`): two intra-op threads here beside a busy
            worker wait on each other's cores and made each frame 3x slower; or ``thread``.
            ``auto`` (the default): ``process`` where it can, else ``thread``
            (docs/tracking.md).
        shortcuts: the full reconstructions skip R when the hands are apart
            (``PipelineConfig.skip_r_gap_m`` = :data:`SKIP_R_GAP_M`, unless the model sets it),
            run it only near the other hand when they meet (``refine_radius_m`` =
            :data:`REFINE_RADIUS_M`, likewise) and start MISE from the previous shape carried
            to their keypoints (:func:`carried_occupancy`).
    """

    def __init__(self, model: Any, background: bool = True,
                 max_part_turn_deg: float = MAX_PART_TURN_DEG, full_every: int = 10,
                 shortcuts: bool = True, worker: str = "auto") -> None:  # fmt: skip
        if max_part_turn_deg <= 0 or full_every < 1:
            raise ValueError("max_part_turn_deg must be positive and full_every at least 1")
        if worker not in ("auto", "thread", "process"):
            raise ValueError(f"worker must be auto, thread or process, got {worker!r}")
        cfg = model.config
        if cfg.keypoint_source == "mediapipe" and not cfg.track_hands:
            model = model.configured(track_hands=True)
        self.model = model
        # the full reconstructions take this frame's keypoints as they are (K already ran)
        gap = cfg.skip_r_gap_m if cfg.skip_r_gap_m is not None or not shortcuts else SKIP_R_GAP_M
        radius = cfg.refine_radius_m
        radius = REFINE_RADIUS_M if radius is None and shortcuts else radius
        self.full_model = model.configured(keypoint_source="given", refine_keypoints=False,
                                           keep_occupancy=True, skip_r_gap_m=gap,
                                           refine_radius_m=radius)  # fmt: skip
        self.background = background
        self.shortcuts = shortcuts
        self.max_part_turn_deg = float(max_part_turn_deg)
        self.full_every = int(full_every)
        if worker == "auto":  # the faster on a 2-core CPU too (docs/tracking.md)
            worker = "process" if model.source is not None and background else "thread"
        if worker == "process" and model.source is None:
            raise ValueError("worker='process' needs a model made by Im2Hands.from_pretrained")
        self.worker = worker if background else "inline"
        self._pool: Any = None
        #: the process id of the reconstruction process (``worker="process"``), else ``None``
        self.worker_pid: int | None = None
        self._caller_threads: int | None = None  # torch threads here before a process worker
        if self.worker == "thread":
            self._pool = ThreadPoolExecutor(1, "im2hands-full")
        elif self.worker == "process":
            self._pool = _process_pool(self.full_model)
            try:  # the worker's networks built and warmed up before the first frame
                self.worker_pid = self._pool.submit(_child_warmup).result(
                    timeout=WORKER_START_TIMEOUT_S
                )
            except Exception as exc:  # noqa: BLE001 - no process worker here: use a thread
                log.warning("no reconstruction process (%s: %s); using a thread",
                            type(exc).__name__, exc)  # fmt: skip
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool, self.worker = ThreadPoolExecutor(1, "im2hands-full"), "thread"
                self.worker_pid = None
            else:  # the frames' small ops on one thread: the worker has the other cores
                self._caller_threads = torch.get_num_threads()
                torch.set_num_threads(1)
        self._pending: Future | None = None
        self._shape: _Shape | None = None
        self._since_full = 0
        self._last_stamp: float | None = None
        #: counts of results by kind, and of full reconstructions that failed
        self.counts = {"full": 0, "reposed": 0, "keypoints": 0, "failed": 0}

    # ------------------------------------------------------------------ the frame
    def __call__(self, image: Any, intrinsics: Any, keypoints: Any = None, depth: Any = None,
                 stamp: float | None = None) -> Reconstruction:  # fmt: skip
        """The frame's meshes (full or re-posed) or keypoints; arguments as
        :meth:`Im2Hands.__call__ <im2hands_model.pipeline.model.Im2Hands.__call__>`."""
        t0 = time.perf_counter()
        if stamp is None:
            stamp = 0.0 if self._last_stamp is None else self._last_stamp + DEFAULT_FRAME_PERIOD_S
        self._last_stamp = stamp
        found = self.model.find_keypoints(image, intrinsics, keypoints, depth, stamp)
        keypoint_ms = (time.perf_counter() - t0) * 1e3
        self._collect()
        if not found.any:
            return self._finish(self._keypoints_only(found, "no hand found"), t0, keypoint_ms)
        if self.background:
            if self._pending is None:  # the worker is idle: give it the newest frame
                self._submit(image, intrinsics, found, stamp)
        else:
            self._since_full += 1
            if self._shape is None or self._since_full >= self.full_every:
                full = self._run_full_inline(image, intrinsics, found, stamp)
                return self._finish(full, t0, keypoint_ms)
        result, reason = self._reposed(found, stamp)
        if result is None and not self.background:  # moved too far or a new hand: reconstruct
            full = self._run_full_inline(image, intrinsics, found, stamp)
            return self._finish(full, t0, keypoint_ms)
        if result is None:
            result = self._keypoints_only(found, reason)
        return self._finish(result, t0, keypoint_ms)

    def close(self) -> None:
        """Stop the worker (waits for a running reconstruction)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None
        self._restore_threads()

    def _restore_threads(self) -> None:
        if self._caller_threads is not None:
            torch.set_num_threads(self._caller_threads)
            self._caller_threads = None

    def reset(self) -> None:
        """Forget the shape and the tracked hands (the next frame starts a new video)."""
        if self._pending is not None:
            self._pending.cancel()
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - a failed reconstruction of the old video
                pass
        self._pending, self._shape, self._since_full, self._last_stamp = None, None, 0, None
        self.model.reset_tracking()

    def __enter__(self) -> VideoReconstruction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def keypoint_report(self) -> Any:
        return self.model.keypoint_report

    # ------------------------------------------------------------------ full reconstructions
    def _full(self, image: Any, intrinsics: Any, found: Keypoints, stamp: float,
              previous: _Shape | None = None) -> _Shape:  # fmt: skip
        return _full_reconstruction(self.full_model, image, intrinsics, found, stamp,
                                    previous if self.shortcuts else None)  # fmt: skip

    def _submit(self, image: Any, intrinsics: Any, found: Keypoints, stamp: float) -> None:
        if self.worker == "process":
            # the worker keeps its own last shape: it is the one this side holds
            job = (_child_full, np.asarray(image), np.asarray(intrinsics), found, stamp,
                   self.shortcuts and self._shape is not None)  # fmt: skip
        else:
            job = (self._full, image, intrinsics, found, stamp, self._shape)
        try:
            self._pending = self._pool.submit(*job)
        except BrokenProcessPool as exc:  # the worker process died: go on with a thread
            self.counts["failed"] += 1
            log.warning("the reconstruction process stopped (%s); continuing on a thread", exc)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.worker = ThreadPoolExecutor(1, "im2hands-full"), "thread"
            self._restore_threads()
            self._pending = self._pool.submit(self._full, image, intrinsics, found, stamp,
                                              self._shape)  # fmt: skip

    def _run_full_inline(self, image: Any, intrinsics: Any, found: Keypoints, stamp: float
                         ) -> Reconstruction:  # fmt: skip
        self._shape = self._full(image, intrinsics, found, stamp, self._shape)
        self._since_full = 0
        return self._shape.result

    def _collect(self) -> None:
        """Take a finished background reconstruction as the new shape."""
        if self._pending is None or not self._pending.done():
            return
        future, self._pending = self._pending, None
        try:
            self._shape = future.result()
        except Exception as exc:  # noqa: BLE001 - logged and counted; the video goes on
            self.counts["failed"] += 1
            log.warning("full reconstruction failed (%s: %s); re-posing the previous shape",
                        type(exc).__name__, exc)  # fmt: skip

    # ------------------------------------------------------------------ re-posed frames
    def _reposed(self, found: Keypoints, stamp: float) -> tuple[Reconstruction | None, str]:
        shape = self._shape
        if shape is None:
            return None, "waiting for the first full reconstruction"
        hands: list[HandResult | None] = [None, None]
        moved_hands: list[Reposed | None] = [None, None]  # meshes for the contacts, too
        present = [h for h in range(2) if found.present[h]]
        for h in present:
            if shape.bindings[h] is None:
                return None, f"the {HAND_NAMES[h]} hand is new: waiting for its reconstruction"
        reposed = repose_meshes([shape.bindings[h] for h in present],
                                [found.joints[h] for h in present])  # fmt: skip
        for h, moved in zip(present, reposed, strict=True):
            if moved.part_turn_deg > self.max_part_turn_deg:
                turn = f"{moved.part_turn_deg:.0f} deg"
                return None, f"the {HAND_NAMES[h]} hand's pose moved {turn} since its shape"
            moved_hands[h] = moved
            mesh = trimesh.Trimesh(moved.vertices, moved.faces, process=False)
            hands[h] = HandResult(HAND_NAMES[h], mesh, found.joints[h].copy(),
                                  float(found.confidence[h]))  # fmt: skip
        t0 = time.perf_counter()
        cfg = self.model.config
        grids = None
        if all(m is not None for m in moved_hands) and shape.result.occupancy is not None:
            grids = ReposedOccupancy(shape.result.occupancy, shape.bindings, moved_hands)
        contacts = hand_contacts(moved_hands, cfg.contact_distance, cfg.voxel_size, grids,
                                 REPOSED_MAX_VOXELS, vertex_sign=True)  # fmt: skip
        timings = {"repose_contacts": (time.perf_counter() - t0) * 1e3}
        full = shape.result
        age = float(stamp - shape.stamp)
        return Reconstruction(hands, contacts, timings, {}, full.crop_K, full.crop_box, "",
                              kind="reposed", shape_age_s=age), ""  # fmt: skip

    def _keypoints_only(self, found: Keypoints, reason: str) -> Reconstruction:
        hands = [
            HandResult(HAND_NAMES[h], None, found.joints[h].copy(), float(found.confidence[h]))
            if found.present[h] else None
            for h in range(2)
        ]  # fmt: skip
        report = ContactReport(contact_distance=self.model.config.contact_distance)
        return Reconstruction(hands, report, {}, message=reason, kind="keypoints")

    def _finish(self, result: Reconstruction, t0: float, keypoint_ms: float) -> Reconstruction:
        timings = dict(result.timings_ms)
        timings["keypoints"] = keypoint_ms
        timings["frame"] = (time.perf_counter() - t0) * 1e3
        result.timings_ms = timings
        self.counts[result.kind] += 1
        return result


def carried_occupancy(shape: _Shape | None, found: Keypoints) -> ReposedOccupancy | None:
    """``shape``'s occupancy carried to the keypoints ``found``, as a prior for the next full
    reconstruction; ``None`` without a shape of both hands or when a finger part turned more
    than :data:`PRIOR_MAX_TURN_DEG` since it."""
    if shape is None or shape.result.occupancy is None or not found.present.all():
        return None
    if any(b is None for b in shape.bindings):
        return None
    moved = repose_meshes(shape.bindings, [found.joints[h] for h in range(2)])
    if max(m.part_turn_deg for m in moved) > PRIOR_MAX_TURN_DEG:
        return None
    return ReposedOccupancy(shape.result.occupancy, shape.bindings, moved)


def _full_reconstruction(model: Any, image: Any, intrinsics: Any, found: Keypoints, stamp: float,
                         previous: _Shape | None) -> _Shape:  # fmt: skip
    """One full reconstruction from the frame's keypoints, bound for re-posing (``previous``:
    the shape whose carried occupancy may start MISE)."""
    result = model(image, intrinsics, keypoints=found, prior=carried_occupancy(previous, found))
    bindings = [
        None if hand is None or hand.mesh is None
        else bind_mesh(hand.mesh.vertices, hand.mesh.faces, hand.keypoints, h == 0)
        for h, hand in enumerate(result.hands)
    ]  # fmt: skip
    return _Shape(result, bindings, stamp)


# The worker process: its own pipeline (built like the caller's) and its last shape.
_CHILD: dict[str, Any] = {}


def _process_pool(full_model: Any) -> ProcessPoolExecutor:
    """A one-process pool whose worker builds ``full_model``'s pipeline at start-up."""
    import multiprocessing as mp

    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_child_start,
                               initargs=(full_model.source, asdict(full_model.config),
                                         max(1, torch.get_num_threads() - 1)))  # fmt: skip
    return pool


def _child_start(source: dict[str, Any], config: dict[str, Any], threads: int) -> None:
    from im2hands_model.pipeline.model import Im2Hands

    torch.set_num_threads(threads)
    _CHILD.update(model=Im2Hands.from_pretrained(**source, **config), shape=None)


def _child_warmup() -> int:
    """Warm the worker's pipeline up; its process id."""
    import os

    from im2hands_model.pipeline.warmup import warmup

    warmup(_CHILD["model"], 1)
    return os.getpid()


def _child_full(image: Any, intrinsics: Any, found: Keypoints, stamp: float,
                use_prior: bool) -> _Shape:  # fmt: skip
    previous = _CHILD["shape"] if use_prior else None
    _CHILD["shape"] = _full_reconstruction(_CHILD["model"], image, intrinsics, found, stamp,
                                           previous)  # fmt: skip
    return _CHILD["shape"]
