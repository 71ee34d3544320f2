"""The one exception type for bad data, what kind of problem it is, and where it is.

Every problem a user can fix in their data or dictionary ends up as a
``DataError`` whose message names where the problem is (dataset, file,
record) and what to do about it, so entry points can print it without a
traceback and exit non-zero.

Code decides on ``DataError.kind`` (a ``DataKind``) and ``DataError.origin`` (an
``Origin``), never on the wording of a message.  ``bad_sample(exc)`` is the one rule
for "is this exception bad data?": training's ``--bad_sample_policy``, the length
cache and the audit all ask it, so the audit never calls "would be skipped" a record
that training crashes on.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class DataKind(str, enum.Enum):
    """What is wrong with a record (the audit tallies these; the values are its report keys)."""

    INVALID_JSON = "invalid_json"  # a line or array element that does not parse, or the wrong JSON type
    MALFORMED = "malformed"  # unknown roles, empty conversations, non-string text, bad parts
    TAG_MISMATCH = "tag_mismatch"  # <image>/<video> tags that do not match the media listed
    NO_ASSISTANT = "no_assistant"  # nothing to train on
    EMPTY_ANSWER = "empty_answer"  # an assistant turn with no text: only <|im_end|> would be trained
    MEDIA_IN_ANSWER = "media_in_answer"  # an image/video inside an assistant turn: placeholders in the labels
    SPECIAL_TOKEN_TEXT = "special_token_text"  # a literal <|image_pad|> (or <|video_pad|>) in a text turn
    MISSING_MEDIA = "missing_media"  # a media file or URL that does not exist
    MEDIA_UNREACHABLE = "media_unreachable"  # refused connection, no credentials, not a regular file
    MEDIA_TIMEOUT = "media_timeout"  # a read that did not finish within --media_timeout
    BAD_IMAGE = "bad_image"  # does not open as an image, or a shape the processor refuses
    BAD_VIDEO = "bad_video"  # does not decode as a video (a still image named .mp4 included)
    TOO_LONG = "too_long"  # does not fit --model_max_length even shrunk
    BOX_OUTSIDE_IMAGE = "box_outside_image"  # a box or point that cannot belong to its image (grounding)
    STALE_LENGTH = "stale_length"  # renders longer than its length-cache row: refused under a token budget
    CONFIG = "config"  # the dictionary, --dataset_use or a data flag (not one record)
    BAD_SAMPLES = "bad_samples"  # several records cannot be rendered (the message lists them)


@dataclass(frozen=True)
class Origin:
    """Where a problem is: any of dataset, annotation file, record, line, media path."""

    dataset: str | None = None
    file: str | None = None
    record: int | str | None = None
    line: int | None = None
    media: str | None = None

    def text(self) -> str:
        """``dataset 'demo', file a.jsonl, record 12`` (the media path is named by the message)."""
        return where(self.dataset, self.file, self.record)

    def merged(self, other: "Origin | None") -> "Origin":
        """This origin with the fields it lacks taken from ``other``."""
        if other is None:
            return self
        return replace(self, **{k: getattr(other, k) for k in self.__dataclass_fields__
                                if getattr(self, k) is None and getattr(other, k) is not None})


class DataError(ValueError):
    """A problem in the user's data or dataset dictionary, with its fix in the message.

    ``kind``: a ``DataKind`` (default: the class's ``default_kind``, ``MALFORMED``);
    ``origin``: an ``Origin`` (what is known where it was raised; ``locate`` adds the rest
    on the way up).
    """

    default_kind = DataKind.MALFORMED  # subclasses of one kind (SampleTooLong) set theirs

    def __init__(self, message: str, kind: DataKind | str | None = None, origin: Origin | None = None):
        super().__init__(message)
        self.kind = DataKind(kind) if kind is not None else type(self).default_kind
        self.origin = origin or Origin()

    def __reduce__(self):  # keep kind and origin across processes (dataloader and audit workers)
        return (type(self), (str(self), self.kind, self.origin))

    def locate(self, origin: Origin) -> "DataError":
        """Fill in the fields of ``origin`` this error lacks and prefix its message with the location
        unless the message names it already; returns the error itself (re-raise it)."""
        message = str(self)
        # Messages raised below the dataset layer name only the file or the media path: add the rest.
        if origin.text() not in message:
            self.args = (f"{origin.text()}: {message}",)
        self.origin = self.origin.merged(origin)
        return self


class DataConfigError(DataError):
    """Invalid data flags: ``problems`` lists each with its fix (all of them, not only the first)."""

    default_kind = DataKind.CONFIG

    def __init__(self, problems: list[str] | str, kind: DataKind | str | None = None, origin: Origin | None = None):
        if isinstance(problems, str):  # unpickled: the whole message
            message, problems = problems, [problems]
        else:
            message = "Invalid data arguments:\n  - " + "\n  - ".join(problems)
        super().__init__(message, kind, origin)
        self.problems = list(problems)


@dataclass(frozen=True)
class DataWarning:
    """Something a record does that training accepts but is likely a mistake (the audit reports it)."""

    kind: str  # "starts_with_assistant" | "ends_with_user" | "few_frames"
    message: str
    origin: Origin = Origin()


def bad_sample(exc: BaseException) -> DataError | None:
    """The ``DataError`` when ``exc`` is bad data (skip or report it), ``None`` when it is a bug (crash).

    Only ``DataError`` is bad data.  The code that reads the user's bytes (annotation
    files, images, videos, URLs) turns every failure of those bytes into one with its
    kind, and the conversation checks reject up front what the processor would refuse
    (a literal ``<|image_pad|>`` in text, an aspect ratio above 200).  Anything else
    (a ``KeyError`` in our code, a processor ``ValueError`` we did not foresee) is a bug
    to fix, not a sample to drop: training stops with its traceback, the length cache
    never stores it, and the audit reports it as ``internal_error``.
    """
    return exc if isinstance(exc, DataError) else None


def where(dataset: str | None = None, file: str | None = None, record: int | str | None = None) -> str:
    """Format the location of a problem, e.g. ``dataset 'demo', file a.jsonl, record 12``."""
    parts = []
    if dataset is not None:
        parts.append(f"dataset '{dataset}'")
    if file is not None:
        parts.append(f"file {file}")
    if record is not None:
        parts.append(f"record {record}")
    return ", ".join(parts) if parts else "<unknown location>"
