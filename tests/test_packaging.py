"""Packaging invariants: pip and colcon see the same package, and the library stays ROS-free."""

import ast
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "im2hands_ros"
ROS_MODULES = {
    "rclpy",
    "rosidl_runtime_py",
    "launch",
    "launch_ros",
    "sensor_msgs",
    "visualization_msgs",
    "shape_msgs",
    "geometry_msgs",
    "std_msgs",
    "diagnostic_msgs",
    "lifecycle_msgs",
    "builtin_interfaces",
    "im2hands_ros",
}


def test_package_xml_matches_installed_distribution():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == PACKAGE
    assert root.findtext("export/build_type") == "ament_python"
    assert root.findtext("license") == "Apache-2.0"
    assert root.findtext("version") == metadata.version(PACKAGE)
    exec_depends = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "visualization_msgs", "launch_ros"} <= exec_depends


def test_ament_resource_marker_exists():
    assert (ROOT / "resource" / PACKAGE).is_file()


def test_console_script_registered():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("im2hands-data") == "im2hands_model.data.cli:main"
    assert scripts.get("im2hands-node") == "im2hands_ros.node:main"
    assert scripts.get("im2hands-synthetic-camera") == "im2hands_ros.synthetic_camera:main"
    assert scripts.get("im2hands-ros-demo") == "im2hands_ros.demo:main"


def _imported_top_level_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_ros():
    offenders = {}
    for path in sorted((ROOT / "im2hands_model").rglob("*.py")):
        ros = _imported_top_level_modules(path.read_text(encoding="utf-8")) & ROS_MODULES
        if ros:
            offenders[str(path.relative_to(ROOT))] = sorted(ros)
    assert not offenders, f"im2hands_model must not import ROS: {offenders}"


def test_wheel_carries_the_shipped_weights(tmp_path):
    """A non-editable install gets the weights: they are package data of the wheel."""
    import subprocess
    import sys
    import zipfile

    weights = sorted(p.name for p in (ROOT / "im2hands_model" / "weights").iterdir())
    assert "manifest.json" in weights and any(w.endswith(".safetensors") for w in weights)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
           "-w", str(tmp_path), str(ROOT)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [w for w in weights if f"im2hands_model/weights/{w}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    # launch and config files land in <prefix>/share/im2hands_ros (where ROS tools and
    # im2hands_ros.fastdds look for them)
    share = {n.split("/data/share/", 1)[1] for n in names if "/data/share/" in n}
    for f in ("im2hands_ros/launch/reconstruct.launch.py", "im2hands_ros/config/im2hands.yaml",
              "im2hands_ros/config/fastdds.xml", "im2hands_ros/config/im2hands.rviz",
              "im2hands_ros/package.xml"):  # fmt: skip
        assert f in share, f"{f} not in the wheel's data: {sorted(share)}"
