"""The node's parameters: one table with names, defaults, descriptions and checks.

``config/im2hands.yaml`` lists the same parameters with the same defaults (a test keeps the two
equal); :func:`declare` puts them on a node with descriptions (``ros2 param describe``), and
:func:`read` turns the node's values into a checked :class:`NodeSettings`. A bad value raises
:class:`SettingsError` with the parameter's name, which the node reports and refuses to configure
with (instead of crashing later on the first frame).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

__all__ = ["PARAMETERS", "NodeSettings", "Param", "SettingsError", "declare", "read"]


class SettingsError(ValueError):
    """A parameter value the node cannot work with (the message names the parameter)."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    @property
    def help(self) -> str:
        """The description, with the allowed values when there is a fixed set."""
        return self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")


PARAMETERS: tuple[Param, ...] = (
    # --- model -------------------------------------------------------------------------------
    Param("weights", "", "Folder with manifest.json and *.safetensors (written by "
          "training/export_weights.py); empty: the weights shipped in the package."),
    Param("device", "auto", "Torch device: auto (CUDA when available), cpu, cuda or cuda:N."),
    Param("backend", "torch", "Network backend: torch, or onnxruntime (networks exported to ONNX "
          "once and cached in ~/.cache/im2hands/onnx).", ("torch", "onnxruntime")),
    Param("threads", 0, "Torch CPU threads for the pipeline; 0: torch's default.", minimum=0),
    Param("warmup_frames", 2, "Frames reconstructed at configure time so that the first real "
          "frame is not slow (first calls allocate and compile).", minimum=0),
    # --- stages ------------------------------------------------------------------------------
    Param("keypoint_source", "mediapipe", "Where the 3D keypoints come from: mediapipe (the "
          "default: MediaPipe's real-photo hand models with im2hands' two-hand search, placement "
          "and tracking), learned (the shipped predictor, trained on renders), or topic (the "
          "'keypoints' input: a geometry_msgs/PoseArray of 42 poses, left joints 0-20 then right "
          "21-41, camera frame, metres, NaN for an absent hand, stamped like the image it "
          "belongs to).", ("mediapipe", "learned", "topic")),
    Param("track_hands", True, "mediapipe: follow the hands from frame to frame (the palm "
          "detector runs only while a hand is missing); false: every frame detected afresh."),
    Param("smooth_keypoints", True, "mediapipe with track_hands: One-Euro smoothing of the "
          "tracked keypoints."),
    Param("use_depth", False, "Subscribe to 'depth' (sensor_msgs/Image, 16UC1 millimetres or "
          "32FC1 metres, registered to the colour image, stamped like it) and place the hands "
          "from it; hands without valid depth fall back to the image-only placement."),
    Param("tracked_meshes", False, "Meshes at camera rate: full reconstructions run on a worker "
          "thread whenever the previous one is done, and every frame gets the latest one "
          "re-posed to its keypoints by the hand parts' rigid transforms (each output's kind and "
          "shape age are counted in /diagnostics); false: every mesh is a full reconstruction, "
          "at the rate the device allows."),
    Param("max_part_turn_deg", 90.0, "tracked_meshes: a frame whose finger parts turned more than "
          "this since the latest full reconstruction gets keypoints only until the next one.",
          minimum=1.0),
    Param("full_worker", "process", "tracked_meshes: where the full reconstructions run: process "
          "(a second process with its own networks, sharing no interpreter lock with the node's "
          "ROS work) or thread.", ("process", "thread")),
    Param("refine_keypoints", "auto", "Stage K (keypoint refinement): auto (on for the learned "
          "predictor's keypoints, which K was trained on; off for mediapipe's and the topic's), "
          "on, off.", ("auto", "on", "off")),
    Param("use_image", True, "Stage I attends to the image (false: keypoint-only HALO)."),
    Param("refine_occupancy", True, "Stage R (two-hand occupancy refinement)."),
    Param("resolution", 0, "Effective mesh grid cells per axis, 32 times a power of two; "
          "0: 128 on the CPU, 256 on a GPU.", minimum=0),
    Param("contact_distance", 0.003, "Vertices closer than this to the other hand touch it "
          "(metres).", minimum=0.0),
    # --- input -------------------------------------------------------------------------------
    Param("image_transport", "raw", "raw: subscribe sensor_msgs/Image on 'image'; compressed: "
          "sensor_msgs/CompressedImage (JPEG/PNG) on '<image>/compressed'.", ("raw", "compressed")),
    Param("qos_reliability", "best_effort", "Reliability of the image, camera_info and keypoints "
          "subscriptions: best_effort (matches every publisher) or reliable (matches reliable "
          "publishers only; the node warns about an incompatible publisher).",
          ("best_effort", "reliable")),
    Param("qos_depth", 1, "Queue depth of the input subscriptions (1: newest frame only).",
          minimum=1),
    Param("max_frame_age", 0.5, "Frames whose stamp is older than this when processing starts are "
          "dropped and counted (seconds; 0: no limit).", minimum=0.0),
    Param("max_pixels", 8192 * 8192, "Larger images are dropped with a warning.", minimum=1),
    # --- output ------------------------------------------------------------------------------
    Param("output_frame", "", "frame_id of every output; empty: the image's frame_id."),
    Param("mesh_rate", 0.0, "Most /hands/mesh MarkerArrays per second (RViz meshes are the "
          "costliest message: ~45 ms per 60k points); 0: every frame. The per-hand mesh clouds "
          "are published for every frame.", minimum=0.0),
    Param("debug_image_rate", 2.0, "Most /hands/debug_image overlays per second; 0: every frame; "
          "negative: never.", minimum=None),
    Param("diagnostics_rate", 1.0, "/diagnostics updates per second.", minimum=0.01),
    Param("autostart", True, "Configure and activate at start-up (an unmanaged node); false: "
          "wait for lifecycle transitions (configure, activate) from a manager."),
)  # fmt: skip


@dataclass(frozen=True)
class NodeSettings:
    """Checked parameter values (names as in :data:`PARAMETERS`)."""

    weights: str
    device: str
    backend: str
    threads: int
    warmup_frames: int
    keypoint_source: str
    track_hands: bool
    smooth_keypoints: bool
    use_depth: bool
    tracked_meshes: bool
    max_part_turn_deg: float
    full_worker: str
    refine_keypoints: str
    use_image: bool
    refine_occupancy: bool
    resolution: int
    contact_distance: float
    image_transport: str
    qos_reliability: str
    qos_depth: int
    max_frame_age: float
    max_pixels: int
    output_frame: str
    mesh_rate: float
    debug_image_rate: float
    diagnostics_rate: float
    autostart: bool

    def pipeline_config(self) -> dict[str, Any]:
        """Keyword arguments of ``Im2Hands.from_pretrained`` for these settings."""
        return {
            "path": self.weights or None,
            "device": self.device,
            "backend": self.backend,
            "keypoint_source": "given" if self.keypoint_source == "topic" else self.keypoint_source,
            "track_hands": self.track_hands,
            "smooth_keypoints": self.smooth_keypoints,
            "refine_keypoints": {"auto": None, "on": True, "off": False}[self.refine_keypoints],
            "use_image": self.use_image,
            "refine_occupancy": self.refine_occupancy,
            "resolution": self.resolution or None,
            "contact_distance": self.contact_distance,
            "max_pixels": self.max_pixels,
        }


assert [p.name for p in PARAMETERS] == [f.name for f in fields(NodeSettings)]


def declare(node: Node) -> None:
    """Declare every parameter on ``node`` with its default and description."""
    for p in PARAMETERS:
        node.declare_parameter(p.name, p.default, ParameterDescriptor(description=p.help))


def check(values: dict[str, Any]) -> NodeSettings:
    """:class:`NodeSettings` of plain values, or :class:`SettingsError` naming the bad one."""
    out: dict[str, Any] = {}
    for p in PARAMETERS:
        v = values.get(p.name, p.default)
        want = type(p.default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise SettingsError(
                f"parameter {p.name!r} must be a {want.__name__}, got {v!r} ({type(v).__name__})"
            )
        if p.choices and v not in p.choices:
            raise SettingsError(f"parameter {p.name!r} must be one of {p.choices}, got {v!r}")
        if p.minimum is not None and v < p.minimum:
            raise SettingsError(f"parameter {p.name!r} must be >= {p.minimum}, got {v!r}")
        out[p.name] = v
    res = out["resolution"]
    if res and (res < 32 or res & (res - 1)):
        raise SettingsError(f"parameter 'resolution' must be 0 or 32 * 2^k (64, 128, 256...), "
                            f"got {res}")  # fmt: skip
    return NodeSettings(**out)


def read(node: Node) -> NodeSettings:
    """The node's current parameter values, checked."""
    return check({p.name: node.get_parameter(p.name).value for p in PARAMETERS})
