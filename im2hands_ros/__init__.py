"""ROS 2 layer of im2hands.

A thin shell over :mod:`im2hands_model`: it converts ROS messages to numpy/torch inputs, calls the
library, and turns its results (keypoints, meshes, contacts) back into messages. All the maths
lives in the library, which never imports ROS. The node is :mod:`im2hands_ros.node`.
"""
