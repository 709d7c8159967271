"""Contacts and penetration between the two reconstructed hands of a frame (SPEC §3.7).

A thin layer over :mod:`im2hands_model.metrics`: per-vertex contacts (inside the other hand with
its depth, or within the contact distance of it), the penetration volume (voxels inside both
meshes x voxel volume) and the contact area, gathered in a
:class:`~im2hands_model.pipeline.result.ContactReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from im2hands_model.metrics import M3_TO_CM3, contact_area, contacts, penetration_volume
from im2hands_model.pipeline.result import ContactReport

__all__ = ["DEFAULT_CONTACT_DISTANCE", "DEFAULT_VOXEL_SIZE", "hand_contacts"]

DEFAULT_CONTACT_DISTANCE = 0.003  #: metres
DEFAULT_VOXEL_SIZE = 0.002  #: metres; penetration volume resolution (1 mm is 8x slower)


def hand_contacts(
    meshes: Sequence[Any | None],
    contact_distance: float = DEFAULT_CONTACT_DISTANCE,
    voxel_size: float = DEFAULT_VOXEL_SIZE,
) -> ContactReport:
    """Contacts between ``meshes = [left, right]`` (camera frame, metres; closed).

    Returns an empty report (no points, zero volume and area) unless both meshes exist.
    """
    if contact_distance < 0:
        raise ValueError(f"contact_distance must be >= 0, got {contact_distance}")
    report = ContactReport(contact_distance=float(contact_distance))
    if len(meshes) != 2 or any(m is None for m in meshes):
        return report
    a, b = meshes
    found = contacts(a, b, contact_distance)
    report.penetrating_points = [found.a.penetrating_points, found.b.penetrating_points]
    report.depth = [found.a.depth, found.b.depth]
    report.touching_points = [found.a.touching_points, found.b.touching_points]
    report.distance = [found.a.distance, found.b.distance]
    if found.penetrating:
        report.penetration_volume_cm3 = penetration_volume(a, b, voxel_size=voxel_size) * M3_TO_CM3
    if found.penetrating or any(len(d) for d in report.distance):
        report.contact_area_cm2 = contact_area(a, b, contact_distance).mean_cm2
    report.depth = [np.asarray(d, dtype=np.float64) for d in report.depth]
    return report
