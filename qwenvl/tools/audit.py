"""Check every record of the selected datasets once, before a run finds the bad ones.

    python -m qwenvl.tools.audit --dataset_use a,b [--dataset_dictionary F] [--model_name_or_path DIR]
        [--num_workers N] [--report FILE.json] [--model_max_length N] [--verify_media]
        [--bad_sample_policy error|skip] [the data flags of training: --max_pixels ... --video_fps ...]

Each record of each selected annotation file (every record, whatever the ``%`` rate;
a file named twice is read once) is parsed, converted to a conversation and checked
for what training would trip over, in parallel (``--num_workers`` processes, chunks
of ``--chunk_size`` records) with a progress bar.  Problems are reported with
dataset, file, record index, line (JSON/JSONL) and reason, tallied by kind:

* ``invalid_json``: a line or array element that does not parse, or the wrong type;
* ``malformed``: unknown roles, empty conversations, non-string text, bad parts;
* ``tag_mismatch``: ``<image>``/``<video>`` tags that do not match the media listed;
* ``no_assistant``: nothing to train on (no answer, or every answer switched off by ``weight`` 0 / ``loss`` false);
* ``empty_answer``: an assistant turn with no text (only ``<|im_end|>`` would be trained);
* ``media_in_answer``: an ``<image>``/``<video>`` inside an assistant turn (placeholders in the labels);
* ``special_token_text``: a literal ``<|image_pad|>``/``<|video_pad|>`` in a text turn;
* ``missing_media``, ``media_unreachable`` (refused connection, no credentials, a FIFO),
  ``media_timeout`` (longer than ``--media_timeout``), ``bad_image``, ``bad_video``: files that
  are absent, cannot be reached, do not open (the header is read; ``--verify_media`` decodes
  every pixel and frame), images more than 200:1, still images named as videos, or videos
  the decoder training uses cannot read;
* ``too_long``: with ``--model_max_length``, samples training drops because their
  text alone does not fit (samples that only need smaller images are counted as
  ``resized``, not as problems);
* ``box_outside_image``: a box or point (``bbox_2d``, ``point_2d``, Qwen2-VL box
  tokens) that cannot belong to its image in the dataset's ``bbox_format`` (or, when
  undeclared, the family's own coordinates for the image as resized), which training
  refuses (``qwenvl/data/render/grounding.py``);
* ``config``: a relative media path in a dataset without ``data_path``, a missing decoder;
* ``internal_error``: an exception that is not bad data but a bug of ours: training stops on
  it whatever ``--bad_sample_policy`` says (please report it with the record).

Warnings (reported and tallied, never fatal; training logs them): ``starts_with_assistant``,
``ends_with_user`` (a conversation that starts with the answer or ends with an unanswered
question), ``few_frames`` (a video with fewer frames than ``--video_min_frames``).

The kinds are ``DataError.kind`` (``qwenvl.data.errors.DataKind``); whether an exception is
bad data at all is ``errors.bad_sample``, the rule training's skip policy follows.

With ``--model_name_or_path`` every good record is also counted exactly (tokens, text
and visual tokens, vision patches; ``qwenvl.data.batch.count``) and the counts are stored
in the length cache that training, ``pack_data`` and online packing read, under the
same flags.  Without it only the structural and media checks run (said in the output).

Grounding: per dataset the boxes and points are counted, and degenerate boxes (no
area) and records whose coordinates look like another convention than their own
are listed as warnings (``grounding_warnings`` in the report; they do not make a
record bad).  Without ``--model_name_or_path`` the family and resized sizes are
unknown, so undeclared and ``abs_resized`` coordinates are counted but not checked.

The summary prints per dataset: records, bad records, problems by kind, and token
statistics (mean / p50 / p95 / max of tokens, text and visual tokens).  The JSON
report holds the same plus every problem and warning; it is written to ``--report`` (alias
``--output``), by default ``audit_<datasets>.json`` next to the first selected annotation file
(the data it describes; the user cache ``~/.cache/qwenvl/audit`` when that folder cannot be
written), and its path is printed.  Exit status, as ``--bad_sample_policy`` in training:
``error`` (default) exits 1 when any record is bad; ``skip`` exits 0 (training would skip
them; the report still lists them), unless a record raised an ``internal_error`` (exit 1:
training would crash) or the mixture is empty (exit 1; each ``--dataset_use`` entry that
adds no sample, an empty file or a rate of 0, is named either way).  Exit 2: the
dictionary or flags are wrong.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenvl.data.arguments import DataArguments, parse_tool_flags
from qwenvl.data.batch.count import TokenCounter, image_size, probe_video
from qwenvl.data.batch.length_cache import LengthTable, save_lengths
from qwenvl.data.batch.parallel_map import chunk_ranges, parallel_chunks
from qwenvl.data.catalog.conversation_checks import conversation_warnings
from qwenvl.data.catalog.conversation_checks import conversation_of
from qwenvl.data.catalog.formats import Conversation
from qwenvl.data.catalog.mixture import mixture_counts
from qwenvl.data.catalog.registry import DatasetSpec, load_dictionary, parse_dataset_use
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.errors import DataError, DataKind, bad_sample, where
from qwenvl.data.media.video_checks import few_frames_warning
from qwenvl.data.render.grounding import Grounding, may_hold_coordinates
from qwenvl.data.render.grounding_check import GroundingFindings, inspect_coordinates
from qwenvl.data.render.prompt import template_messages
from qwenvl.user_cache import user_cache_dir

INTERNAL_ERROR = "internal_error"  # not bad data: a bug that stops training whatever the policy
# STALE_LENGTH is training's (a rendered sample against its cached row); the audit rebuilds rows instead.
KINDS = tuple(k.value for k in DataKind if k not in (DataKind.CONFIG, DataKind.BAD_SAMPLES, DataKind.STALE_LENGTH)) + (
    DataKind.CONFIG.value, INTERNAL_ERROR)
WARNING_KINDS = ("starts_with_assistant", "ends_with_user", "few_frames")


@dataclass
class AuditArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint whose processor counts tokens (omit: structural checks only)."})
    num_workers: int = field(default=os.cpu_count() or 1, metadata={"help": "Processes reading records."})
    chunk_size: int = field(default=64, metadata={"help": "Records per task handed to a worker."})
    report: str | None = field(
        default=None,
        metadata={"aliases": ["--output"],
                  "help": "Where to write the JSON report (default: audit_<datasets>.json next to the first "
                          "selected annotation file)."})
    model_max_length: int | None = field(
        default=None, metadata={"help": "Report samples training would drop as too long at this length."})
    verify_media: bool = field(
        default=False, metadata={"help": "Decode every image and every sampled video frame (slower), not "
                                         "only headers and the first frame."})
    show: int = field(default=20, metadata={"help": "How many problems to print (all are in the report)."})


def classify(err: BaseException) -> str:
    """The problem kind of an exception raised while reading, converting or counting a record.

    ``errors.bad_sample`` decides, as in training: a ``DataError``'s own kind, else
    ``internal_error`` (a bug of ours; training would crash on the record).
    """
    bad = bad_sample(err)
    return bad.kind.value if bad is not None else INTERNAL_ERROR


# --------------------------------------------------------------------------- one record

def _check_media(conversation: Conversation, video_settings, verify: bool) -> list[tuple[str, str]]:
    """Image headers (every pixel with ``verify``); videos probed (every sampled frame decoded with ``verify``).

    Returns the videos' ``few_frames`` warnings as ``(kind, message)``.
    """
    from qwenvl.data.media.video import load_video

    _, images, videos = template_messages(conversation)
    for ref in images:
        image_size(ref, conversation.origin, verify=verify, timeout_s=video_settings.timeout_s)
    warnings = []
    for ref in videos:
        if verify:
            clip = load_video(ref, video_settings, origin=conversation.origin)
            total, fps = clip.total_frames, clip.source_fps
        else:
            probe = probe_video(ref, video_settings, conversation.origin)
            total, fps = probe.total_frames, probe.fps
        message = few_frames_warning(total, fps, video_settings)
        if message:
            warnings.append(("few_frames", f"{conversation.origin}: {ref}: {message}"))
    return warnings


def _video_warnings(conversation: Conversation, media: tuple, video_settings) -> list[tuple[str, str]]:
    """``few_frames`` warnings of the videos a counter probed (``TokenCounter.media``)."""
    _, _, refs = template_messages(conversation)
    out = []
    for ref, (probe, _plan) in zip(refs, media[1]):
        message = few_frames_warning(probe.total_frames, probe.fps, video_settings)
        if message:
            out.append(("few_frames", f"{conversation.origin}: {ref}: {message}"))
    return out


def _grounding_findings(samples: list[Conversation], grounding: Grounding | None) -> GroundingFindings:
    """The boxes/points findings of a record's samples (image headers read only where text may hold some)."""
    findings = GroundingFindings()
    for c in samples:
        if may_hold_coordinates(c):
            _, refs, _ = template_messages(c)
            sizes = [(w, h) for h, w in (image_size(ref, c.origin) for ref in refs)]
            findings.add(inspect_coordinates(c, sizes, grounding))
    return findings


def audit_record(source, spec: DatasetSpec, index: int, counter: TokenCounter | None, video_settings,
                 capped: TokenCounter | None, verify: bool) -> tuple:
    """``(row, kind, reason, resized, grounding, warnings)`` for one record.

    ``row``: the full-resolution ``(tokens, visual, patches)``, or None when the record
    cannot be counted (or there is no counter); ``kind``/``reason``: the problem, or
    None; ``capped``: a counter with ``--model_max_length``, to replay what training does
    with samples above it (``resized``: they fit at a lower resolution); ``grounding``: its
    ``GroundingFindings`` (None when the record could not be read); ``warnings``:
    ``(kind, message)`` pairs (``WARNING_KINDS``).
    """
    at = where(spec.name, spec.annotation_path, index)
    warnings: list[tuple[str, str]] = []

    def problem(err: BaseException, row=None) -> tuple:  # one bad record must never stop the audit
        kind = classify(err)
        if kind == INTERNAL_ERROR:
            reason = (f"{type(err).__name__}: {err} (not a problem of the data but a bug of qwenvl: training stops "
                      "here whatever --bad_sample_policy says; please report it with this record)")
        else:
            reason = str(err)
        return row, kind, reason if spec.annotation_path in reason else f"{at}: {reason}", False, None, warnings

    try:
        conversation = conversation_of(source, spec, index)
        samples = conversation if isinstance(conversation, list) else [conversation]
        for c in samples:
            warnings += [(w.kind, w.message) for w in conversation_warnings(c)]
        findings = _grounding_findings(samples, getattr(counter, "grounding", None))
        if findings.outside:  # training refuses these records
            more = f" ({len(findings.outside)} in this record)" if len(findings.outside) > 1 else ""
            return None, DataKind.BOX_OUTSIDE_IMAGE.value, findings.outside[0] + more, False, findings, warnings
        if counter is None:
            for c in samples:
                warnings += _check_media(c, video_settings, verify)
            return None, None, None, False, findings, warnings
        counted = []
        for c in samples:
            media = counter.media(c)
            warnings += _video_warnings(c, media, video_settings)
            if verify:
                _check_media(c, video_settings, verify=True)
            counted.append((c, media, counter.count(c, media)))
    except Exception as err:
        return problem(err)
    row = tuple(int(sum(length.row()[k] for _, _, length in counted)) for k in range(3))
    resized = False
    if capped is not None:
        try:
            for c, media, length in counted:
                if length.tokens > capped.model_max_length:
                    capped.count(c, media)  # raises SampleTooLong when training would drop it
                    resized = True
        except Exception as err:
            return problem(err, row)
    return row, None, None, resized, findings, warnings


def _audit_chunk(state, task):
    datasets, counter, video_settings, capped, verify = state
    d, start, stop = task
    spec, source = datasets[d]
    return [audit_record(source, spec, i, counter, video_settings, capped, verify) for i in range(start, stop)]


# --------------------------------------------------------------------------- reporting

def _line_numbers(source, indices: list[int]) -> dict[int, int]:
    """1-based line of the first byte of each record (JSON/JSONL files), in one pass over the file."""
    offsets = getattr(source, "offsets", None)
    if offsets is None or not indices or not os.path.isfile(source.path):
        return {}
    wanted = {}
    for i in indices:
        raw = source._raw(i)
        wanted[i] = int(offsets[i]) + len(raw) - len(raw.lstrip(b" \t\r\n"))
    positions = sorted(set(wanted.values()))
    line_at, base, newlines, k = {}, 0, 0, 0
    with open(source.path, "rb") as f:
        while k < len(positions) and (chunk := f.read(1 << 20)):
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + base
            while k < len(positions) and positions[k] < base + len(chunk):
                line_at[positions[k]] = newlines + int(np.searchsorted(nl, positions[k])) + 1
                k += 1
            newlines += nl.size
            base += len(chunk)
    return {i: line_at[p] for i, p in wanted.items() if p in line_at}


def _grounding_entry(name: str, spec: DatasetSpec, records: list, warnings: list) -> dict:
    """Per-dataset box/point counts; degenerate and other-convention findings appended to ``warnings``."""
    total, with_coordinates = GroundingFindings(), 0
    for i, record in enumerate(records):
        found = record[4]
        if found is None:
            continue
        with_coordinates += bool(found.boxes or found.points)
        total.add(found)
        for kind in ("degenerate", "other_convention"):
            warnings.extend({"dataset": name, "record": i, "kind": kind, "reason": r} for r in getattr(found, kind))
    return {"bbox_format": spec.bbox_format, "records_with_coordinates": with_coordinates, "boxes": total.boxes,
            "points": total.points, "outside": len(total.outside), "degenerate": len(total.degenerate),
            "other_convention": len(total.other_convention)}


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {"mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50, method="lower")),
            "p95": int(np.percentile(values, 95, method="lower")), "max": int(values.max())}


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def summary_table(report: dict) -> str:
    """The per-dataset summary as aligned text columns."""
    head = ["dataset", "records", "bad", "resized", "tok mean", "p50", "p95", "max", "text mean", "visual mean"]
    rows = []
    for name, d in report["datasets"].items():
        t, x, v = d["tokens"], d["text_tokens"], d["visual_tokens"]
        rows.append([name, d["records"], d["bad"], d["resized"], t["mean"], t["p50"], t["p95"], t["max"],
                     x["mean"], v["mean"]])
    cells = [head] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    kinds = [k for k in KINDS if any(d["problems_by_kind"].get(k) for d in report["datasets"].values())]
    warned = [k for k in WARNING_KINDS
              if any(d.get("warnings_by_kind", {}).get(k) for d in report["datasets"].values())]
    if kinds:
        lines.append("")
        lines.append("problems by kind: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {d['problems_by_kind'][k]}" for k in kinds if d["problems_by_kind"].get(k))
            for name, d in report["datasets"].items() if d["bad"]))
    if warned:
        lines.append("warnings by kind: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {d['warnings_by_kind'][k]}" for k in warned if d["warnings_by_kind"].get(k))
            for name, d in report["datasets"].items() if d.get("warnings_by_kind")))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run

def _selected(data_args: DataArguments) -> list[tuple[str, DatasetSpec, list[str]]]:
    """(name, spec, other names of the same file) for each distinct file of --dataset_use."""
    dictionary = load_dictionary(data_args.dataset_dictionary)
    entries = parse_dataset_use(data_args.dataset_use, dictionary)
    seen: dict[tuple[str, str], int] = {}
    out: list[tuple[str, DatasetSpec, list[str]]] = []
    for entry in entries:
        # One file read in two thinking modes counts differently: audited once per mode.
        key = (entry.spec.annotation_path, entry.spec.data_path, entry.spec.enable_thinking)
        if key in seen:
            out[seen[key]][2].append(entry.spec.name)
            continue
        seen[key] = len(out)
        out.append((entry.spec.name, entry.spec, []))
    return out


def _counter(audit_args: AuditArguments, data_args: DataArguments):
    """(counter or None, video settings) for the flags."""
    from qwenvl.data.media.video import VideoSettings

    if audit_args.model_name_or_path is None:
        settings = VideoSettings(fps=data_args.video_fps, min_frames=data_args.video_min_frames,
                                 max_frames=data_args.video_max_frames, backend=data_args.video_backend,
                                 timeout_s=data_args.media_timeout)
        return None, settings
    from qwenvl.data.media.video import video_settings_from
    from qwenvl.data.render.processor_settings import configure_processor

    from qwenvl.train.model import check_model_dir, read_config, read_processor

    check_model_dir(audit_args.model_name_or_path)  # an adapter folder, no config.json: a message
    processor = configure_processor(read_processor(audit_args.model_name_or_path), data_args)
    settings = video_settings_from(data_args, processor)
    grounding = Grounding(read_config(audit_args.model_name_or_path).model_type, processor.image_processor)
    return TokenCounter(processor, settings, None, grounding, data_args.enable_thinking), settings


def _empty_entries(data_args: DataArguments, records: dict[str, int]) -> dict:
    """Which ``--dataset_use`` entries add no sample (an empty file, a rate of 0), and whether all of them do."""
    entries = parse_dataset_use(data_args.dataset_use, load_dictionary(data_args.dataset_dictionary))
    counts = mixture_counts(entries, [records[e.spec.annotation_path] for e in entries])
    names = [{"dataset": e.spec.name, "file": e.spec.annotation_path, "records": records[e.spec.annotation_path],
              "rate": e.rate} for e, n in zip(entries, counts) if n == 0]
    return {"entries": names, "mixture": sum(counts) == 0}


def run_audit(data_args: DataArguments, audit_args: AuditArguments, progress: bool = True) -> tuple[dict, int]:
    """Audit the datasets; returns the report and the exit status (see the module docstring)."""
    start = time.perf_counter()
    selected = _selected(data_args)
    counter, video_settings = _counter(audit_args, data_args)
    datasets = [(spec, open_annotations(spec.annotation_path)) for _, spec, _ in selected]
    tasks = [(d, a, b) for d, (_, source) in enumerate(datasets)
             for a, b in chunk_ranges(len(source), max(1, audit_args.chunk_size))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(s) for _, s in datasets), desc="audit", unit="rec")
    capped = None
    if counter is not None and audit_args.model_max_length is not None:
        capped = counter.with_max_length(audit_args.model_max_length)
    state = (datasets, counter, video_settings, capped, audit_args.verify_media)
    check_start = time.perf_counter()
    results = parallel_chunks(_audit_chunk, state, tasks, audit_args.num_workers,
                              on_result=(lambda t, r: bar.update(len(r))) if bar else None)
    if bar:
        bar.close()
    check_seconds = time.perf_counter() - check_start
    per_dataset: list[list] = [[] for _ in datasets]
    for (d, _, _), chunk in zip(tasks, results):
        per_dataset[d].extend(chunk)

    report = {"datasets": {}, "problems": [], "warnings": [], "token_counts": counter is not None,
              "model_name_or_path": audit_args.model_name_or_path, "model_max_length": audit_args.model_max_length,
              "verify_media": audit_args.verify_media, "bad_sample_policy": data_args.bad_sample_policy,
              "grounding_warnings": [],
              # whether the model's template has think blocks (None without a model)
              "thinking_models": counter.chat.rules.think_blocks if counter is not None else None}
    for (name, spec, aliases), (_, source), records in zip(selected, datasets, per_dataset):
        bad = [i for i, r in enumerate(records) if r[1] is not None]
        warned = [i for i, r in enumerate(records) if r[5]]
        lines = _line_numbers(source, sorted(set(bad) | set(warned)))
        by_kind: dict[str, int] = {}
        for i in bad:
            _, kind, reason, _, _, _ = records[i]
            by_kind[kind] = by_kind.get(kind, 0) + 1
            report["problems"].append({"dataset": name, "file": spec.annotation_path, "record": i,
                                       "line": lines.get(i), "kind": kind, "reason": reason})
        warnings_by_kind: dict[str, int] = {}
        for i in warned:
            for kind, message in records[i][5]:
                warnings_by_kind[kind] = warnings_by_kind.get(kind, 0) + 1
                report["warnings"].append({"dataset": name, "file": spec.annotation_path, "record": i,
                                           "line": lines.get(i), "kind": kind, "message": message})
        internal = by_kind.get(INTERNAL_ERROR, 0)
        entry = {"annotation_path": spec.annotation_path, "data_path": spec.data_path, "also_named": aliases,
                 "records": len(records), "bad": len(bad), "problems_by_kind": by_kind,
                 "warnings_by_kind": warnings_by_kind, "internal_errors": internal,
                 "resized": sum(1 for r in records if r[3]), "length_cache": None}
        rows = np.array([r[0] for r in records if r[0] is not None], dtype=np.int64).reshape(-1, 3)
        text = rows[:, 0] - rows[:, 1]
        entry.update(tokens=_stats(rows[:, 0]), text_tokens=_stats(text), visual_tokens=_stats(rows[:, 1]),
                     vision_patches=_stats(rows[:, 2]))
        if counter is not None and not internal:  # a bug is never cached as a bad record
            # Full-resolution rows (too_long records keep theirs: that depends on the max length).
            table = LengthTable.from_results((r[0], r[2], r[1]) for r in records)
            path = save_lengths(spec, counter, table, None)
            entry["length_cache"] = str(path) if path else None
        entry["grounding"] = _grounding_entry(name, spec, records, report["grounding_warnings"])
        # The Qwen3.5/3.6 thinking mode its records render in, and where it was set.
        entry["enable_thinking"] = {"mode": spec.enable_thinking or data_args.enable_thinking,
                                    "from": "dataset_dictionary" if spec.enable_thinking else "--enable_thinking"}
        report["datasets"][name] = entry
    total = sum(d["records"] for d in report["datasets"].values())
    bad_total = sum(d["bad"] for d in report["datasets"].values())
    seconds = time.perf_counter() - start
    # records/s over the reading and checking only: loading the processor is a fixed cost.
    report.update(records=total, bad=bad_total, seconds=round(seconds, 3), check_seconds=round(check_seconds, 3),
                  records_per_s=round(total / check_seconds, 1) if check_seconds > 0 else None,
                  num_workers=audit_args.num_workers)
    internal_total = sum(d["internal_errors"] for d in report["datasets"].values())
    report["internal_errors"] = internal_total
    report["empty"] = _empty_entries(data_args, {spec.annotation_path: len(source) for spec, source in datasets})
    status = 1 if internal_total or report["empty"]["mixture"] or (
        bad_total and data_args.bad_sample_policy == "error") else 0
    report["exit_status"] = status
    return report, status


def format_report(report: dict, show: int = 20) -> str:
    lines = []
    if not report["token_counts"]:
        lines.append("No --model_name_or_path: structural and media checks only (no token counts, no length "
                     "check, length cache not written).")
    lines.append(summary_table(report))
    modes = {n: d["enable_thinking"] for n, d in report["datasets"].items() if d.get("enable_thinking")}
    if report.get("thinking_models") or any(m["from"] == "dataset_dictionary" for m in modes.values()):
        lines.append("thinking mode (Qwen3.5/3.6): " + "; ".join(
            f"{n}: {m['mode']} ({m['from']})" for n, m in modes.items()))
    grounded = {n: d["grounding"] for n, d in report["datasets"].items() if d["grounding"]["records_with_coordinates"]}
    if grounded:
        lines.append("")
        lines.append("grounding: " + "; ".join(
            f"{n}: {g['boxes']} boxes, {g['points']} points in {g['records_with_coordinates']} records "
            f"(bbox_format {g['bbox_format'] or 'undeclared'}), outside their image {g['outside']}, "
            f"degenerate {g['degenerate']}, other convention {g['other_convention']}" for n, g in grounded.items()))
        warnings = report["grounding_warnings"]
        for w in warnings[:show]:
            lines.append(f"  [{w['kind']}] {w['dataset']} record {w['record']}: {w['reason']}")
        if len(warnings) > show:
            lines.append(f"  ... {len(warnings) - show} more grounding warnings in the report")
    problems = report["problems"]
    if problems:
        lines.append("")
        lines.append(f"{len(problems)} bad record(s); the first {min(show, len(problems))}:")
        for p in problems[:show]:
            line = f" line {p['line']}" if p.get("line") else ""
            lines.append(f"  [{p['kind']}] {p['dataset']} record {p['record']}{line}: {p['reason']}")
    warnings = report.get("warnings", [])
    if warnings:
        lines.append("")
        lines.append(f"{len(warnings)} warning(s) (training accepts these records; check them); the first "
                     f"{min(show, len(warnings))}:")
        for w in warnings[:show]:
            line = f" line {w['line']}" if w.get("line") else ""
            lines.append(f"  [{w['kind']}] {w['dataset']} record {w['record']}{line}: {w['message']}")
    policy = report["bad_sample_policy"]
    internal = report.get("internal_errors", 0)
    if internal:
        verdict = (f"training would stop with an internal error on {internal} record(s), whatever "
                   "--bad_sample_policy (a bug of qwenvl: please report it with the record)")
    else:
        verdict = ("no problems" if not problems else
                   f"training with --bad_sample_policy {policy} would "
                   + ("stop at the first of them" if policy == "error" else f"skip these {len(problems)} record(s)"))
    if warnings:
        verdict += f"; {len(warnings)} warning(s)"
    empty = report.get("empty", {"entries": [], "mixture": False})
    for e in empty["entries"]:
        if not e["records"]:
            why = "its file holds no records"
        elif e["rate"] == 0:
            why = "its rate is 0"
        else:  # a rate too small for the file: say what it comes to, not a number like 1e-07
            why = f"{e['rate'] * 100:g}% of its {e['records']} records rounds to 0 samples; raise its rate"
        lines.append(f"dataset '{e['dataset']}' adds no sample to the mixture: {why} ({e['file']}).")
    if empty["mixture"]:
        verdict = "the mixture is empty: training would have no sample; " + verdict
    lines.append("")
    lines.append(f"{report['records']} records checked in {report['check_seconds']:.1f} s "
                 f"({report['records_per_s']} records/s with {report['num_workers']} workers; "
                 f"{report['seconds']:.1f} s in all); {verdict}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qwenvl.train.arguments import ConfigError

    try:
        # An invalid flag value (--bad_sample_policy skipp) or an unknown flag is a DataConfigError: a message,
        # not a traceback.
        data_args, audit_args = parse_tool_flags((DataArguments, AuditArguments), argv)
        report, status = run_audit(data_args, audit_args, progress=True)
    except (DataError, ConfigError) as err:  # ConfigError: an unusable --model_name_or_path
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report, audit_args.show))
    path = write_report(report, audit_args.report, _selected(data_args))
    print(f"report: {path}")
    return status


def default_report_paths(selected) -> list[Path]:
    """Where the report goes without ``--report``: next to the first selected annotation file, else the
    user cache (a URL, or a folder we cannot write)."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "+".join(name for name, _, _ in selected))[:80]
    name = f"audit_{tag}.json"
    cache = user_cache_dir("audit") / name
    first = selected[0][1].annotation_path if selected else ""
    if not first or "://" in first:
        return [cache]
    return [Path(first).resolve().parent / name, cache]


def write_report(report: dict, path: str | None, selected) -> Path:
    """Write the JSON report to ``path`` (or the first writable default place); returns where."""
    def write(target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=1))
        return target

    candidates = [Path(path)] if path else default_report_paths(selected)
    for candidate in candidates[:-1]:
        try:
            return write(candidate)
        except OSError:  # not writable: the next place
            continue
    return write(candidates[-1])


if __name__ == "__main__":
    raise SystemExit(main())
