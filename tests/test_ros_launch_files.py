"""The launch file and RViz configuration (no ``ros2 launch`` or RViz on these machines: their
contents are checked against the node's real parameters and topics; with launch_ros installed,
the launch description is also built)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

pytest.importorskip("rclpy")

from im2hands_ros import params  # noqa: E402
from im2hands_ros.node import OUTPUTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "reconstruct.launch.py"


def _launch_module() -> ast.Module:
    return ast.parse(LAUNCH.read_text(encoding="utf-8"))


def test_launch_file_arguments_and_node_parameters():
    tree = _launch_module()
    args = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "ARGUMENTS")  # fmt: skip
    names = [elt.elts[0].value for elt in args.elts]
    for required in ("image", "camera_info", "params_file", "device", "namespace"):
        assert required in names
    # every parameter the launch file sets is a real node parameter
    node_params = {p.name for p in params.PARAMETERS}
    set_keys = {k.value for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys
                if isinstance(k, ast.Constant)}  # fmt: skip
    assert set_keys and set_keys <= node_params, set_keys - node_params
    # the executable is the console script colcon installs into lib/im2hands_ros
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", "") == "LifecycleNode"]  # fmt: skip
    kw = {k.arg: k.value for k in calls[0].keywords}
    assert kw["executable"].value == "im2hands-node" and kw["name"].value == "im2hands"
    assert kw["package"].id == "PACKAGE"
    remapped = {e.elts[0].value for e in kw["remappings"].elts}
    assert remapped == {"image", "camera_info", "keypoints", "depth"}


def test_launch_description_builds_where_launch_ros_exists():
    pytest.importorskip("launch_ros")
    import importlib.util

    spec = importlib.util.spec_from_file_location("reconstruct_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len(mod.generate_launch_description().entities) >= 3


def test_rviz_config_shows_the_node_outputs():
    cfg = yaml.safe_load((ROOT / "config" / "im2hands.rviz").read_text())
    displays = cfg["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if "Topic" in d}
    published = {"/" + topic for _, _, topic in OUTPUTS}
    assert {"/hands/mesh", "/hands/keypoints", "/hands/contacts", "/hands/debug_image"} <= topics
    assert topics <= published
    for d in displays:
        if "Topic" in d:  # the node publishes reliably; RViz may ask for either
            assert d["Topic"]["Reliability Policy"] in ("Reliable", "Best Effort")
