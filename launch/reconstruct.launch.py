"""Launch the im2hands reconstruction node (ROS 2 installs with launch_ros; see docs/ros.md).

    ros2 launch im2hands_ros reconstruct.launch.py image:=/camera/color/image_raw \
        camera_info:=/camera/color/camera_info device:=cuda rviz:=true \
        use_depth:=true depth:=/camera/aligned_depth_to_color/image_raw

Arguments:
    image, camera_info: input topics (remapped onto the node's ``image`` and ``camera_info``);
        with ``image_transport:=compressed`` in the params file the node reads
        ``<image>/compressed``.
    keypoints: external keypoints topic (used with ``keypoint_source: topic``).
    depth: registered depth image topic (used with ``use_depth:=true``: 16UC1 mm or 32FC1 m).
    use_depth: overrides the file's ``use_depth`` (place the hands from the depth topic).
    tracked_meshes: overrides the file's ``tracked_meshes`` (meshes at camera rate, re-posed
        between full reconstructions).
    params_file: node parameters (default: the installed ``config/im2hands.yaml``).
    device: overrides the file's ``device`` (auto, cpu, cuda, cuda:N).
    namespace: namespace of the node and of its outputs (``<ns>/hands/mesh``, ...).
    autostart: configure and activate at once (true) or wait for a lifecycle manager (false).
    rviz: also start RViz with ``config/im2hands.rviz`` (meshes, keypoints, contacts, overlay).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "im2hands_ros"

ARGUMENTS = (
    ("image", "/camera/image_raw", "camera image topic (sensor_msgs/Image)"),
    ("camera_info", "/camera/camera_info", "camera intrinsics topic (sensor_msgs/CameraInfo)"),
    ("keypoints", "keypoints", "external keypoints (geometry_msgs/PoseArray, 42 poses)"),
    ("depth", "depth", "registered depth image (sensor_msgs/Image, 16UC1 mm or 32FC1 m)"),
    ("use_depth", "false", "place the hands from the depth topic"),
    ("tracked_meshes", "false", "meshes at camera rate: re-posed between full reconstructions"),
    ("params_file", None, "node parameters YAML (default: the installed config/im2hands.yaml)"),
    ("device", "auto", "torch device: auto, cpu, cuda or cuda:N"),
    ("namespace", "", "namespace of the node and its topics"),
    ("autostart", "true", "configure and activate at start-up (false: managed lifecycle)"),
    ("rviz", "false", "also start RViz with config/im2hands.rviz"),
)


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    default_params = PathJoinSubstitution([share, "config", "im2hands.yaml"])
    node = LifecycleNode(
        package=PACKAGE,
        executable="im2hands-node",
        name="im2hands",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "device": LaunchConfiguration("device"),
                "autostart": ParameterValue(LaunchConfiguration("autostart"), value_type=bool),
                "use_depth": ParameterValue(LaunchConfiguration("use_depth"), value_type=bool),
                "tracked_meshes": ParameterValue(LaunchConfiguration("tracked_meshes"),
                                                 value_type=bool),
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image")),
            ("camera_info", LaunchConfiguration("camera_info")),
            ("keypoints", LaunchConfiguration("keypoints")),
            ("depth", LaunchConfiguration("depth")),
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "im2hands.rviz"])],
        condition=IfCondition(LaunchConfiguration("rviz")),
        output="screen",
    )
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                n, default_value=default_params if d is None else d, description=t
            )
            for n, d, t in ARGUMENTS
        ]
        + [node, rviz]
    )
