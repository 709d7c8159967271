"""``im2hands-ros-demo``: the node as users run it, measured end to end (the README's main job).

Three processes on this machine only (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a domain id
of their own, the shipped Fast DDS profile):

1. ``im2hands-synthetic-camera``: rendered two-hand VGA frames + ``CameraInfo`` at ``--rate`` Hz,
   with ground truth on side topics;
2. ``im2hands-node``: the reconstruction node with its default keypoint source (MediaPipe's hand
   models, tracked, placed with the camera's rendered depth image); ``--keypoints topic`` takes
   the camera's ground-truth keypoints instead (the paper's main table protocol) and
   ``--keypoints learned`` the shipped predictor;
3. this process: a :class:`~im2hands_ros.recorder.Recorder` that measures the latency from each
   image's stamp to the arrival of its ``/hands/mesh``, saves a few meshes (``.ply``) and
   overlays (``.png``), and afterwards scores IoU against the ground truth (paper protocol,
   fewer sample points).

The report is printed and written to ``<out>/demo_report.json``: ``latency_ms_median``,
``latency_ms_p95``, ``pipeline_ms_median`` (the node's own pipeline time), ``frames_in`` /
``frames_out`` (node), ``mesh_rate_hz`` (published frames that carried meshes per second),
``iou`` (mean % over the last scored frames; a tracked node's keypoint-only frames carry no
mesh and are not scored), ``keypoint_error`` (the node's keypoints against the
camera's ground truth: hands found, MPJPE after joint-9 alignment and root error, mm), and
details.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from im2hands_model.io import cpu_seconds

__all__ = ["main"]


def _env(domain_id: int | None) -> dict[str, str]:
    from im2hands_ros.fastdds import use_shipped_profile

    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    # a domain of its own (not the shell's), so the demo never meets a robot's nodes; Fast DDS
    # on Linux accepts 0..101
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else os.getpid() % 90 + 1)
    env["PYTHONUNBUFFERED"] = "1"
    use_shipped_profile(env)
    return env


def console_script(name: str) -> str:
    """The path of console script ``name`` next to this Python (a venv's ``bin``), or the bare
    name for ``PATH`` lookup."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def spawn_logged(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``args`` in a new session (its own process group), stdout and stderr to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGINT (a clean rclpy shutdown), SIGKILL after ``timeout`` seconds; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2500:]
    raise RuntimeError(f"{what} did not start (see {log}):\n{tail}")


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _score(frames: list[Any], n_points: int) -> list[dict[str, Any]]:
    """IoU (percent) of each recorded frame's hands against its ground truth."""
    import trimesh

    from im2hands_model.evaluation import hand_metrics

    rows = []
    for i, rec in enumerate(frames):
        rng = np.random.default_rng(i)
        scores = {}
        for h, side in enumerate(("left", "right")):
            gt = rec.gt_meshes.get(side)
            if gt is None:
                continue
            pred = rec.meshes.get(side)
            mesh = trimesh.Trimesh(*pred, process=False) if pred is not None else None
            m = hand_metrics(mesh, gt[0], gt[1], None, rec.gt_keypoints[h], rng, n_points, 1000)
            scores[side] = float(m["iou"])
        if scores:
            rows.append({"stamp": list(rec.stamp), "iou": scores,
                         "mean_iou": float(np.mean(list(scores.values())))})  # fmt: skip
    return rows


def _keypoint_error(frames: list[Any]) -> dict[str, Any]:
    """The node's keypoints against the ground truth of the same frames: share of GT hands
    found, MPJPE after joint-9 alignment and root (joint 9) error, both mean mm."""
    from im2hands_model.hands import MID_JOINT
    from im2hands_model.metrics import joint_errors_mm

    found = total = 0
    aligned, root = [], []
    for rec in frames:
        for h, side in enumerate(("left", "right")):
            gt = rec.gt_keypoints[h] if rec.gt_keypoints is not None else None
            if gt is None or not np.isfinite(gt).all():
                continue
            total += 1
            pred = rec.keypoints.get(side)
            if pred is None:
                continue
            found += 1
            aligned.append(float(joint_errors_mm(pred, gt).mean()))
            root.append(1e3 * np.linalg.norm(pred[MID_JOINT] - gt[MID_JOINT]))
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"hands_found_pct": 100.0 * found / total if total else None,
            "mpjpe_aligned_mm": mean(aligned), "root_error_mm": mean(root), "hands": total}


def _children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux ``/proc``; none where it cannot be read)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def _cpu_sum(pids: list[int]) -> float | None:
    """CPU seconds of ``pids`` together (``None`` for no process)."""
    times = [cpu_seconds(p) for p in pids]
    return sum(t for t in times if t is not None) if pids else None


def _save(frames: list[Any], out: Path, n: int) -> list[str]:
    """PLY meshes of the first ``n`` recorded frames with meshes, overlays of those with one,
    and a strip of the overlays (``overview.png``)."""
    import trimesh
    from PIL import Image as PILImage

    written: list[str] = []
    with_mesh = [r for r in frames if any(v is not None for v in r.meshes.values())][:n]
    for i, rec in enumerate(with_mesh):
        for side, arrays in rec.meshes.items():
            if arrays is not None:
                path = out / f"frame{i}_{side}.ply"
                trimesh.Trimesh(*arrays, process=False).export(path)
                written.append(str(path))
    overlays = [r.overlay for r in frames if r.overlay is not None][:n]
    for i, rgb in enumerate(overlays):
        path = out / f"overlay{i}.png"
        PILImage.fromarray(rgb).save(path)
        written.append(str(path))
    if overlays:
        thumbs = [PILImage.fromarray(o).resize((320, 240)) for o in overlays]
        strip = PILImage.new("RGB", (320 * len(thumbs), 240))
        for i, t in enumerate(thumbs):
            strip.paste(t, (320 * i, 0))
        strip.save(out / "overview.png")
        written.append(str(out / "overview.png"))
    return written


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    frames_dir = out / "ros_demo"
    frames_dir.mkdir(parents=True, exist_ok=True)
    env = _env(args.domain_id)
    os.environ.update(env)  # this process (the recorder) too, before rclpy creates a participant
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from im2hands_ros.recorder import Recorder

    print(f"ROS domain {env['ROS_DOMAIN_ID']}, discovery localhost only; logs in {frames_dir}/")
    node_params = [f"device:={args.device}", f"resolution:={args.resolution}",
                   f"keypoint_source:={args.keypoints}", "debug_image_rate:=1.0",
                   f"threads:={args.threads}",
                   f"use_depth:={str(args.keypoints == 'mediapipe').lower()}",
                   f"tracked_meshes:={str(args.tracked).lower()}"]  # fmt: skip
    node_cmd = [console_script("im2hands-node"), "--ros-args",
                *[a for p in node_params for a in ("-p", p)],
                "-r", "keypoints:=ground_truth/keypoints"]  # fmt: skip
    cam_cmd = [console_script("im2hands-synthetic-camera"), "--ros-args",
               "-p", f"rate:={args.rate}", "-p", f"frames:={args.frames}",
               "-p", f"realism:={str(args.realism).lower()}",
               "-p", f"sequence:={args.sequence}"]  # fmt: skip
    procs: list[subprocess.Popen] = []
    rclpy.init()
    ros_node = rclpy.create_node("im2hands_demo_recorder")
    recorder = Recorder(ros_node)
    executor = SingleThreadedExecutor()
    executor.add_node(ros_node)
    try:
        node_log, cam_log = frames_dir / "node.log", frames_dir / "camera.log"
        procs.append(spawn_logged(node_cmd, node_log, env))
        procs.append(spawn_logged(cam_cmd, cam_log, env))
        print("starting the node (model + warm-up) and the camera (rendering frames) ...")
        _wait_log(node_log, "active: listening", procs[0], 300, "im2hands-node")
        _wait_log(cam_log, "ready", procs[1], 300, "im2hands-synthetic-camera")
        t_end = time.monotonic() + args.warmup
        while time.monotonic() < t_end:
            executor.spin_once(timeout_sec=0.05)
        skip = len(recorder.latencies_ms)
        start = recorder.snapshot()["diagnostics"]
        workers = _children(procs[0].pid)  # the node's reconstruction process, when tracked
        cpu0 = [cpu_seconds(procs[0].pid), _cpu_sum(workers), cpu_seconds(procs[1].pid),
                cpu_seconds()]  # fmt: skip
        print(f"measuring for {args.duration:.0f} s at {args.rate:g} Hz ...")
        t_end = time.monotonic() + args.duration
        while time.monotonic() < t_end:
            executor.spin_once(timeout_sec=0.05)
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}")
        cpu1 = [cpu_seconds(procs[0].pid), _cpu_sum(workers), cpu_seconds(procs[1].pid),
                cpu_seconds()]  # fmt: skip
        t_end = time.monotonic() + 1.5  # the last diagnostics
        while time.monotonic() < t_end:
            executor.spin_once(timeout_sec=0.05)
    finally:
        codes = [stop_process(p) for p in procs]
        executor.shutdown()
        ros_node.destroy_node()
        rclpy.try_shutdown()
    snap = recorder.snapshot()
    diag = snap["diagnostics"]
    lat = snap["latencies_ms"][skip:]
    num = lambda d, k: float(d[k]) if d.get(k, "n/a") != "n/a" else None  # noqa: E731
    delta = lambda k: int(diag.get(k, 0)) - int(start.get(k, 0))  # noqa: E731
    frames_in, frames_out = delta("frames_in"), delta("frames_out")
    # published frames that carried meshes (tracked: full or re-posed, not keypoints only)
    meshed = (delta("meshes_full") + delta("meshes_reposed")) if args.tracked \
        else frames_out - delta("no_hand")
    complete = recorder.complete_frames()
    # a tracked node's keypoint-only frames (re-posing paused until the next full shape) carry
    # no mesh to score: they count in output_rate_hz, not in mesh_rate_hz or the IoU
    to_score = ([r for r in complete if any(m is not None for m in r.meshes.values())]
                if args.tracked else complete)  # fmt: skip
    print(f"scoring IoU on {min(len(to_score), args.iou_frames)} received frames ...")
    scored = _score(to_score[-args.iou_frames :], args.iou_points)
    written = _save(complete, frames_dir, args.save)
    pipeline_median = num(diag, "pipeline_ms_median")
    lat_median = _percentile(lat, 50)
    report = {
        "latency_ms_median": lat_median,
        "latency_ms_p95": _percentile(lat, 95),
        "pipeline_ms_median": pipeline_median,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "iou": float(np.mean([r["mean_iou"] for r in scored])) if scored else None,
        "keypoint_error": _keypoint_error(complete[-args.iou_frames :]),
        "latency_over_pipeline": (lat_median / pipeline_median)
        if lat_median and pipeline_median
        else None,
        "input_rate_hz": args.rate,
        "output_rate_hz": frames_out / args.duration,
        "mesh_rate_hz": meshed / args.duration,
        "measured_s": args.duration,
        "drops": {
            k[len("dropped_") :]: int(v) - int(start.get(k, 0))
            for k, v in diag.items()
            if k.startswith("dropped_")
        },  # fmt: skip
        "cpu_percent": {
            name: 100 * (b - a) / args.duration if a is not None and b is not None else None
            for name, a, b in zip(("node", "node_workers", "camera", "recorder"), cpu0, cpu1,
                                  strict=True)  # fmt: skip
        },
        "cpu_count": os.cpu_count(),
        "keypoints": {"topic": "ground truth from the camera (topic)",
                      "learned": "learned predictor",
                      "mediapipe": "MediaPipe (tracked, placed with the depth image)"
                      }[args.keypoints],  # fmt: skip
        "node": {k: diag.get(k) for k in ("backend", "device", "resolution")},
        "tracked_meshes": args.tracked,
        "camera_sequence_keys": args.sequence,
        "tracked": {k: diag.get(k) for k in ("meshes_full", "meshes_reposed", "keypoints_only",
                                              "full_failed", "shape_age_s_median")
                    if k in diag},  # fmt: skip
        "iou_frames": scored,
        "files": written,
        "exit_codes": {"node": codes[0], "camera": codes[1]},
        "latency_definition": "arrival of /hands/mesh at a subscriber minus the image stamp",
    }
    path = out / "demo_report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return report


def _print(report: dict[str, Any], out: Path) -> None:
    f = lambda v, fmt="{:.0f}": "n/a" if v is None else fmt.format(v)  # noqa: E731
    print()
    print(f"im2hands ROS demo: {report['input_rate_hz']:g} Hz VGA in for "
          f"{report['measured_s']:.0f} s, keypoints: {report['keypoints']}")  # fmt: skip
    print(f"  node on {report['node'].get('device')} ({report['node'].get('backend')}, "
          f"{report['node'].get('resolution')}^3)")  # fmt: skip
    print(f"  frames in / out      {report['frames_in']} / {report['frames_out']} "
          f"({report['output_rate_hz']:.1f} Hz out; drops {report['drops']})")  # fmt: skip
    print(f"  meshes out           {report['mesh_rate_hz']:.1f} Hz (published frames with "
          "meshes; the others carried keypoints only or no hand)")
    print(f"  pipeline median      {f(report['pipeline_ms_median'])} ms")
    print(f"  latency median / p95 {f(report['latency_ms_median'])} / "
          f"{f(report['latency_ms_p95'])} ms  (image stamp -> /hands/mesh received; "
          f"{f(report['latency_over_pipeline'], '{:.2f}')}x the pipeline)")  # fmt: skip
    cpu = report["cpu_percent"]
    print(f"  CPU (100 % = 1 core) node {f(cpu['node'])} % (+ its worker processes "
          f"{f(cpu['node_workers'])} %), camera {f(cpu['camera'])} %, "
          f"recorder {f(cpu['recorder'])} % of {report['cpu_count']} cores")  # fmt: skip
    print(f"  IoU vs ground truth  {f(report['iou'], '{:.1f}')} % "
          f"({len(report['iou_frames'])} frames)")  # fmt: skip
    if report.get("tracked"):
        print(f"  tracked meshes       {report['tracked']}")
    kp = report["keypoint_error"]
    print(f"  keypoints vs GT      {f(kp['hands_found_pct'])} % of {kp['hands']} hands found, "
          f"{f(kp['mpjpe_aligned_mm'])} mm aligned, {f(kp['root_error_mm'])} mm root (joint 9)")
    print(f"  report: {out / 'demo_report.json'}; meshes and overlays: {out / 'ros_demo'}/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="im2hands-ros-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--rate", type=float, default=30.0, help="camera frames per second")
    p.add_argument("--frames", type=int, default=8, help="distinct rendered frames, cycled")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--keypoints", choices=("mediapipe", "topic", "learned"), default="mediapipe",
                   help="mediapipe (default): the node's MediaPipe source; topic: the camera's "
                   "GT keypoints; learned: the predictor")  # fmt: skip
    p.add_argument("--realism", action="store_true",
                   help="the camera renders forearms, photo backgrounds and camera effects")
    p.add_argument("--tracked", action="store_true",
                   help="the node re-poses meshes between full reconstructions (tracked_meshes)")
    p.add_argument("--sequence", type=int, default=0,
                   help="the camera plays moving hands through this many key scenes (0: stills)")
    p.add_argument("--device", default="cpu", help="node device (auto, cpu, cuda)")
    p.add_argument("--resolution", type=int, default=0, help="node mesh resolution (0: auto)")
    p.add_argument("--threads", type=int, default=0, help="node torch threads (0: default)")
    p.add_argument("--save", type=int, default=4, help="frames saved as PLY + overlay PNG")
    p.add_argument("--iou-frames", type=int, default=8, help="frames scored against GT")
    p.add_argument("--iou-points", type=int, default=50_000, help="IoU sample points per hand")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: own)")
    args = p.parse_args(argv)  # fmt: skip
    if args.rate <= 0 or args.duration <= 0 or args.frames < 1:
        p.error("--rate and --duration must be > 0, --frames >= 1")
    try:
        report = run(args)
    except (RuntimeError, OSError) as exc:
        print(f"im2hands-ros-demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    _print(report, Path(args.out))
    return 0 if report["frames_out"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
