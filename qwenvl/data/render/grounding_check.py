"""What the audit reports about one record's boxes and points.

``inspect_coordinates(conversation, image_sizes, grounding)`` counts the boxes and
points of a conversation and lists, each with a sentence naming the record:

* ``outside``: coordinates that cannot belong to their image in the record's
  coordinates (the declared ``bbox_format``, else the family's own), which training
  refuses (``Grounding.training_conversation`` raises the same);
* ``degenerate``: boxes without area (x2 <= x1 or y2 <= y1);
* ``other_convention``: records whose coordinates all fit another convention but not
  their own (e.g. every value within 0..1 in a pixel dataset, or values beyond the
  resized image that fit the original one).

Without a model (``grounding`` None) the resized sizes and the family are unknown:
``abs_resized`` and undeclared coordinates are then only counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl.data.render.grounding import Grounding, inside, looks_like, may_hold_coordinates, place_coordinates, to_unit

__all__ = ["GroundingFindings", "inspect_coordinates"]


@dataclass
class GroundingFindings:
    """Counts and findings of one record (see the module docstring)."""

    boxes: int = 0
    points: int = 0
    outside: list[str] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)
    other_convention: list[str] = field(default_factory=list)

    def add(self, other: "GroundingFindings") -> None:
        self.boxes += other.boxes
        self.points += other.points
        for name in ("outside", "degenerate", "other_convention"):
            getattr(self, name).extend(getattr(other, name))


def _plain(values) -> list:
    return [int(v) if float(v).is_integer() else v for v in values]


def inspect_coordinates(conversation, image_sizes: list[tuple[int, int]],
                        grounding: Grounding | None = None) -> GroundingFindings:
    """Findings for ``conversation`` whose images are ``image_sizes`` (width, height) in order.

    Raises DataError where a box cannot be read at all (as rendering would).
    """
    found = GroundingFindings()
    if not may_hold_coordinates(conversation):
        return found
    placed = [p for p in place_coordinates(conversation) if p.image >= 0]
    if not placed:
        return found
    origin = conversation.origin
    declared = conversation.bbox_format
    convention = grounding.convention if grounding is not None else None
    source = declared or convention
    resized = grounding.resized_sizes(image_sizes) if grounding is not None else None
    readings = []
    for p in placed:
        c = p.coordinates
        found.boxes += c.kind == "box"
        found.points += c.kind == "point"
        original = image_sizes[p.image]
        seen = resized[p.image] if resized is not None else None
        readings.append((c.values, original, seen))
        if c.degenerate:
            found.degenerate.append(f"{origin}: the box {_plain(c.values)} has no area (x2 <= x1 or y2 <= y1).")
        if source is None or (source == "abs_resized" and seen is None):
            continue
        if not inside(to_unit(c.values, source, original, seen)):
            size = f"{original[0]}x{original[1]}" + (f", seen at {seen[0]}x{seen[1]}" if seen else "")
            how = f"'bbox_format' {declared}" if declared else f"undeclared, so the family's own {convention}"
            found.outside.append(f"{origin}: the {c.kind} {_plain(c.values)} lies outside image {p.image + 1} "
                                 f"({size}; coordinates {how}). Fix: correct the record or the dataset's "
                                 "'bbox_format'.")
    fits = looks_like(readings)
    checkable = source is not None and not (source == "abs_resized" and resized is None)
    if checkable and fits and source not in fits:
        found.other_convention.append(
            f"{origin}: its coordinates are read as {source} but look like {' or '.join(fits)}. Fix: check the "
            "dataset's 'bbox_format'.")
    return found
