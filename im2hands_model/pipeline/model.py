"""``Im2Hands``: one image and its intrinsics in, two watertight hand meshes out.

``Im2Hands.__call__`` follows the paper's overview figure, top to bottom::

    keypoints  = source(frame)                    # MediaPipe (or the predictor, or the caller's)
    keypoints  = K(keypoints, crop)               # two-hand keypoint refinement   (optional)
    I          = InitialField(crop, keypoints)    # per-hand implicit occupancy
    meshes     = MISE + marching cubes of I       # 0.5 level
    I+R        = RefinedField(I, I's meshes)      # two-hand refinement            (optional)
    meshes     = marching cubes of I+R            # R's shipped level, R on a band near I's surface
    contacts   = hand_contacts(meshes)

Nothing needs ground truth: the keypoint source finds the hands, a training-style square crop is
cut around them (:mod:`~im2hands_model.pipeline.crop`; its intrinsics keep the camera frame), and
meshes are mapped from each hand's normalised space back to the camera frame.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from im2hands_model.hands import from_normalized, root_frame
from im2hands_model.meshing import (
    THRESHOLD_I,
    THRESHOLD_R,
    band_refined_grid,
    grid_meshes,
    mesh_to_camera,
    mise_grid,
    synchronize,
)
from im2hands_model.networks.init_occ import SKIP_DISTANCE_M, Shortcuts, part_distances
from im2hands_model.pipeline.contacts import (
    DEFAULT_CONTACT_DISTANCE,
    DEFAULT_VOXEL_SIZE,
    GridOccupancy,
    hand_contacts,
)
from im2hands_model.pipeline.frame import MAX_PIXELS, Frame
from im2hands_model.pipeline.keypoints import (
    LearnedKeypoints,
    crop_around,
    crop_tensor,
    given_keypoints,
)
from im2hands_model.pipeline.occupancy import InitialField, RefinedField
from im2hands_model.pipeline.reference import reference_meshes
from im2hands_model.pipeline.result import (
    HAND_NAMES,
    ContactReport,
    HandResult,
    Keypoints,
    Reconstruction,
)

__all__ = ["Im2Hands", "PipelineConfig"]

KEYPOINT_SOURCES = ("mediapipe", "learned", "given")
BACKENDS = ("torch", "onnxruntime")



@dataclass
class PipelineConfig:
    """Switches and sizes of the pipeline (all have defaults; see docs/pipeline.md).

    Attributes:
        keypoint_source: ``mediapipe`` (default: MediaPipe's hand models with our two-hand
            search and placement, :mod:`im2hands_model.hand_tracking`), ``learned`` (the
            shipped predictor) or ``given`` (the caller passes ``keypoints=`` to every call).
        refine_keypoints: run K (``None``: on for the learned predictor's keypoints, whose
            errors K was trained on; off for MediaPipe's and the caller's, taken as they are).
        track_hands: calls are frames of one video in order (MediaPipe source): hands are
            tracked from frame to frame and the palm detector runs only while one is missing.
        smooth_keypoints: One-Euro smoothing of tracked keypoints (with ``track_hands``).
        detector_variant: MediaPipe models, ``full`` or ``lite``.
        use_image: I with query-image attention (False: keypoint-only HALO).
        refine_occupancy: run R.
        resolution: effective final grid cells per axis (``None``: 128 on CPU, 256 on GPU).
        coarse_resolution: MISE start grid (the paper's 32).
        threshold_i, threshold_r: iso-levels of I and R (paper: 0.5, 0.45; ``from_pretrained``
            takes R's from the weights where they ship one).
        cull_parts: I evaluates each point's ``cull_parts`` nearest parts only (``None``: all 16).
        dilate_final: dilate the active cells before the last MISE split too (paper protocol).
        reference: run the occupancy stages by the paper protocol instead (slow; for the
            benchmark, :mod:`~im2hands_model.pipeline.reference`).
        refine_band_coarse: R's smooth decoder features evaluated on the 2x coarser band and
            interpolated (:func:`~im2hands_model.meshing.band_refined_grid`).
        contact_distance: metres; voxel_size: penetration volume voxels, metres.
        presence_threshold: predictor presence probability that counts as a hand.
        max_pixels: largest accepted image.
        seed: anchor sampling seed (fixed: same frame, same meshes).
        skip_r_gap_m: skip R when every keypoint of one hand is farther than this (metres)
            from every keypoint of the other (``None``: R always runs). R refines how the two
            hands meet; with a few centimetres between their skeletons (surfaces lie within
            ~1.5 cm of them) it has nothing to separate, and skipping it saves its time.
        refine_radius_m: the same where the hands do meet, region by region: R runs only on
            the parts of I's surface within this distance (metres) of the other hand's bones
            and keeps I's surface elsewhere (``None``: R on the whole surface).
        keep_occupancy: keep the meshes' occupancy grids in the result
            (:attr:`~im2hands_model.pipeline.result.Reconstruction.occupancy`; the video's
            re-posed frames read their contacts off them).
    """

    keypoint_source: str = "mediapipe"
    refine_keypoints: bool | None = None
    track_hands: bool = False
    smooth_keypoints: bool = True
    detector_variant: str = "full"
    use_image: bool = True
    refine_occupancy: bool = True
    resolution: int | None = None
    coarse_resolution: int = 32
    threshold_i: float = THRESHOLD_I
    threshold_r: float = THRESHOLD_R
    cull_parts: int | None = 4
    dilate_final: bool = False
    reference: bool = False
    refine_band_coarse: bool = True
    contact_distance: float = DEFAULT_CONTACT_DISTANCE
    voxel_size: float = DEFAULT_VOXEL_SIZE
    presence_threshold: float = 0.5
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    skip_r_gap_m: float | None = None
    refine_radius_m: float | None = None
    keep_occupancy: bool = False

    def check(self) -> None:
        if self.detector_variant not in ("full", "lite"):
            raise ValueError("detector_variant must be 'full' or 'lite'")
        if self.keypoint_source not in KEYPOINT_SOURCES:
            raise ValueError(f"keypoint_source must be one of {KEYPOINT_SOURCES}")
        if self.resolution is not None:
            steps = math.log2(self.resolution / self.coarse_resolution)
            if self.resolution < self.coarse_resolution or steps != int(steps):
                raise ValueError(
                    f"resolution {self.resolution} must be coarse_resolution "
                    f"{self.coarse_resolution} times a power of two"
                )
        if self.coarse_resolution < 2:
            raise ValueError("coarse_resolution must be >= 2")
        for name in ("threshold_i", "threshold_r", "presence_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1)")
        if self.cull_parts is not None and not 1 <= self.cull_parts <= 16:
            raise ValueError("cull_parts must be None or 1..16")
        if self.skip_r_gap_m is not None and not self.skip_r_gap_m >= 0:
            raise ValueError("skip_r_gap_m must be None or >= 0 (metres)")
        if self.refine_radius_m is not None and not self.refine_radius_m > 0:
            raise ValueError("refine_radius_m must be None or > 0 (metres)")
        if self.contact_distance < 0 or not self.voxel_size > 0:
            raise ValueError("contact_distance must be >= 0 and voxel_size > 0")


class _Timer:
    """Wall time per stage in ms (CUDA synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.ms = device, {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Book the time spent in the ``with`` block under ``name``."""
        t0 = self.now()
        try:
            yield
        finally:
            self.add(name, self.now() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1e3

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


class _Crop:
    """The training-style crop around a frame's keypoints, as the networks take it (image and
    intrinsics, keypoints as tensors), with the hands' root frames."""

    def __init__(self, frame: Frame, keypoints: Keypoints, device: torch.device) -> None:
        self.window = crop_around(keypoints, frame)
        self.image, self.intrinsics = crop_tensor(frame, self.window, device)
        self.keypoints = keypoints
        self.joints = torch.as_tensor(keypoints.joints, device=device)[None]
        self.present = torch.as_tensor(keypoints.present, device=device)[None]
        self.rot, self.origin = root_frame(torch.as_tensor(keypoints.joints, dtype=torch.float32))

    def to_camera(self, meshes: list) -> list:
        """Meshes from each hand's normalised box to the camera frame."""
        return [mesh_to_camera(m, self.rot[h], self.origin[h]) for h, m in enumerate(meshes)]


def _prior_fn(prior: Any, crop: _Crop) -> Any:
    """The mesher's occupancy function of a ``prior`` given in camera coordinates."""
    rot, origin = crop.rot.to(crop.joints.device), crop.origin.to(crop.joints.device)

    def fn(points_norm: torch.Tensor) -> torch.Tensor:  # [2, P, 3] -> [2, P]
        cam = from_normalized(points_norm, rot, origin)
        return torch.stack([prior.values(h, cam[h]).to(points_norm) for h in range(2)])

    return fn


def _near_other_hand(crop: _Crop, radius: float) -> Any:
    """``near(hand, box points [K, 3]) -> bool [K]``: the points within ``radius`` metres of
    the other hand's bones (where R runs with ``refine_radius_m``)."""
    rot, origin, joints = crop.rot, crop.origin, crop.joints[0]

    def near(h: int, points_norm: torch.Tensor) -> torch.Tensor:
        cam = from_normalized(points_norm[None], rot[h].to(points_norm), origin[h].to(points_norm))
        dist = part_distances(cam, joints[1 - h][None].to(points_norm))  # [1, 16, K] metres
        return dist.min(1).values[0] <= radius

    return near


class Im2Hands:
    """The two-hand reconstruction pipeline (module docstring).

    Build it with :meth:`from_pretrained`; call it as ``model(image_rgb, intrinsics)``.

    Args:
        networks: dict with ``kpts_pred``, ``kpts_ref``, ``halo``, ``ref_occ`` (I+R; its ``init``
            is I) modules, torch or ONNX Runtime wrappers with the same methods.
        config: :class:`PipelineConfig`.
        device: torch device of the networks' inputs.
        backend: ``torch`` or ``onnxruntime`` (for reports).
    """

    def __init__(self, networks: dict[str, Any], config: PipelineConfig | None = None,
                 device: torch.device | str = "cpu", backend: str = "torch") -> None:  # fmt: skip
        self.nets = networks
        self.device = torch.device(device)
        self.backend = backend
        self.config = config or PipelineConfig()
        self.config.check()
        self._mediapipe = None
        #: how :meth:`from_pretrained` built the networks (``path``, ``device``, ``backend``),
        #: so that another process can build the same (``None`` for networks given directly)
        self.source: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str = "auto",
        backend: str = "torch",
        **config: Any,
    ) -> Im2Hands:
        """The pipeline with trained weights.

        Args:
            path: a weights folder with ``manifest.json`` (as written by
                ``training/export_weights.py``); ``None``: the weights shipped in the package.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            backend: ``torch``, or ``onnxruntime`` (networks exported to ONNX on first use,
                CUDA/TensorRT execution providers where available).
            **config: fields of :class:`PipelineConfig`. Without ``threshold_r`` I+R is
                meshed at the iso-level the weights ship with R (chosen on validation scenes),
                else at the paper's.
        """
        from im2hands_model.pretrained import iso_level, load_pretrained

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        nets = {name: load_pretrained(name, dev, path) for name in ("kpts_pred", "kpts_ref",
                                                                  "halo", "ref_occ")}  # fmt: skip
        if "threshold_r" not in config and (level := iso_level("ref_occ", path)) is not None:
            config["threshold_r"] = level
        model = cls(nets, PipelineConfig(**config), dev, "torch")
        model.source = {"path": None if path is None else str(path), "device": str(dev),
                        "backend": backend}  # fmt: skip
        if backend == "onnxruntime":
            from im2hands_model.pipeline.onnx_backend import onnx_networks

            model.nets = onnx_networks(nets, dev)
            model.backend = "onnxruntime"
        return model

    def configured(self, **changes: Any) -> Im2Hands:
        """The same networks with some :class:`PipelineConfig` fields changed."""
        model = Im2Hands(self.nets, replace(self.config, **changes), self.device, self.backend)
        model.source = self.source
        detector_keys = {"keypoint_source", "track_hands", "smooth_keypoints", "detector_variant",
                         "presence_threshold"}  # fmt: skip
        if not detector_keys & set(changes):
            model._mediapipe = self._mediapipe
        return model

    # ------------------------------------------------------------------ the pipeline
    @property
    def resolution(self) -> int:
        if self.config.resolution is not None:
            return self.config.resolution
        return 256 if self.device.type == "cuda" else 128

    @torch.inference_mode()
    def __call__(self, image: Any, intrinsics: Any, keypoints: Any = None, depth: Any = None,
                 stamp: float | None = None, prior: Any = None) -> Reconstruction:  # fmt: skip
        """Reconstruct both hands of one frame.

        Args:
            image: RGB ``uint8 [H, W, 3]`` (also grey, RGBA, uint16, float in [0, 1], PIL).
            intrinsics: ``[3, 3]`` camera matrix of the full image (pixels).
            keypoints: the caller's keypoints (``[2, 21, 3]`` camera frame, metres, NaN rows for
                an absent hand; or ``{"left": ..., "right": ...}``); required for the ``given``
                source and used instead of any other source when passed.
            depth: optional depth image registered to ``image`` (``uint16`` millimetres or
                float metres, 0/NaN = no measurement); the MediaPipe source then places each
                hand from it (a depth image that does not fit is ignored with a warning, see
                :attr:`keypoint_report`).
            stamp: the frame's time in seconds (tracking and smoothing; default 30 Hz).
            prior: a guess of this frame's occupancy, with ``values(hand, camera points)``
                (e.g. the previous frame's carried to these keypoints,
                :class:`~im2hands_model.pipeline.reposing.ReposedOccupancy`): MISE's coarse
                level reads it instead of running I (see ``meshing.mise_grid``).

        Returns:
            :class:`~im2hands_model.pipeline.result.Reconstruction` (``.empty`` with a
            ``message`` when no hand is found).

        Raises:
            InputError: unusable image, intrinsics or keypoints (the message says why).
        """
        cfg = self.config
        timer = _Timer(self.device)
        t_start = timer.now()
        frame = Frame.from_input(image, intrinsics, cfg.max_pixels)
        with timer.stage("keypoints"):
            found = self._keypoints(frame, keypoints, depth, stamp)  # source (MediaPipe...)
        if not found.any:
            return self._empty(timer, t_start, "no hand found")
        use_k = self._uses_k(keypoints)
        with timer.stage("K") if use_k else nullcontext():
            found = self._refine_keypoints(frame, found) if use_k else found  # K
        crop = _Crop(frame, found, self.device)  # the training-style crop around the hands
        occupancy_stages = self._reference_occupancy if cfg.reference else self._occupancy
        meshes, occupancy, queries = occupancy_stages(crop, timer, prior)  # I, R, meshing
        with timer.stage("contacts"):
            contacts = hand_contacts(meshes, cfg.contact_distance, cfg.voxel_size, occupancy)
        result = self._result(frame, crop, found, meshes, contacts, queries, timer, t_start)
        if cfg.keep_occupancy:
            result.occupancy = occupancy
        return result

    @torch.inference_mode()
    def find_keypoints(self, image: Any, intrinsics: Any, keypoints: Any = None,
                       depth: Any = None, stamp: float | None = None) -> Keypoints:  # fmt: skip
        """The keypoint stages alone (the source, then K where it runs), as ``__call__`` runs
        them: what a video runs on every frame
        (:class:`~im2hands_model.pipeline.video.VideoReconstruction`). Arguments as there."""
        frame = Frame.from_input(image, intrinsics, self.config.max_pixels)
        found = self._keypoints(frame, keypoints, depth, stamp)
        if found.any and self._uses_k(keypoints):
            found = self._refine_keypoints(frame, found)
        return found

    def _uses_k(self, keypoints: Any) -> bool:
        """K runs when switched on, or by default on the learned predictor's keypoints."""
        cfg = self.config
        learned = keypoints is None and cfg.keypoint_source == "learned"
        return bool(cfg.refine_keypoints or (cfg.refine_keypoints is None and learned))

    def _result(self, frame: Frame, crop: _Crop, found: Keypoints, meshes: list,
                contacts: ContactReport, queries: dict, timer: _Timer, t_start: float,
                ) -> Reconstruction:  # fmt: skip
        hands: list[HandResult | None] = [
            HandResult(
                name, meshes[h].to_trimesh(), found.joints[h].copy(), float(found.confidence[h])
            )  # fmt: skip
            if found.present[h] and meshes[h] is not None
            else None
            for h, name in enumerate(HAND_NAMES)
        ]
        timer.add("total", timer.now() - t_start)
        message = "" if any(hands) else "hands found, but no surface extracted"
        window = crop.window
        return Reconstruction(
            hands, contacts, timer.ms, queries, window.intrinsics(frame.K),
            (window.x0, window.y0, window.side), message,
        )  # fmt: skip

    def _occupancy(self, crop: _Crop, timer: _Timer, prior: Any = None,
                   ) -> tuple[list, GridOccupancy, dict]:  # fmt: skip
        """I, then R, meshed fast: ``(camera-frame meshes, their grid, queries per stage)``.

        Time is booked per stage: network time (encoders and queries) under ``I`` / ``R``, the
        rest of the extraction (grid bookkeeping, marching cubes, anchors) under ``meshing``.
        """
        cfg = self.config
        t_start = timer.now()
        init_net = self.nets["ref_occ"].init if cfg.use_image else self.nets["halo"]
        shortcuts = Shortcuts(SKIP_DISTANCE_M, cfg.cull_parts)
        init = InitialField(init_net, crop.image, crop.intrinsics, crop.joints, crop.present,
                            shortcuts)  # fmt: skip
        steps = int(round(math.log2(self.resolution / cfg.coarse_resolution)))
        grid, _ = mise_grid(
            init, 2, cfg.coarse_resolution, steps, cfg.threshold_i, device=self.device,
            valid=crop.keypoints.present.tolist(), dilate_final=cfg.dilate_final,
            prior=None if prior is None else _prior_fn(prior, crop),
        )  # fmt: skip
        threshold = cfg.threshold_i
        meshes = crop.to_camera(grid_meshes(grid, threshold))
        queries = {"I": init.evaluated}
        network = {"I": init.seconds, "R": 0.0}
        if (cfg.refine_occupancy and cfg.use_image and any(m is not None for m in meshes)
                and not self._hands_apart(crop.keypoints)):  # fmt: skip
            before = init.seconds
            refined = RefinedField(self.nets["ref_occ"], init, crop.image, meshes, cfg.seed)
            near = None if cfg.refine_radius_m is None or not crop.keypoints.present.all() \
                else _near_other_hand(crop, cfg.refine_radius_m)
            grid, _ = band_refined_grid(
                grid, cfg.threshold_i, refined.features, refined.head, cfg.refine_band_coarse,
                near_fn=near, out_threshold=cfg.threshold_r,
            )  # fmt: skip
            threshold = cfg.threshold_r
            meshes = crop.to_camera(grid_meshes(grid, threshold))
            inside_r = init.seconds - before  # I's logits at R's queries: booked under I
            network["I"] += inside_r
            network["R"] = refined.seconds - inside_r
            queries["R"] = refined.evaluated
        for stage, seconds in network.items():
            if seconds:
                timer.add(stage, seconds)
        timer.add("meshing", max(timer.now() - t_start - sum(network.values()), 0.0))
        return meshes, GridOccupancy(grid, threshold, crop.rot, crop.origin), queries

    def _hands_apart(self, keypoints: Keypoints) -> bool:
        """Both hands found and their skeletons more than ``skip_r_gap_m`` apart."""
        gap = self.config.skip_r_gap_m
        if gap is None or not keypoints.present.all():
            return False
        a, b = keypoints.joints
        return bool(np.linalg.norm(a[:, None] - b[None], axis=-1).min() > gap)

    def _reference_occupancy(self, crop: _Crop, timer: _Timer, prior: Any = None,
                             ) -> tuple[list, None, dict]:  # fmt: skip
        """The paper protocol (:mod:`~im2hands_model.pipeline.reference`); contacts then test
        the meshes themselves."""
        cfg = self.config
        t_start = timer.now()
        init_net = self.nets["ref_occ"].init if cfg.use_image else self.nets["halo"]
        refined = self.nets["ref_occ"] if cfg.refine_occupancy and cfg.use_image else None
        meshes, queries, seconds = reference_meshes(
            init_net, refined, crop.image, crop.intrinsics, crop.joints, crop.present,
            cfg.threshold_i, cfg.threshold_r, cfg.seed,
        )  # fmt: skip
        timer.add("I", seconds["I"])
        if refined is not None:
            timer.add("R", seconds["R"])
        else:
            queries.pop("R")
        timer.add("meshing", max(timer.now() - t_start - sum(seconds.values()), 0.0))
        return meshes, None, queries

    # ------------------------------------------------------------------ stages
    @property
    def keypoint_report(self) -> Any:
        """What the MediaPipe source did on the last frame
        (:class:`~im2hands_model.hand_tracking.source.FrameReport`), ``None`` before."""
        return None if self._mediapipe is None else self._mediapipe.last

    def reset_tracking(self) -> None:
        """Forget the tracked hands (the next frame starts a new video)."""
        if self._mediapipe is not None and hasattr(self._mediapipe, "reset"):
            self._mediapipe.reset()

    def _keypoints(self, frame: Frame, keypoints: Any, depth: Any, stamp: float | None
                   ) -> Keypoints:  # fmt: skip
        if keypoints is not None:
            return given_keypoints(keypoints, frame)
        source = self.config.keypoint_source
        if source == "given":
            raise ValueError("keypoint_source='given' needs keypoints=... in every call")
        if source == "mediapipe":
            cfg = self.config
            if self._mediapipe is None:
                from im2hands_model.hand_tracking.source import (
                    DetectorConfig,
                    HandTracker,
                    MediaPipeHands,
                )

                settings = DetectorConfig(variant=cfg.detector_variant,
                                          presence_threshold=cfg.presence_threshold,
                                          smoothing=cfg.smooth_keypoints)  # fmt: skip
                self._mediapipe = (HandTracker if cfg.track_hands else MediaPipeHands)(settings)
            if cfg.track_hands:
                return self._mediapipe(frame.rgb, frame.K, depth, stamp)
            return self._mediapipe(frame.rgb, frame.K, depth)
        learned = LearnedKeypoints(self.nets["kpts_pred"], 2, self.config.presence_threshold)
        return learned(frame)

    def _refine_keypoints(self, frame: Frame, found: Keypoints) -> Keypoints:
        crop = _Crop(frame, found, self.device)
        refined = self.nets["kpts_ref"](crop.joints, crop.present, image=crop.image,
                                         K=crop.intrinsics)  # fmt: skip
        refined = refined[0].cpu().numpy()
        out = replace(found, joints=np.where(found.present[:, None, None], refined, found.joints))
        out.joints_2d = None
        return given_keypoints(out, frame)

    def _empty(self, timer: _Timer, t_start: float, message: str) -> Reconstruction:
        timer.add("total", timer.now() - t_start)
        report = ContactReport(contact_distance=self.config.contact_distance)
        return Reconstruction([None, None], report, timer.ms, message=message)

    def describe(self) -> dict[str, Any]:
        """Settings for logs and benchmark JSON."""
        return {"backend": self.backend, "device": str(self.device),
                "resolution": self.resolution, **asdict(self.config)}  # fmt: skip
