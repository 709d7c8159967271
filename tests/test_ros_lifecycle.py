"""A managed im2hands node (``autostart:=false``) driven through its lifecycle by a real client,
with compressed images, the learned keypoint predictor and a reliable subscription; and the
worker thread on its own (newest frame only, age limit, errors)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from ros_helpers import Listener, spawn, stop, wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from im2hands_model.pipeline.bench import synthetic_frames  # noqa: E402
from im2hands_ros import conversions as conv  # noqa: E402
from im2hands_ros.worker import Job, LatestFrameWorker  # noqa: E402


# ---------------------------------------------------------------------------------- worker
def test_worker_processes_only_the_newest_frame_and_counts_the_rest():
    done, drops, gate = [], [], threading.Event()

    def process(job: Job) -> None:
        gate.wait(5)
        done.append(job.payload)

    w = LatestFrameWorker(process, now=time.monotonic, on_drop=lambda j, r: drops.append(r))
    try:
        w.submit(Job(0, time.monotonic()))
        time.sleep(0.1)  # job 0 is running, blocked on the gate
        for i in range(1, 6):
            w.submit(Job(i, time.monotonic()))
        gate.set()
        assert w.wait_idle(5)
        assert done == [0, 5] and drops == ["superseded"] * 4
    finally:
        assert w.stop(5)


def test_worker_drops_frames_older_than_the_limit_and_survives_errors():
    done, drops, errors = [], [], []

    def process(job: Job) -> None:
        if job.payload == "boom":
            raise RuntimeError("bad frame")
        done.append(job.payload)

    w = LatestFrameWorker(process, now=time.monotonic, max_age=0.5,
                          on_drop=lambda j, r: drops.append((j.payload, r)),
                          on_error=lambda j, e: errors.append(str(e)))  # fmt: skip
    try:
        w.submit(Job("old", time.monotonic() - 2.0))
        assert w.wait_idle(5)
        w.submit(Job("boom", time.monotonic()))
        assert w.wait_idle(5)
        w.submit(Job("fresh", time.monotonic()))
        assert w.wait_idle(5)
        assert drops == [("old", "too_old")] and errors == ["bad frame"] and done == ["fresh"]
    finally:
        assert w.stop(5)


def test_worker_loop_on_the_callers_thread_until_stopped():
    done = []
    w = LatestFrameWorker(lambda job: done.append(threading.current_thread().name),
                          now=time.monotonic, start=False)  # fmt: skip
    assert w.stop(1)  # never ran: nothing to wait for
    w = LatestFrameWorker(lambda job: done.append(threading.current_thread().name),
                          now=time.monotonic, start=False)  # fmt: skip

    def feed() -> None:
        w.submit(Job(1, time.monotonic()))
        time.sleep(0.2)
        w.request_stop()

    threading.Thread(target=feed, name="feeder").start()
    w.run()  # returns once the feeder asks it to stop
    assert done == [threading.current_thread().name]


# ---------------------------------------------------------------------------------- lifecycle
def _jpeg(rgb: np.ndarray, header: Header) -> CompressedImage:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return CompressedImage(header=header, format="jpeg", data=buf.getvalue())


def _call(L: Listener, client, request, timeout: float = 120.0, retry_s: float | None = None):
    """The service's reply. ``retry_s`` (for a query, never a transition): ask again when no
    reply came in that time, as a request sent while the service's reply writer is still being
    matched with this client is answered into the void."""
    assert client.wait_for_service(timeout_sec=30), "lifecycle service missing"
    end = time.monotonic() + timeout
    while True:
        fut = client.call_async(request)
        step = timeout if retry_s is None else retry_s
        try:
            wait_for(fut.done, min(step, max(end - time.monotonic(), 0.1)), "the service reply")
            return fut.result()
        except AssertionError:
            client.remove_pending_request(fut)
            if retry_s is None or time.monotonic() >= end:
                raise


def test_managed_node_lifecycle_compressed_images_and_qos_warning(tmp_path):
    log = tmp_path / "node.log"
    frame = synthetic_frames(1)[0]
    args = ["autostart:=false", "device:=cpu", "resolution:=64", "warmup_frames:=0",
            "image_transport:=compressed", "qos_reliability:=reliable",
            "output_frame:=hands_frame"]  # fmt: skip
    remaps = ["-r", "image:=/cam/image", "-r", "camera_info:=/cam/camera_info"]
    params = [a for p in args for a in ("-p", p)]
    proc = spawn(["im2hands-node", "--ros-args", *params, *remaps], log)
    L = Listener()
    try:
        change = L.node.create_client(ChangeState, "/im2hands/change_state")
        get = L.node.create_client(GetState, "/im2hands/get_state")
        mesh = L.listen("/hands/mesh", MarkerArray, reliable=True)
        diag = L.listen("/diagnostics", DiagnosticArray)
        assert _call(L, get, GetState.Request(), retry_s=10.0).current_state.label == "unconfigured"

        # configure (loads the model) and activate (subscribes)
        for tid in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert _call(L, change, ChangeState.Request(transition=Transition(id=tid))).success
        assert _call(L, get, GetState.Request(), retry_s=10.0).current_state.label == "active"
        assert "/cam/image/compressed" in log.read_text()

        # a best-effort publisher cannot feed a reliable subscription: the node says so
        wrong = L.publisher("/cam/image/compressed", CompressedImage, reliable=False)
        wait_for(lambda: "incompatible QoS on /cam/image/compressed" in log.read_text(), 20,
                 "the incompatible-QoS warning", log)  # fmt: skip
        L.node.destroy_publisher(wrong)
        wait_for(lambda: "no image received on /cam/image/compressed" in log.read_text(), 20,
                 "the no-data explanation", log)  # fmt: skip

        image = L.publisher("/cam/image/compressed", CompressedImage, reliable=True)
        info = L.publisher("/cam/camera_info", CameraInfo, reliable=True)
        L.wait_matched(publishers=[image, info], topics=["/hands/mesh"])
        L.wait_heard(info, conv.camera_info_from_K(frame.K, 640, 480, Header(frame_id="cam")), diag)
        # garbage bytes: dropped with a warning, then a real JPEG is reconstructed
        h = Header(stamp=L.node.get_clock().now().to_msg(), frame_id="cam")
        image.publish(CompressedImage(header=h, format="jpeg", data=b"\xff\xd8garbage" * 50))
        wait_for(lambda: "cannot decode compressed image" in log.read_text(), 20,
                 "the garbage warning", log)  # fmt: skip
        h = Header(stamp=L.node.get_clock().now().to_msg(), frame_id="cam")
        info.publish(conv.camera_info_from_K(frame.K, 640, 480, h))
        time.sleep(0.2)
        image.publish(_jpeg(frame.image, h))
        key = (h.stamp.sec, h.stamp.nanosec)
        stamp = lambda m: (m.header.stamp.sec, m.header.stamp.nanosec)  # noqa: E731
        wait_for(lambda: any(m.markers and stamp(m.markers[0]) == key for _, m in mesh), 90,
                 "/hands/mesh for the JPEG", log)  # fmt: skip
        out = next(m for _, m in mesh if m.markers and stamp(m.markers[0]) == key)
        assert {m.header.frame_id for m in out.markers} == {"hands_frame"}  # the override
        for m in out.markers:  # learned keypoints: a hand is meshed or its marker deleted
            assert m.action == Marker.DELETE or (
                m.type == Marker.TRIANGLE_LIST and len(m.points) % 3 == 0 and len(m.points)
            )

        # deactivate: no more outputs; cleanup releases; configure again works
        req = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_DEACTIVATE))
        assert _call(L, change, req).success
        n = len(mesh)
        image.publish(_jpeg(frame.image, Header(stamp=L.node.get_clock().now().to_msg())))
        time.sleep(2.0)
        assert len(mesh) == n
        for tid in (Transition.TRANSITION_CLEANUP, Transition.TRANSITION_CONFIGURE):
            assert _call(L, change, ChangeState.Request(transition=Transition(id=tid))).success
        assert _call(L, get, GetState.Request(), retry_s=10.0).current_state.label == "inactive"
        assert proc.poll() is None
    finally:
        L.close()
        assert stop(proc) == 0, log.read_text()[-3000:]


def test_bad_parameters_refuse_to_configure_and_exit_clearly(tmp_path):
    log = tmp_path / "node.log"
    proc = spawn(["im2hands-node", "--ros-args", "-p", "resolution:=100"], log)
    assert proc.wait(120) == 2
    text = log.read_text()
    assert "parameter 'resolution' must be 0 or 32 * 2^k" in text and "Traceback" not in text


def test_help_lists_every_parameter_without_starting_ros():
    import subprocess
    import sys
    from pathlib import Path

    from im2hands_ros.params import PARAMETERS

    exe = Path(sys.executable).parent / "im2hands-node"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: im2hands-node")
    for p in PARAMETERS:
        assert f"  {p.name} (default " in proc.stdout, p.name
