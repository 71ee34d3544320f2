"""Boxes and points in text, rewritten into the trained family's coordinates for the image it sees.

The families disagree on grounding coordinates (checked against the released models'
cookbooks, see the README's "Grounding" section):

* Qwen2.5-VL: absolute pixels of the image *as the model sees it*, i.e. after the
  processor's ``smart_resize`` (cookbooks/ocr.ipynb and document_parsing.ipynb of
  QwenLM/Qwen2.5-VL scale answers by ``image_grid_thw * 14``);
* Qwen3-VL (dense and MoE) and Qwen3.5: relative to the image on a 0-1000 scale
  (cookbooks/spatial_understanding.ipynb of QwenLM/Qwen3-VL: ``x / 1000 * width``);
* Qwen2-VL: 0-1000 as well, written ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

A dataset says which coordinates its records hold with ``"bbox_format"`` in the
dataset dictionary, one of ``FORMATS``:

* ``abs_original``: pixels of the image file (COCO-style);
* ``abs_resized``: pixels of the image after the processor's resize (what
  Qwen2.5-VL answers in; tied to the pixel flags the data was made with);
* ``rel_1``: fractions of the width and height, 0 to 1;
* ``rel_1000``: the same on a 0-1000 scale (Qwen2-VL, Qwen3-VL, Qwen3.5).

What is recognised in any text part (questions and answers alike): the values of
``"bbox_2d": [x1, y1, x2, y2]`` and ``"point_2d": [x, y]`` (JSON or Python-dict
quoting, alone or in lists of objects, inside code fences or prose), and Qwen2-VL's
``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``.  Only the numbers are rewritten; the
text around them is kept.  A key or box token whose value cannot be read is an
error, never left unconverted.

Which image a box belongs to: the last image placed before the text that holds it
(in conversation order), or the first image when none precedes it.  In a
multi-image record each box is converted against its own image that way.

Undeclared datasets (no ``bbox_format``): coordinates are taken to be in the
family's own convention already (what the official code assumes) and are trained
unchanged, but a box or point that falls outside the image the model sees (beyond
the resized width/height, or beyond 1000) cannot be right, so rendering raises a
``DataError`` naming the record and asking for a ``bbox_format``.  Declared
coordinates that fall outside their image are refused the same way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from qwenvl.data.errors import DataError, DataKind

__all__ = ["FORMATS", "FAMILY_CONVENTION", "Coordinates", "find_coordinates", "rewrite_coordinates",
           "convert_values", "family_convention", "Grounding", "box_iou", "boxes_in", "looks_like"]

FORMATS = ("abs_original", "abs_resized", "rel_1", "rel_1000")

# The coordinates each family is trained and answers in (model_type -> format).
FAMILY_CONVENTION = {
    "qwen2_vl": "rel_1000",
    "qwen2_5_vl": "abs_resized",
    "qwen3_vl": "rel_1000",
    "qwen3_vl_moe": "rel_1000",
    "qwen3_5": "rel_1000",
    "qwen3_5_moe": "rel_1000",
}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# "bbox_2d": [ ... ]  /  'point_2d': [ ... ]  (the list must be flat: nested lists are reported)
_KEYED = re.compile(r"""(?P<key>["']?(?P<name>bbox_2d|point_2d)["']?\s*:\s*)\[(?P<body>[^\[\]]*)\]""")
_NESTED = re.compile(r"""["']?(bbox_2d|point_2d)["']?\s*:\s*\[\s*\[""")
_BOX_TOKENS = re.compile(
    rf"<\|box_start\|>\s*\(\s*(?P<x1>{_NUMBER})\s*,\s*(?P<y1>{_NUMBER})\s*\)\s*,?\s*"
    rf"\(\s*(?P<x2>{_NUMBER})\s*,\s*(?P<y2>{_NUMBER})\s*\)\s*<\|box_end\|>")
_BOX_START = re.compile(r"<\|box_start\|>")
_NUMBER_ONLY = re.compile(rf"^\s*{_NUMBER}\s*$")


@dataclass(frozen=True)
class Coordinates:
    """One box (4 values: x1, y1, x2, y2) or point (x, y) found in a text, and where."""

    kind: str  # "box" or "point"
    values: tuple[float, ...]
    start: int  # span of the text this replaces
    end: int
    style: str  # "list" ([x1, y1, x2, y2]) or "tokens" (Qwen2-VL's <|box_start|>...)

    @property
    def degenerate(self) -> bool:
        """A box with no area (x2 <= x1 or y2 <= y1)."""
        return self.kind == "box" and (self.values[2] <= self.values[0] or self.values[3] <= self.values[1])


def find_coordinates(text: str, origin: str = "") -> list[Coordinates]:
    """Every box and point in ``text``, in order; a key or box token that cannot be read raises DataError."""
    found: list[Coordinates] = []
    for m in _KEYED.finditer(text):
        parts = m.group("body").split(",")
        kind, want = ("box", 4) if m.group("name") == "bbox_2d" else ("point", 2)
        numeric = [bool(_NUMBER_ONLY.match(p)) for p in parts]
        if not any(numeric):
            continue  # a template in a prompt, such as "bbox_2d": [x1, y1, x2, y2]
        if len(parts) != want or not all(numeric):
            raise DataError(f"{origin}: cannot read {m.group(0)!r}: a {m.group('name')} needs {want} numbers. "
                            f"Fix: write it as [{', '.join(['x1', 'y1', 'x2', 'y2'] if want == 4 else ['x', 'y'])}].")
        found.append(Coordinates(kind, tuple(float(p) for p in parts), m.start("body") - 1, m.end(), "list"))
    for m in _BOX_TOKENS.finditer(text):
        values = tuple(float(m.group(k)) for k in ("x1", "y1", "x2", "y2"))
        found.append(Coordinates("box", values, m.start(), m.end(), "tokens"))
    found.sort(key=lambda c: c.start)
    # Every box must be read: a nested list or odd box tokens would otherwise be trained unconverted.
    if _NESTED.search(text):
        raise DataError(f"{origin}: a bbox_2d/point_2d value in {text[:200]!r} is not a flat list of numbers "
                        f"(nested lists are not read). Fix: one box per \"bbox_2d\": [x1, y1, x2, y2], one point "
                        f"per \"point_2d\": [x, y].")
    if len(_BOX_START.findall(text)) != sum(1 for c in found if c.style == "tokens"):
        raise DataError(f"{origin}: a <|box_start|> in {text[:200]!r} is not followed by (x1,y1),(x2,y2)<|box_end|>. "
                        f"Fix: write Qwen2-VL boxes as <|box_start|>(x1,y1),(x2,y2)<|box_end|>.")
    return found


def _format_value(value: float, fmt: str) -> str:
    if fmt == "rel_1":
        return f"{round(value, 4):g}"
    return str(int(round(value)))


def _render(c: Coordinates, values: Iterable[float], fmt: str) -> str:
    text = [_format_value(v, fmt) for v in values]
    if c.style == "tokens":
        return f"<|box_start|>({text[0]},{text[1]}),({text[2]},{text[3]})<|box_end|>"
    return "[" + ", ".join(text) + "]"


def rewrite_coordinates(text: str, convert: Callable[[Coordinates, int], tuple[float, ...]], fmt: str,
                        origin: str = "") -> str:
    """``text`` with each box/point's numbers replaced by ``convert(coordinates, k)`` written in ``fmt``.

    ``k`` counts the coordinates of ``text`` from 0.  Text that holds none is returned as is.
    """
    found = find_coordinates(text, origin)
    if not found:
        return text
    out, at = [], 0
    for k, c in enumerate(found):
        out.append(text[at:c.start])
        out.append(_render(c, convert(c, k), fmt))
        at = c.end
    out.append(text[at:])
    return "".join(out)


def _scale(fmt: str, original: tuple[int, int], resized: tuple[int, int] | None) -> tuple[float, float]:
    """(width, height) that a coordinate of ``fmt`` is measured against."""
    if fmt == "abs_original":
        return float(original[0]), float(original[1])
    if fmt == "abs_resized":
        if resized is None:
            raise ValueError("abs_resized coordinates need the resized image size")
        return float(resized[0]), float(resized[1])
    if fmt == "rel_1":
        return 1.0, 1.0
    if fmt == "rel_1000":
        return 1000.0, 1000.0
    raise ValueError(f"unknown coordinate format {fmt!r}; known: {', '.join(FORMATS)}")


def to_unit(values: tuple[float, ...], fmt: str, original, resized) -> tuple[float, ...]:
    """Coordinates as fractions of the image's width and height.

    The processor stretches the whole image to its resized size (no crop, no padding),
    so a fraction of the original image is the same fraction of the resized one.
    """
    w, h = _scale(fmt, original, resized)
    return tuple(v / (w if i % 2 == 0 else h) for i, v in enumerate(values))


def from_unit(unit: tuple[float, ...], fmt: str, original, resized) -> tuple[float, ...]:
    w, h = _scale(fmt, original, resized)
    return tuple(u * (w if i % 2 == 0 else h) for i, u in enumerate(unit))


def convert_values(values: tuple[float, ...], source: str, target: str, original: tuple[int, int],
                   resized: tuple[int, int] | None) -> tuple[float, ...]:
    """``values`` (x, y, ...) from format ``source`` to ``target`` for an image of ``original``
    (width, height) that the model sees at ``resized`` (width, height)."""
    return from_unit(to_unit(values, source, original, resized), target, original, resized)


def inside(unit: tuple[float, ...], tolerance: float = 1e-6) -> bool:
    """True when every coordinate lies on the image (0..1 of its width/height, edges included)."""
    return all(-tolerance <= u <= 1 + tolerance for u in unit)


def family_convention(model_type: str) -> str:
    """The coordinate format a family is trained in (``FAMILY_CONVENTION``); DataError for others."""
    try:
        return FAMILY_CONVENTION[model_type]
    except KeyError:
        raise DataError(f"no grounding convention is known for model_type {model_type!r} (known: "
                        f"{', '.join(FAMILY_CONVENTION)}); boxes and points cannot be converted for it.") from None


def looks_like(values_by_image: list[tuple[tuple[float, ...], tuple[int, int], tuple[int, int] | None]]) -> list[str]:
    """The formats under which every given box/point lies on its image, most telling first.

    ``values_by_image``: (values, original size, resized size or None).  Coordinates
    that are all within 0..1 are listed as ``rel_1`` only (tiny pixel boxes are not a
    plausible reading); ``abs_resized`` is tried only where the resized size is known.
    """
    if not values_by_image:
        return []
    if all(0 <= v <= 1 for values, _, _ in values_by_image for v in values):
        return ["rel_1"]
    out = []
    for fmt in ("abs_original", "abs_resized", "rel_1000"):
        if fmt == "abs_resized" and any(r is None for _, _, r in values_by_image):
            continue
        if all(inside(to_unit(v, fmt, o, r)) for v, o, r in values_by_image):
            out.append(fmt)
    return out


def resized_image_size(image_processor, width: int, height: int, size: dict | None = None) -> tuple[int, int]:
    """(width, height) the processor resizes a ``width`` x ``height`` image to.

    transformers' own ``smart_resize`` with the processor's factor (patch x merge size)
    and pixel bounds (``size`` overrides ``image_processor.size``, as the renderer does
    when it shrinks a sample to fit ``--model_max_length``).
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # local: loads torchvision

    size = size or image_processor.size
    factor = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=size["shortest_edge"],
                        max_pixels=size["longest_edge"])
    return w, h


@dataclass(frozen=True)
class Placed:
    """A box/point of a conversation: which message, part and image it belongs to."""

    message: int
    part: int
    image: int  # index into the conversation's images
    coordinates: Coordinates


def place_coordinates(conversation) -> list[Placed]:
    """Every box/point of ``conversation`` with the image it belongs to (see the module docstring).

    ``image`` is -1 when the conversation has no image.
    """
    placed, seen = [], -1
    for i, message in enumerate(conversation.messages):
        for j, part in enumerate(message["content"]):
            if part["type"] == "image":
                seen += 1
            elif part["type"] == "text":
                for c in find_coordinates(part["text"], conversation.origin):
                    placed.append(Placed(i, j, seen, c))
    has_image = seen >= 0
    return [replace(p, image=max(p.image, 0) if has_image else -1) for p in placed]


def may_hold_coordinates(conversation) -> bool:
    """A cheap test that rules out most conversations before any parsing."""
    return any(part["type"] == "text" and ("_2d" in part["text"] or "<|box_start|>" in part["text"])
               for message in conversation.messages for part in message["content"])


class Grounding:
    """Rewrite the boxes and points of conversations into one family's coordinates.

    ``Grounding(model_type, image_processor)``; ``training_conversation`` is the message
    transform applied before rendering, ``user_text`` its inverse for answers.
    """

    def __init__(self, model_type: str, image_processor):
        self.model_type = model_type
        self.image_processor = image_processor
        self.convention = FAMILY_CONVENTION.get(model_type)

    def resized_sizes(self, originals: list[tuple[int, int]], size: dict | None = None) -> list[tuple[int, int]]:
        """The (width, height) of each image as the model sees it."""
        return [resized_image_size(self.image_processor, w, h, size) for w, h in originals]

    def training_conversation(self, conversation, originals: list[tuple[int, int]],
                              resized: list[tuple[int, int]]):
        """``conversation`` with every box and point written in the family's coordinates.

        ``originals``/``resized``: (width, height) of each image in order, as loaded and
        as the processor resizes it.  Returns ``conversation`` itself when it holds no
        coordinates; raises DataError for coordinates that cannot belong to their image.
        """
        placed = place_coordinates(conversation)
        if not placed:
            return conversation
        declared = getattr(conversation, "bbox_format", None)
        origin = conversation.origin
        if self.convention is None:
            if declared is None:
                return conversation  # an unknown family and nothing declared: nothing to convert to
            family_convention(self.model_type)  # raises, naming the family
        source = declared or self.convention
        if placed[0].image < 0:
            if declared is None:
                return conversation  # e.g. video grounding, which is not converted
            raise DataError(f"{origin}: has boxes/points and 'bbox_format' {declared!r} but no image to convert "
                            f"them against. Fix: remove 'bbox_format' from a dataset without images.")
        by_part: dict[tuple[int, int], list[Placed]] = {}
        for p in placed:
            by_part.setdefault((p.message, p.part), []).append(p)
        messages = [dict(m, content=list(m["content"])) for m in conversation.messages]
        for (i, j), items in by_part.items():
            def convert(c: Coordinates, k: int, items=items) -> tuple[float, ...]:
                image = items[k].image
                original, seen = originals[image], resized[image]
                unit = to_unit(c.values, source, original, seen)
                if not inside(unit):
                    raise DataError(_outside_message(origin, c, source, declared, image, original, seen,
                                                     self.convention), DataKind.BOX_OUTSIDE_IMAGE)
                return from_unit(unit, self.convention, original, seen)

            part = messages[i]["content"][j]
            messages[i]["content"][j] = {"type": "text",
                                         "text": rewrite_coordinates(part["text"], convert, self.convention, origin)}
        return replace(conversation, messages=messages)

    def for_images(self, conversation, images: list, size: dict | None = None):
        """(``training_conversation`` for PIL ``images`` resized into ``size``, the resized sizes).

        The message transform the renderer applies before the chat template; ``size``
        is the renderer's pixel bounds for this attempt (None: the processor's own).
        """
        return self.for_sizes(conversation, [image.size for image in images], size)

    def for_sizes(self, conversation, originals: list[tuple[int, int]], size: dict | None = None):
        """``for_images`` from the images' (width, height) alone (the token counter reads only headers)."""
        if not may_hold_coordinates(conversation):
            return conversation, []  # the common case, decided without parsing
        resized = self.resized_sizes(originals, size)
        return self.training_conversation(conversation, originals, resized), resized

    def check_grid(self, resized: list[tuple[int, int]], image_grid_thw, origin: str = "") -> None:
        """Raise if the processor resized an image to another size than ``smart_resize`` predicted.

        Converted boxes are only right for the size the model really sees; this keeps
        the prediction honest should a processor ever resize differently.
        """
        patch = self.image_processor.patch_size
        seen = [(int(w) * patch, int(h) * patch) for _, h, w in image_grid_thw.tolist()]
        if seen != list(resized):
            raise RuntimeError(f"{origin}: boxes were converted for images of {resized} pixels but the processor "
                               f"made {seen}; the grounding conversion does not match this processor.")

    def user_text(self, text: str, user_format: str | None, original: tuple[int, int],
                  resized: tuple[int, int]) -> str:
        """A model answer (family coordinates) with its boxes and points in ``user_format``.

        ``None`` (or the family's own format) returns the text unchanged; answers are
        not checked against the image (a model may well answer off it).
        """
        if user_format is None or self.convention is None or user_format == self.convention:
            return text
        return rewrite_coordinates(
            text, lambda c, k: convert_values(c.values, self.convention, user_format, original, resized), user_format)


def _outside_message(origin, c: Coordinates, source, declared, image, original, resized, convention) -> str:
    what = "box" if c.kind == "box" else "point"
    values = [int(v) if float(v).is_integer() else v for v in c.values]
    where = (f"image {image + 1} is {original[0]}x{original[1]} pixels, seen by the model at "
             f"{resized[0]}x{resized[1]}")
    fits = looks_like([(c.values, original, resized)])
    hint = f"; the values fit {' or '.join(fits)}" if fits else ""
    if declared is None:
        return (f"{origin}: the {what} {values} lies outside the image the model sees ({where}); the dataset "
                f"declares no 'bbox_format', so its coordinates are taken as the family's own ({convention}){hint}. "
                f"Fix: add \"bbox_format\" (one of {', '.join(FORMATS)}) to the dataset in the dictionary, or "
                f"correct the record.")
    return (f"{origin}: the {what} {values} ('bbox_format' {declared}) lies outside its image ({where}){hint}. "
            f"Fix: correct the record, or the dataset's 'bbox_format' if it is wrong for all records.")


def boxes_in(text: str) -> list[tuple[float, ...]]:
    """The boxes (x1, y1, x2, y2) of a text, in order; unreadable ones are skipped (for scoring answers)."""
    try:
        return [c.values for c in find_coordinates(text) if c.kind == "box"]
    except DataError:
        return [c.values for c in _lenient(text) if c.kind == "box"]


def _lenient(text: str) -> list[Coordinates]:
    """The readable boxes/points of a model answer that may hold malformed ones."""
    found = []
    for m in _KEYED.finditer(text):
        parts = m.group("body").split(",")
        want = 4 if m.group("name") == "bbox_2d" else 2
        if len(parts) == want and all(_NUMBER_ONLY.match(p) for p in parts):
            found.append(Coordinates("box" if want == 4 else "point", tuple(float(p) for p in parts),
                                     m.start("body") - 1, m.end(), "list"))
    for m in _BOX_TOKENS.finditer(text):
        found.append(Coordinates("box", tuple(float(m.group(k)) for k in ("x1", "y1", "x2", "y2")),
                                 m.start(), m.end(), "tokens"))
    return sorted(found, key=lambda c: c.start)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2); 0 when either has no area."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    if area_a == 0 or area_b == 0:
        return 0.0
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (area_a + area_b - inter)


def matched_iou(predicted: list[tuple[float, ...]], reference: list[tuple[float, ...]]) -> float | None:
    """Mean IoU of reference boxes paired in order with predicted ones (a missing prediction scores 0).

    None when the reference holds no box.  Pairing in order matches how grounding
    answers list objects; an extra predicted box does not raise the score.
    """
    if not reference:
        return None
    scores = [box_iou(p, r) for p, r in zip(predicted, reference)]
    scores += [0.0] * (len(reference) - len(scores))
    return math.fsum(scores) / len(reference)
