"""The layers stay apart (core <- networks <- pipeline <- ROS node): a clean interpreter that
imports the inference side, or configures the node, loads no training code and no renderer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Module prefixes the inference side must not load: training, the synthetic data generator
#: and its renderer (Anny, moderngl/EGL).
FORBIDDEN = ("im2hands_model.training", "im2hands_model.data.synthetic",
             "im2hands_model.data.render", "im2hands_model.data.anny_hand", "moderngl",
             "anny")  # fmt: skip


def _loaded(code: str) -> list[str]:
    script = code + (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_pipeline_loads_no_training_and_no_renderer():
    code = ("import im2hands_model, im2hands_model.pipeline, im2hands_model.pretrained, "
            "im2hands_model.hand_tracking, im2hands_model.cli")  # fmt: skip
    assert _loaded(code) == []


def test_building_and_running_the_pipeline_loads_no_renderer():
    code = (
        "from im2hands_model.pipeline import Im2Hands\n"
        "from im2hands_model.pipeline.warmup import warmup\n"
        "warmup(Im2Hands.from_pretrained(device='cpu', resolution=32), 1)\n"
    )
    # the networks build themselves (networks.build_network): no training code either
    assert _loaded(code) == []


@pytest.mark.slow
def test_the_node_configures_without_the_renderer():
    code = (
        "import rclpy\n"
        "from im2hands_ros.node import Im2HandsNode\n"
        "rclpy.init()\n"
        "node = Im2HandsNode(own_thread=False, parameter_overrides=[\n"
        "    rclpy.parameter.Parameter('device', value='cpu'),\n"
        "    rclpy.parameter.Parameter('resolution', value=32)])\n"
        "node.trigger_configure()\n"
        "assert node._state == 'inactive', node._state\n"
        "node.destroy_node()\n"
        "rclpy.try_shutdown()\n"
    )
    assert _loaded(code) == []
