"""Packaging for im2hands.

One setup script serves two installers:

* ``pip install -e '.[dev]'`` (what ``make setup`` runs) for the library, the tests and the tools;
* colcon's ``ament_python`` build type in a ROS 2 workspace, which needs the ament resource marker,
  ``package.xml`` and the launch/config files installed under ``share/im2hands_ros`` and the
  executables under ``lib/im2hands_ros`` (see ``setup.cfg``).

Install torch first (``pip install torch==2.13.0``): the requirement below only states the oldest
release the code supports, so an already installed CPU build satisfies it and nothing is replaced.
"""

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE_NAME = "im2hands_ros"
HERE = Path(__file__).resolve().parent


def _share_files(pattern: str) -> list[str]:
    """Files matching ``pattern`` (relative to the repo root); documentation stays out of share/."""
    return sorted(
        path for path in glob(pattern) if Path(path).is_file() and not path.endswith(".md")
    )


ROS_DISTRO_WHEELS = [
    "ros-kilted-rclpy",
    "ros-kilted-rmw-fastrtps-cpp",
    "ros-kilted-sensor-msgs",
    "ros-kilted-visualization-msgs",
    "ros-kilted-shape-msgs",
    "ros-kilted-geometry-msgs",
    "ros-kilted-std-msgs",
    "ros-kilted-diagnostic-msgs",
    "ros-kilted-lifecycle-msgs",
]

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    description=(
        "Two-hand implicit reconstruction from an image (Im2Hands, CVPR 2023): "
        "PyTorch library and ROS 2 perception node"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").is_file()
    else "",
    long_description_content_type="text/markdown",
    author="im2hands developers",
    maintainer="im2hands developers",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(
        include=["im2hands_model", "im2hands_model.*", "im2hands_ros", "im2hands_ros.*"],
        exclude=["tests", "tests.*", "*.tests", "*.tests.*"],
    ),
    include_package_data=True,
    # the trained default weights (im2hands_model.pretrained) ship inside the package
    package_data={"im2hands_model": ["weights/*.safetensors", "weights/manifest.json",
                                      "pipeline/warmup_hands.json"]},
    zip_safe=False,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE_NAME}"]),
        (f"share/{PACKAGE_NAME}", ["package.xml"]),
        (f"share/{PACKAGE_NAME}/launch", _share_files("launch/*.launch.py")),
        (f"share/{PACKAGE_NAME}/config", _share_files("config/*")),
    ],
    install_requires=[
        "numpy",
        "scipy",
        "torch>=2.3",
        "anny==0.6.2",
        "trimesh",
        "PyMCubes",
        "libigl",
        "moderngl",
        "pillow",
        "tqdm",
        "safetensors",
        "pyyaml",
        "tensorboard",
        # the default keypoint source: MediaPipe's hand models run by LiteRT (the TFLite runtime,
        # numpy 2, no protobuf pin), images warped and camera encodings decoded by OpenCV
        "ai-edge-litert",
        "opencv-python-headless",
    ],
    extras_require={
        "ros": ROS_DISTRO_WHEELS,
        # ONNX export (`onnx`, needed by torch's exporter) and the onnxruntime backend; `gpu`
        # swaps in the CUDA build (install it into an environment without `onnxruntime`: the two
        # wheels ship the same module)
        "onnx": ["onnx>=1.16", "onnxruntime>=1.17"],
        "gpu": ["onnx>=1.16", "onnxruntime-gpu>=1.17"],
        # the MANO hand layer (InterHand2.6M); smplx's code licence is non-commercial (MPI)
        "mano": ["smplx==0.1.28"],
        # the ROS 2 wheels too, so that CI runs the im2hands_ros tests
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "onnx>=1.16",
            "onnxruntime>=1.17",
            "smplx==0.1.28",
            *ROS_DISTRO_WHEELS,
        ],
    },
    entry_points={
        "console_scripts": [
            "im2hands-data = im2hands_model.data.cli:main",
            "im2hands = im2hands_model.cli:main",
            "im2hands-node = im2hands_ros.node:main",
            "im2hands-synthetic-camera = im2hands_ros.synthetic_camera:main",
            "im2hands-ros-demo = im2hands_ros.demo:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
