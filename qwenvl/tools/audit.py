"""Check every record of the selected datasets once, before a run finds the bad ones.

    python -m qwenvl.tools.audit --dataset_use a,b [--dataset_dictionary F] [--model_name_or_path DIR]
        [--num_workers N] [--report audit_report.json] [--model_max_length N] [--verify_media]
        [--bad_sample_policy error|skip] [the data flags of training: --max_pixels ... --video_fps ...]

Each record of each selected annotation file (every record, whatever the ``%`` rate;
a file named twice is read once) is parsed, converted to a conversation and checked
for what training would trip over, in parallel (``--num_workers`` processes, chunks
of ``--chunk_size`` records) with a progress bar.  Problems are reported with
dataset, file, record index, line (JSON/JSONL) and reason, tallied by kind:

* ``invalid_json``: a line or array element that does not parse, or the wrong type;
* ``malformed``: unknown roles, empty conversations, non-string text, bad parts;
* ``tag_mismatch``: ``<image>``/``<video>`` tags that do not match the media listed;
* ``no_assistant``: nothing to train on;
* ``missing_media``, ``bad_image``, ``bad_video``: files that are absent, do not
  open (the header is read; ``--verify_media`` decodes every pixel and frame), or
  videos the decoder training uses cannot read;
* ``too_long``: with ``--model_max_length``, samples training drops because their
  text alone does not fit (samples that only need smaller images are counted as
  ``resized``, not as problems);
* ``other``: anything else rendering would raise.

With ``--model_name_or_path`` every good record is also counted exactly (tokens, text
and visual tokens, vision patches; ``qwenvl.data.lengths``) and the counts are stored
in the length cache that training, ``pack_data`` and online packing read, under the
same flags.  Without it only the structural and media checks run (said in the output).

The summary prints per dataset: records, bad records, problems by kind, and token
statistics (mean / p50 / p95 / max of tokens, text and visual tokens).  The JSON
report holds the same plus every problem.  Exit status, as ``--bad_sample_policy``
in training: ``error`` (default) exits 1 when any record is bad; ``skip`` exits 0
(training would skip them; the report still lists them).  Exit 2: the dictionary
or flags are wrong.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from qwenvl.data.arguments import DataArguments
from qwenvl.data.errors import DataError, where
from qwenvl.data.formats import Conversation
from qwenvl.data.lengths import (LengthTable, MediaError, TokenCounter, chunk_ranges, conversation_of,
                                 image_size, parallel_chunks, probe_video, save_lengths)
from qwenvl.data.registry import DatasetSpec, load_dictionary, parse_dataset_use
from qwenvl.data.prompt import template_messages
from qwenvl.data.render import SampleTooLong
from qwenvl.data.sources import open_annotations

KINDS = ("invalid_json", "malformed", "tag_mismatch", "no_assistant", "missing_media", "bad_image", "bad_video",
         "too_long", "other")


@dataclass
class AuditArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint whose processor counts tokens (omit: structural checks only)."})
    num_workers: int = field(default=os.cpu_count() or 1, metadata={"help": "Processes reading records."})
    chunk_size: int = field(default=64, metadata={"help": "Records per task handed to a worker."})
    report: str = field(default="audit_report.json", metadata={"help": "Where to write the JSON report."})
    model_max_length: int | None = field(
        default=None, metadata={"help": "Report samples training would drop as too long at this length."})
    verify_media: bool = field(
        default=False, metadata={"help": "Decode every image and every sampled video frame (slower), not "
                                         "only headers and the first frame."})
    show: int = field(default=20, metadata={"help": "How many problems to print (all are in the report)."})


def classify(err: BaseException) -> str:
    """The problem kind of an exception raised while reading, converting or counting a record."""
    if isinstance(err, SampleTooLong):
        return "too_long"
    if isinstance(err, MediaError):
        return err.kind
    if not isinstance(err, DataError):
        return "other"
    msg = str(err)
    if "is not valid JSON" in msg or "expected a JSON object" in msg or "expected a list of samples" in msg \
            or "a record must be a JSON object" in msg:
        return "invalid_json"
    if "placeholder(s) but" in msg:
        return "tag_mismatch"
    if "no assistant turn" in msg or "no assistant reply" in msg:
        return "no_assistant"
    if "not found" in msg:
        return "missing_media"
    if "cannot read image" in msg or "as an image" in msg:
        return "bad_image"
    if "video" in msg and ("decode" in msg or "frame" in msg or "empty" in msg):
        return "bad_video"
    return "malformed"


# --------------------------------------------------------------------------- one record

def _check_media(conversation: Conversation, video_settings, verify: bool) -> None:
    """Image headers (every pixel with ``verify``); videos probed (every sampled frame decoded with ``verify``)."""
    from qwenvl.data.video import load_video

    _, images, videos = template_messages(conversation)
    for ref in images:
        image_size(ref, conversation.origin, verify=verify)
    for ref in videos:
        if verify:
            load_video(ref, video_settings, origin=conversation.origin)
        else:
            probe_video(ref, video_settings, conversation.origin)


def audit_record(source, spec: DatasetSpec, index: int, counter: TokenCounter | None, video_settings,
                 capped: TokenCounter | None, verify: bool) -> tuple:
    """``(row, kind, reason, resized)`` for one record.

    ``row``: the full-resolution ``(tokens, visual, patches)``, or None when the record
    cannot be counted (or there is no counter); ``kind``/``reason``: the problem, or
    None; ``capped``: a counter with ``--model_max_length``, to replay what training does
    with samples above it (``resized``: they fit at a lower resolution).
    """
    at = where(spec.name, spec.annotation_path, index)

    def problem(err: BaseException, row=None) -> tuple:  # one bad record must never stop the audit
        reason = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
        return row, classify(err), reason if spec.annotation_path in reason else f"{at}: {reason}", False

    try:
        conversation = conversation_of(source, spec, index)
        samples = conversation if isinstance(conversation, list) else [conversation]
        if counter is None:
            for c in samples:
                _check_media(c, video_settings, verify)
            return None, None, None, False
        counted = []
        for c in samples:
            media = counter.media(c)
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
    return row, None, None, resized


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
    if kinds:
        lines.append("")
        lines.append("problems by kind: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {d['problems_by_kind'][k]}" for k in kinds if d["problems_by_kind"].get(k))
            for name, d in report["datasets"].items() if d["bad"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run

def _selected(data_args: DataArguments) -> list[tuple[str, DatasetSpec, list[str]]]:
    """(name, spec, other names of the same file) for each distinct file of --dataset_use."""
    dictionary = load_dictionary(data_args.dataset_dictionary)
    entries = parse_dataset_use(data_args.dataset_use, dictionary)
    seen: dict[tuple[str, str], int] = {}
    out: list[tuple[str, DatasetSpec, list[str]]] = []
    for entry in entries:
        key = (entry.spec.annotation_path, entry.spec.data_path)
        if key in seen:
            out[seen[key]][2].append(entry.spec.name)
            continue
        seen[key] = len(out)
        out.append((entry.spec.name, entry.spec, []))
    return out


def _counter(audit_args: AuditArguments, data_args: DataArguments):
    """(counter or None, video settings) for the flags."""
    from qwenvl.data.video import VideoSettings

    if audit_args.model_name_or_path is None:
        settings = VideoSettings(fps=data_args.video_fps, min_frames=data_args.video_min_frames,
                                 max_frames=data_args.video_max_frames, backend=data_args.video_backend)
        return None, settings
    from transformers import AutoProcessor

    from qwenvl.data.dataset import video_settings_from
    from qwenvl.data.processor_settings import configure_processor

    processor = configure_processor(AutoProcessor.from_pretrained(audit_args.model_name_or_path), data_args)
    settings = video_settings_from(data_args, processor)
    return TokenCounter(processor, settings, None, data_args.enable_thinking), settings


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

    report = {"datasets": {}, "problems": [], "token_counts": counter is not None,
              "model_name_or_path": audit_args.model_name_or_path, "model_max_length": audit_args.model_max_length,
              "verify_media": audit_args.verify_media, "bad_sample_policy": data_args.bad_sample_policy}
    for (name, spec, aliases), (_, source), records in zip(selected, datasets, per_dataset):
        bad = [i for i, r in enumerate(records) if r[1] is not None]
        lines = _line_numbers(source, bad)
        by_kind: dict[str, int] = {}
        for i in bad:
            _, kind, reason, _ = records[i]
            by_kind[kind] = by_kind.get(kind, 0) + 1
            report["problems"].append({"dataset": name, "file": spec.annotation_path, "record": i,
                                       "line": lines.get(i), "kind": kind, "reason": reason})
        entry = {"annotation_path": spec.annotation_path, "data_path": spec.data_path, "also_named": aliases,
                 "records": len(records), "bad": len(bad), "problems_by_kind": by_kind,
                 "resized": sum(1 for r in records if r[3]), "length_cache": None}
        rows = np.array([r[0] for r in records if r[0] is not None], dtype=np.int64).reshape(-1, 3)
        text = rows[:, 0] - rows[:, 1]
        entry.update(tokens=_stats(rows[:, 0]), text_tokens=_stats(text), visual_tokens=_stats(rows[:, 1]),
                     vision_patches=_stats(rows[:, 2]))
        if counter is not None:
            # Full-resolution rows (too_long records keep theirs: that depends on the max length).
            table = LengthTable.from_results((r[0], r[2]) for r in records)
            path = save_lengths(spec, counter, table, None)
            entry["length_cache"] = str(path) if path else None
        report["datasets"][name] = entry
    total = sum(d["records"] for d in report["datasets"].values())
    bad_total = sum(d["bad"] for d in report["datasets"].values())
    seconds = time.perf_counter() - start
    # records/s over the reading and checking only: loading the processor is a fixed cost.
    report.update(records=total, bad=bad_total, seconds=round(seconds, 3), check_seconds=round(check_seconds, 3),
                  records_per_s=round(total / check_seconds, 1) if check_seconds > 0 else None,
                  num_workers=audit_args.num_workers)
    status = 1 if bad_total and data_args.bad_sample_policy == "error" else 0
    report["exit_status"] = status
    return report, status


def format_report(report: dict, show: int = 20) -> str:
    lines = []
    if not report["token_counts"]:
        lines.append("No --model_name_or_path: structural and media checks only (no token counts, no length "
                     "check, length cache not written).")
    lines.append(summary_table(report))
    problems = report["problems"]
    if problems:
        lines.append("")
        lines.append(f"{len(problems)} bad record(s); the first {min(show, len(problems))}:")
        for p in problems[:show]:
            line = f" line {p['line']}" if p.get("line") else ""
            lines.append(f"  [{p['kind']}] {p['dataset']} record {p['record']}{line}: {p['reason']}")
    policy = report["bad_sample_policy"]
    verdict = ("no problems" if not problems else
               f"training with --bad_sample_policy {policy} would "
               + ("stop at the first of them" if policy == "error" else f"skip these {len(problems)} record(s)"))
    lines.append("")
    lines.append(f"{report['records']} records checked in {report['check_seconds']:.1f} s "
                 f"({report['records_per_s']} records/s with {report['num_workers']} workers; "
                 f"{report['seconds']:.1f} s in all); {verdict}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    data_args, audit_args = HfArgumentParser((DataArguments, AuditArguments)).parse_args_into_dataclasses(argv)
    try:
        report, status = run_audit(data_args, audit_args, progress=True)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report, audit_args.show))
    if audit_args.report:
        os.makedirs(os.path.dirname(os.path.abspath(audit_args.report)), exist_ok=True)
        with open(audit_args.report, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {audit_args.report}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
