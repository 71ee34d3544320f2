"""The fit-to-context rule: how an over-long sample is shrunk to ``model_max_length``, or dropped.

One rule, two ways of measuring: ``SampleRenderer.encode`` measures by running the
processor on the pixels, ``TokenCounter.count`` (``qwenvl.data.batch.count``) from media
sizes alone.  Both hand ``fit_to_context`` a ``measure(scale)`` and get back the same
scale, length and error, so a cached length is the length training renders.

The rule: measure at full resolution; while the sample is longer than the limit,
retry with every image and video scaled (in pixels) by the room the text leaves
(``0.9 * (limit - text) / visual``, at least 0.05 per step), at most
``SHRINK_ATTEMPTS`` times.  A sample whose text alone does not fit, or that still
does not fit at the lowest resolution, raises ``SampleTooLong``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

from qwenvl.data.errors import DataError, DataKind

__all__ = ["SHRINK_ATTEMPTS", "SampleTooLong", "Measured", "fit_to_context"]

# How often a too-long sample is retried at a lower resolution before it is dropped.
SHRINK_ATTEMPTS = 6

T = TypeVar("T")


class SampleTooLong(DataError):
    """A sample that does not fit ``model_max_length`` even at the lowest allowed resolution."""

    default_kind = DataKind.TOO_LONG


class Measured(NamedTuple):
    """One measurement of a sample at a scale: its tokens, its image/video placeholder tokens, and
    whatever the measurer needs back (the processor's output, or counted patches)."""

    length: int
    visual: int
    result: object


def fit_to_context(measure: Callable[[float], Measured], max_length: int | None, origin: str) -> tuple[object, float]:
    """``(result, scale)`` of the first measurement that fits ``max_length`` (``None``: no limit).

    ``measure(scale)`` is called at scale 1.0 first, then at smaller scales (module
    docstring); raises ``SampleTooLong`` naming ``origin`` when the sample cannot fit.
    """
    scale = 1.0
    for _attempt in range(SHRINK_ATTEMPTS + 1):
        length, visual, result = measure(scale)
        if max_length is None or length <= max_length:
            return result, scale
        text_len = length - visual
        if visual == 0 or text_len >= max_length:
            raise SampleTooLong(
                f"{origin}: {length} tokens ({text_len} of text) do not fit --model_max_length {max_length}; the "
                f"text alone is too long, so the sample is dropped. Raise --model_max_length or shorten the sample.")
        # Visual tokens scale with pixels; aim for the room left by the text, with a margin.
        scale *= max(0.05, 0.9 * (max_length - text_len) / visual)
    raise SampleTooLong(
        f"{origin}: {length} tokens do not fit --model_max_length {max_length} even at the lowest resolution "
        f"--min_pixels allows; the sample is dropped. Raise --model_max_length or lower --min_pixels.")
