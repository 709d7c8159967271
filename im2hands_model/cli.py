"""The ``im2hands`` command: ``reconstruct`` an image, ``bench`` the pipeline, ``export-onnx``.

    im2hands reconstruct IMAGE [--camera-info FILE.yaml | --fx F --fy F --cx C --cy C]
                         [--depth DEPTH.png|.npy] -o OUT
    im2hands bench [--frames N] [--device cpu|cuda] [--json FILE]
    im2hands bench-keypoints [--frames N] [--seed S] [--json FILE]
    im2hands demo -o OUT
    im2hands export-onnx OUT_DIR
    im2hands fetch-models

The default keypoint source is ``mediapipe`` (MediaPipe's hand models, installed by
``im2hands fetch-models``, which ``make setup`` runs).

``reconstruct`` writes ``left.ply`` / ``right.ply`` (the hands it found), ``keypoints.json``,
``contacts.json`` and ``overlay.png`` into OUT; it exits with status 1 and says so when no hand is
found, and 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from im2hands_model.pipeline.frame import default_intrinsics

__all__ = ["default_intrinsics", "main", "read_camera_info"]


def read_camera_info(path: str | Path) -> np.ndarray:
    """``[3, 3]`` intrinsics from a camera YAML file.

    Accepts the ROS ``camera_calibration`` format (``camera_matrix: {data: [9 numbers]}``), a
    dumped ``sensor_msgs/CameraInfo`` (``k:`` or ``K:``, 9 numbers) or a plain 3x3 list.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"camera info file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    values: Any = None
    if isinstance(data, dict):
        if isinstance(data.get("camera_matrix"), dict):
            values = data["camera_matrix"].get("data")
        else:
            values = data.get("k", data.get("K"))
    elif isinstance(data, list):
        values = data
    try:
        K = np.asarray(values, dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: no 3x3 camera matrix found (expected camera_matrix.data, k or K)"
        ) from None
    return K


def _model(args: argparse.Namespace, **config: Any):
    from im2hands_model.pipeline import Im2Hands

    return Im2Hands.from_pretrained(args.weights, device=args.device, backend=args.backend,
                                    **config)  # fmt: skip


def _write_ply(mesh: Any, path: Path) -> None:
    from im2hands_model.io import atomic_write

    atomic_write(path, lambda tmp: mesh.export(tmp, file_type="ply"))


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from im2hands_model.pipeline import InputError
    from im2hands_model.pipeline.overlay import overlay

    try:
        with Image.open(args.image) as im:
            image = np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        print(f"error: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    h, w = image.shape[:2]
    manual = [args.fx, args.fy, args.cx, args.cy]
    try:
        if args.camera_info:
            K = read_camera_info(args.camera_info)
        elif any(v is not None for v in manual):
            if any(v is None for v in manual):
                raise ValueError("give all of --fx --fy --cx --cy, or --camera-info")
            K = np.array([[args.fx, 0, args.cx], [0, args.fy, args.cy], [0, 0, 1]], float)
        else:
            K = default_intrinsics(w, h)
            print(f"note: no intrinsics given; assuming fx = fy = {K[0, 0]:.0f} px, principal "
                  "point at the image centre (pass --camera-info or --fx/--fy/--cx/--cy)",
                  file=sys.stderr)  # fmt: skip
        keypoints = None
        if args.keypoints:
            keypoints = json.loads(Path(args.keypoints).read_text())
            keypoints = {k: keypoints.get(k) for k in ("left", "right")}
            keypoints = {
                k: (v["joints"] if isinstance(v, dict) else v) for k, v in keypoints.items()
            }
        depth = _read_depth(args.depth) if args.depth else None
        model = _model(args, **_config(args))
        result = model(image, K, keypoints=keypoints, depth=depth)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # the MediaPipe model files (ModelFileError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for hand in result.hands:
        if hand is not None:
            _write_ply(hand.mesh, out / f"{hand.side}.ply")
    for side in ("left", "right"):  # no stale mesh from an earlier run into the same folder
        if getattr(result, side) is None and (out / f"{side}.ply").exists():
            (out / f"{side}.ply").unlink()
    kp = result.keypoints_dict()
    kp["timings_ms"] = {k: round(v, 2) for k, v in result.timings_ms.items()}
    (out / "keypoints.json").write_text(json.dumps(kp, indent=2) + "\n")
    (out / "contacts.json").write_text(json.dumps(result.contacts.to_dict(), indent=2) + "\n")
    Image.fromarray(overlay(image, K, result)).save(out / "overlay.png")
    if result.empty:
        print(f"no hand found in {args.image} ({result.message}); wrote {out}/overlay.png "
              "and empty keypoints.json", file=sys.stderr)  # fmt: skip
        return 1
    found = ", ".join(
        f"{h.side} ({len(h.mesh.vertices)} vertices, confidence {h.confidence:.2f})"
        for h in result.hands
        if h is not None
    )
    c = result.contacts
    print(f"{found}; contact area {c.contact_area_cm2:.2f} cm2, penetration "
          f"{c.penetration_volume_cm3:.3f} cm3; {result.timings_ms['total']:.0f} ms")  # fmt: skip
    print(f"wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def _read_depth(path: str) -> np.ndarray:
    """A depth image: ``.npy`` (float metres or uint16 millimetres) or a 16-bit PNG (mm)."""
    from PIL import Image

    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as exc:
        raise ValueError(f"cannot read depth image {path}: {exc}") from exc
    if arr.dtype == np.int32 and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # PIL opens some 16-bit PNGs as 32-bit integers
    if arr.dtype != np.uint16:
        raise ValueError(f"depth image {path} must be 16-bit millimetres, got {arr.dtype}")
    return arr


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from im2hands_model.hand_tracking.models import MODEL_FILES, fetch_models

    try:
        folder = fetch_models(Path(args.dir) if args.dir else None,
                              Path(args.wheel) if args.wheel else None)  # fmt: skip
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MediaPipe hand models (Apache-2.0) in {folder}: " + ", ".join(MODEL_FILES))
    return 0


def cmd_bench_keypoints(args: argparse.Namespace) -> int:
    from im2hands_model.hand_tracking.bench import (
        format_table,
        load_frames,
        run_keypoint_bench,
        write_json,
    )

    frames = load_frames(args.frames, args.seed, Path(args.cache) if args.cache else None,
                         realism=args.realism)  # fmt: skip
    report = run_keypoint_bench(frames, learned=not args.no_learned)
    report.update(seed=args.seed, realism=args.realism)
    print(format_table(report))
    if args.json:
        write_json(report, Path(args.json))
        print(f"wrote {args.json}")
    if args.pictures:
        from PIL import Image

        from im2hands_model.hand_tracking.bench import picture

        photos = [np.asarray(Image.open(p).convert("RGB")) for p in args.photos]
        picture(frames, photos, Path(args.pictures))
        print(f"wrote {args.pictures}")
    return 0


def _config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"keypoint_source": args.keypoint_source}
    if args.no_k:
        cfg["refine_keypoints"] = False
    if args.no_r:
        cfg["refine_occupancy"] = False
    if args.halo:
        cfg.update(use_image=False, refine_occupancy=False)
    if args.resolution:
        cfg["resolution"] = args.resolution
    return cfg


def _bench_model(args: argparse.Namespace) -> Any:
    """The pipeline a benchmark command asked for, with its torch thread count."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return _model(args, **_config(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from im2hands_model.pipeline.bench import format_report, run_bench, synthetic_frames, write_json

    model = _bench_model(args)
    frames = synthetic_frames(args.frames, progress=not args.quiet)
    report = run_bench(model, frames, args.reference_frames, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def cmd_bench_tracking(args: argparse.Namespace) -> int:
    from im2hands_model.pipeline.bench import write_json
    from im2hands_model.pipeline.tracking_bench import (
        format_tracking_report,
        run_tracking_bench,
        sequence_frames,
    )

    model = _bench_model(args)
    frames = sequence_frames(args.seed, args.keys, seconds_per_key=args.seconds_per_key)
    report = run_tracking_bench(model, frames, camera_process=not args.no_camera_process,
                                progress=not args.quiet,
                                max_part_turn_deg=args.max_part_turn_deg,
                                worker=args.worker)  # fmt: skip
    print(format_tracking_report(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        from im2hands_model.pipeline.tracking_bench import plot_tracking

        print(f"wrote {plot_tracking(report, args.plot)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Rendered camera frames through the pipeline: meshes, keypoints, contacts and overlays,
    once with the ground-truth keypoints and once finding the hands with the keypoint source
    (default MediaPipe), whose keypoint error against the ground truth is printed beside IoU.

    With MediaPipe each rendered frame is played as a short still video (``--video-frames``
    calls, tracking reset between scenes, with the camera's rendered depth): the first call
    detects the hands, the others track them, and both keypoint times are printed."""
    from PIL import Image

    from im2hands_model.pipeline.bench import frame_iou, synthetic_frames
    from im2hands_model.pipeline.overlay import overlay

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tracked = args.keypoint_source == "mediapipe"
    model = _model(args, **_config(args), track_hands=tracked)
    frames = synthetic_frames(args.frames, progress=True, realism=args.realism)
    model(frames[0].image, frames[0].K)  # warm-up
    rows = []
    for i, frame in enumerate(frames):
        tiles = [frame.image]
        detected = f"{args.keypoint_source}_keypoints"
        if tracked:
            model.reset_tracking()  # a new scene
            times = []
            for k in range(max(args.video_frames, 1)):
                tracked_result = model(frame.image, frame.K, depth=frame.depth, stamp=k / 30.0)
                times.append(tracked_result.timings_ms["keypoints"])
            print(f"frame {i}: keypoints {times[0]:.0f} ms detected, "
                  + (f"{np.median(times[1:]):.0f} ms tracked" if len(times) > 1 else ""))
        for source, kp in (("gt_keypoints", frame.keypoints), (detected, None)):
            if kp is None and tracked:
                result = tracked_result  # the last frame of the still video
            else:
                result = model(frame.image, frame.K, keypoints=kp)
            folder = out / f"frame{i}_{source}"
            folder.mkdir(exist_ok=True)
            for hand in result.hands:
                if hand is not None:
                    _write_ply(hand.mesh, folder / f"{hand.side}.ply")
            (folder / "keypoints.json").write_text(json.dumps(result.keypoints_dict(), indent=2))
            (folder / "contacts.json").write_text(json.dumps(result.contacts.to_dict(), indent=2))
            pic = overlay(frame.image, frame.K, result)
            Image.fromarray(pic).save(folder / "overlay.png")
            tiles.append(pic)
            iou = frame_iou(result, frame, 20_000, i)
            error = "" if kp is not None else f", keypoints {_keypoint_error(result, frame)}"
            print(f"frame {i} ({frame.layout}), {source.replace('_', ' ')}: IoU {iou:.1f} %"
                  f"{error}, "
                  f"{result.timings_ms['total']:.0f} ms, contact area "
                  f"{result.contacts.contact_area_cm2:.2f} cm2 -> {folder}")  # fmt: skip
        rows.append(np.concatenate(tiles, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "overview.png")
    print(f"overview (input | GT keypoints | {args.keypoint_source} keypoints): "
          f"{out / 'overview.png'}")
    return 0


def _keypoint_error(result: Any, frame: Any) -> str:
    """Keypoint error of a result against a rendered frame's ground truth, per side."""
    from im2hands_model.hands import MID_JOINT
    from im2hands_model.metrics import joint_errors_mm

    parts = []
    for h, hand in enumerate(result.hands):
        if not frame.present[h]:
            continue
        if hand is None:
            parts.append(f"{('left', 'right')[h]} missed")
            continue
        pred, gt = np.asarray(hand.keypoints, np.float64), frame.joints[h]
        aligned = joint_errors_mm(pred, gt).mean()
        root = 1e3 * np.linalg.norm(pred[MID_JOINT] - gt[MID_JOINT])
        parts.append(f"{hand.side} {aligned:.0f} mm aligned / {root:.0f} mm root")
    return ", ".join(parts) or "none expected"


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from im2hands_model.pipeline.onnx_backend import export_onnx

    paths = export_onnx(args.out_dir, weights_dir=args.weights)
    for p in paths:
        print(p)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, help="weights folder (default: shipped weights)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    p.add_argument("--keypoint-source", default="mediapipe",
                   choices=("mediapipe", "learned", "given"),
                   help="mediapipe (default: MediaPipe's hand models + two-hand search), "
                   "learned (the shipped predictor) or given (--keypoints)")  # fmt: skip
    p.add_argument("--no-k", action="store_true", help="skip keypoint refinement K")
    p.add_argument("--no-r", action="store_true", help="skip two-hand refinement R")
    p.add_argument("--halo", action="store_true", help="keypoint-only I (HALO), no image")
    p.add_argument("--resolution", type=int, default=None,
                   help="effective grid (default 128 on CPU, 256 on GPU)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="im2hands",
        description="Two-hand reconstruction from an image (Im2Hands): reconstruct an image, "
        "benchmark the pipeline, run the demo, export the networks to ONNX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="reconstruct both hands of one image")
    p.add_argument("image")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--camera-info", default=None, help="camera YAML (ROS camera_calibration)")
    for name in ("fx", "fy", "cx", "cy"):
        p.add_argument(f"--{name}", type=float, default=None, help=f"intrinsics: {name}, pixels")
    p.add_argument(
        "--keypoints", default=None, help="JSON {left: [21x3], right: [21x3]}, metres, camera frame"
    )
    p.add_argument("--depth", default=None,
                   help="depth image registered to IMAGE: 16-bit PNG (mm) or .npy (m or mm)")
    _common(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("bench", help="speed per stage and vs the paper protocol")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument(
        "--reference-frames", type=int, default=2,
        help="frames also run in reference mode (slow: ~40 s each on 2 CPU cores)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-tracking",
                       help="meshes at camera rate on moving hands (tracked vs full)")  # fmt: skip
    p.add_argument("--keys", type=int, default=4, help="key scenes the hands move through")
    p.add_argument("--seconds-per-key", type=float, default=2.0,
                   help="time from one key scene to the next (30 Hz frames)")
    p.add_argument("--seed", type=int, default=4343, help="seed of the key scenes")
    p.add_argument("--worker", default="auto", choices=("auto", "thread", "process"),
                   help="where the full reconstructions run (auto: a second process)")
    p.add_argument("--max-part-turn-deg", type=float, default=None,
                   help="re-posing limit (default: the library's)")
    p.add_argument("--no-camera-process", action="store_true",
                   help="play the frames from this process (no camera process sending them)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write a plot of IoU and rate here (PNG)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_bench_tracking)

    p = sub.add_parser("demo", help="rendered frames through the pipeline, with pictures")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--video-frames", type=int, default=3,
                   help="calls per frame with MediaPipe (1 detects, the rest track)")
    p.add_argument("--realism", action="store_true", help="realistic renders")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench-keypoints", help="keypoint sources on rendered frames")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--seed", type=int, default=300, help="scene seed (300: the test scenes)")
    p.add_argument("--cache", default=None, help="keep the rendered frames in this .npz")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--no-learned", action="store_true", help="skip the learned predictor")
    p.add_argument("--realism", action="store_true",
                   help="realistic renders: views, arms, photo backgrounds, light, camera "
                   "effects")
    p.add_argument("--pictures", default=None, help="write an overlay sheet (JPEG) here")
    p.add_argument("--photos", nargs="*", default=[], help="real photos for the sheet's top row")
    p.set_defaults(func=cmd_bench_keypoints)

    p = sub.add_parser("fetch-models", help="install MediaPipe's hand models (from PyPI)")
    p.add_argument("--dir", default=None, help="target folder (default: in this environment)")
    p.add_argument("--wheel", default=None, help="a downloaded mediapipe 0.10.21 wheel")
    p.set_defaults(func=cmd_fetch_models)

    p = sub.add_parser("export-onnx", help="export the networks to ONNX")
    p.add_argument("out_dir")
    p.add_argument("--weights", default=None, help="weights folder (default: shipped weights)")
    p.set_defaults(func=cmd_export_onnx)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
