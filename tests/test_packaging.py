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
