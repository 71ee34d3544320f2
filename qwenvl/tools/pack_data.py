"""Pack a dataset mixture offline into a packed annotation file for ``--data_packing``.

    python -m qwenvl.tools.pack_data --dataset_use a%50,b --model_name_or_path DIR --model_max_length 8192
        [--max_patches_per_pack P] --output packed.json [--register_as NAME] [--num_workers N]
        [--algorithm bfd|ffd|next_fit] [--seed 42] [--report packed.report.json]
        [the data flags of training: --max_pixels ... --video_fps ... --bad_sample_policy ...]

The samples of one epoch of the ``--dataset_use`` mixture (the same seeded mixture
training builds with ``--seed``) are counted exactly (``qwenvl.data.batch.count``, through
the length cache) and bin-packed (``qwenvl.data.batch.packing``, best-fit decreasing by
default) so that each pack's tokens fit ``--model_max_length`` and, with
``--max_patches_per_pack``, its vision patches fit that (the vision tower's memory
follows patches).  The packs are shuffled with the seed and written as a JSON array,
one pack per line, each pack the list of its original sample records.

Media paths: every relative image/video reference of a record is rewritten as an
absolute path (or URL) resolved against its own dataset's ``data_path``, because
``formats.to_conversations`` resolves all samples of a packed file against the one
``data_path`` of the packed file's dictionary entry, and a mixture may come from
datasets with different media folders.  Absolute references ignore ``data_path``,
so register the packed file with any (e.g. ``""``)::

    "my_packed": {"annotation_path": "packed.json", "data_path": ""}

``--register_as NAME`` writes that entry into ``--dataset_dictionary``.  Train with
``--dataset_use my_packed --data_packing True`` (one pack per micro-batch:
``--per_device_train_batch_size 1``) and the same ``--model_max_length`` and data flags.
Saved Hugging Face datasets (images stored as bytes) cannot be written to JSON: use
online packing for them.

Samples training would drop as too long (text alone over ``--model_max_length``), or
whose patches exceed ``--max_patches_per_pack``, are dropped and counted, never split; so
are Qwen3.5 records trained as one sample per reasoning turn whose samples fit
``--model_max_length`` each but not together (a pack holds a record whole; reported as
over the token budget).
Samples above the budget that fit at a lower resolution are counted at the length
training renders them at.  Other bad samples follow ``--bad_sample_policy``: ``error``
stops (exit 1) naming them, ``skip`` drops and counts them.  The fill ratio reported
is tokens used / (packs x ``--model_max_length``).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from qwenvl.data.arguments import DataArguments, parse_tool_flags
from qwenvl.data.batch.count import TokenCounter
from qwenvl.data.batch.length_cache import PATCHES, TOKENS, lengths_for
from qwenvl.data.batch.packing import ALGORITHMS, pack_items, shuffle_packs
from qwenvl.data.catalog.mixture import build_mixture
from qwenvl.data.catalog.registry import DEFAULT_DICTIONARY, load_dictionary, parse_dataset_use
from qwenvl.data.catalog.sources import open_annotations
from qwenvl.data.errors import DataError, DataKind, where
from qwenvl.data.media.read import is_url, resolve_media


@dataclass
class PackArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint whose processor counts the tokens."})
    model_max_length: int = field(metadata={"help": "Token budget of a pack (training's --model_max_length)."})
    output: str = field(metadata={"help": "Packed annotation file to write (a JSON array of packs)."})
    max_patches_per_pack: int | None = field(
        default=None, metadata={"help": "Vision-patch budget of a pack (rows of pixel_values); none by default."})
    num_workers: int = field(default=os.cpu_count() or 1, metadata={"help": "Processes counting lengths."})
    seed: int = field(default=42, metadata={"help": "Mixture seed (as training's --seed) and pack order."})
    algorithm: str = field(default="bfd", metadata={"help": f"Packing algorithm: {', '.join(ALGORITHMS)}."})
    report: str | None = field(default=None, metadata={"help": "Also write the summary as JSON here."})
    register_as: str | None = field(
        default=None, metadata={"help": "Add the packed file to --dataset_dictionary under this name."})


def _absolute(ref, data_path: str):
    """A media reference made independent of data_path (lists: frames of one video)."""
    if isinstance(ref, (list, tuple)):
        return [_absolute(r, data_path) for r in ref]
    if not isinstance(ref, str) or not ref:
        return ref
    resolved = resolve_media(ref, data_path)
    return resolved if is_url(resolved) else os.path.abspath(resolved)


def _absolute_part(part, data_path: str):
    if not isinstance(part, dict):
        return part
    part = dict(part)
    for key in ("image", "video"):
        if part.get(key) is not None:
            part[key] = _absolute(part[key], data_path)
    url = part.get("image_url")
    if isinstance(url, dict) and isinstance(url.get("url"), str):
        part["image_url"] = {**url, "url": _absolute(url["url"], data_path)}
    elif isinstance(url, str):
        part["image_url"] = _absolute(url, data_path)
    return part


def absolute_media(record: dict, data_path: str) -> dict:
    """A copy of ``record`` whose image/video references are absolute paths or URLs.

    Covers LLaVA ``image(s)``/``video(s)`` keys and inline parts of messages-style
    content (``{"type": "image", "image": ...}``, ``image_url``).
    """
    out = dict(record)
    for key in ("image", "images", "video", "videos"):
        if out.get(key) is not None:
            out[key] = _absolute(out[key], data_path)
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {**m, "content": [_absolute_part(p, data_path) for p in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m
            for m in out["messages"]]
    return out


def _is_too_long(kind: str | None) -> bool:
    return kind == DataKind.TOO_LONG.value


def plan_packs(data_args: DataArguments, args: PackArguments, progress: bool = True) -> dict:
    """Count, pack and describe; returns a dict with the packs (as (dataset, record) pairs) and the summary."""
    from qwenvl.data.media.video import video_settings_from
    from qwenvl.data.render.grounding import Grounding
    from qwenvl.data.render.processor_settings import configure_processor

    if args.model_max_length < 1:
        raise DataError(f"--model_max_length must be positive, got {args.model_max_length}.", DataKind.CONFIG)
    from qwenvl.train.model import check_model_dir, read_config, read_processor

    check_model_dir(args.model_name_or_path)  # an adapter folder, no config.json: a message
    processor = configure_processor(read_processor(args.model_name_or_path), data_args)
    grounding = Grounding(read_config(args.model_name_or_path).model_type, processor.image_processor)
    counter = TokenCounter(processor, video_settings_from(data_args, processor), args.model_max_length, grounding,
                           data_args.enable_thinking)
    entries = parse_dataset_use(data_args.dataset_use, load_dictionary(data_args.dataset_dictionary))
    sources = [open_annotations(e.spec.annotation_path) for e in entries]
    for entry, source in zip(entries, sources):
        if source.kind == "hf":
            raise DataError(f"dataset '{entry.spec.name}' is a saved Hugging Face dataset; its images cannot be "
                            "written to a JSON packed file. Fix: use online packing in training instead.",
                            DataKind.CONFIG)
        if source.is_packed:
            raise DataError(f"dataset '{entry.spec.name}' is already packed ({entry.spec.annotation_path}). Fix: "
                            "pack the original datasets.", DataKind.CONFIG)
    tables = [lengths_for(e.spec, s, counter, args.num_workers, progress) for e, s in zip(entries, sources)]
    mixture = build_mixture(entries, [len(s) for s in sources], args.seed)
    rows = np.stack([tables[d].rows[r] for d, r in mixture.tolist()]) if len(mixture) else np.zeros((0, 3), np.int64)

    bad = np.flatnonzero(rows[:, TOKENS] <= 0)
    reasons = {int(i): tables[mixture[i, 0]].errors.get(int(mixture[i, 1]), "unknown problem") for i in bad}
    kinds = {int(i): tables[mixture[i, 0]].kinds.get(int(mixture[i, 1])) for i in bad}
    too_long = [i for i in reasons if _is_too_long(kinds[i])]
    broken = [i for i in reasons if not _is_too_long(kinds[i])]
    if broken and data_args.bad_sample_policy == "error":
        listed = "\n  ".join(reasons[i] for i in broken[:10])
        more = f"\n  ... and {len(broken) - 10} more" if len(broken) > 10 else ""
        raise DataError(f"{len(broken)} sample(s) cannot be rendered:\n  {listed}{more}\nFix them (python -m "
                        "qwenvl.tools.audit lists every reason) or pass --bad_sample_policy skip to leave them out.",
                        DataKind.BAD_SAMPLES)
    usable = np.flatnonzero(rows[:, TOKENS] > 0)
    result = pack_items(rows[:, TOKENS], args.model_max_length, rows[:, PATCHES], args.max_patches_per_pack,
                        items=usable, algorithm=args.algorithm)
    result = shuffle_packs(result, args.seed)
    # pack_items drops what exceeds either budget.  A record over the token budget is one that trains as
    # several samples (Qwen3.5, one per reasoning turn) which fit --model_max_length each but not together
    # (a single sample that long was dropped above as too long): a pack holds a record whole.
    over_tokens = [int(i) for i in result.dropped if rows[i, TOKENS] > args.model_max_length]
    over_patches = [int(i) for i in result.dropped if rows[i, TOKENS] <= args.model_max_length]
    summary = {"samples": int(len(mixture)), **result.summary(),
               "dropped_too_long": len(too_long), "dropped_over_token_budget": len(over_tokens),
               "dropped_over_patch_budget": len(over_patches),
               "dropped_bad": len(broken), "algorithm": args.algorithm, "seed": args.seed}
    summary.pop("dropped", None)

    def origin(i: int) -> str:
        d, r = int(mixture[i, 0]), int(mixture[i, 1])
        return f"{where(entries[d].spec.name, entries[d].spec.annotation_path, r)}: {int(rows[i, TOKENS])} tokens"
    return {"entries": entries, "sources": sources, "mixture": mixture, "result": result, "summary": summary,
            "dropped": {"too_long": [reasons[i] for i in too_long], "bad": [reasons[i] for i in broken],
                        "over_token_budget": [origin(i) for i in over_tokens], "over_patch_budget": over_patches}}


def write_packs(plan: dict, output: str) -> None:
    """Write the packs as a JSON array, one pack (a list of records with absolute media) per line."""
    entries, sources, mixture = plan["entries"], plan["sources"], plan["mixture"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for k, pack in enumerate(plan["result"].packs):
            records = []
            for item in pack:
                d, r = int(mixture[item, 0]), int(mixture[item, 1])
                record = absolute_media(sources[d][r], entries[d].spec.data_path)
                if entries[d].spec.bbox_format and isinstance(record, dict) and "bbox_format" not in record:
                    # The packed file mixes datasets: each record keeps its own box coordinates.
                    record = {**record, "bbox_format": entries[d].spec.bbox_format}
                if entries[d].spec.enable_thinking and isinstance(record, dict) and "enable_thinking" not in record:
                    # ... and its dataset's thinking mode.
                    record = {**record, "enable_thinking": entries[d].spec.enable_thinking}
                records.append(record)
            f.write(json.dumps(records, ensure_ascii=False))
            f.write(",\n" if k + 1 < len(plan["result"].packs) else "\n")
        f.write("]\n")
    os.replace(tmp, output)


def register(dictionary: str | None, name: str, output: str) -> str:
    """Add (or replace) ``name`` -> the packed file in the dictionary; returns the dictionary's path."""
    path = str(dictionary or DEFAULT_DICTIONARY)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    folder = os.path.dirname(os.path.abspath(path))
    ann = os.path.abspath(output)
    rel = os.path.relpath(ann, folder)
    data[name] = {"annotation_path": rel if not rel.startswith("..") else ann, "data_path": ""}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def format_summary(summary: dict) -> str:
    s = summary
    over = "" if not s["dropped_over_token_budget"] else (
        f"\n{s['dropped_over_token_budget']} more dropped over the token budget: records trained as several samples "
        f"(Qwen3.5: one per reasoning turn) that fit {s['max_tokens']} tokens each but not together in one pack "
        "(--report lists them). Fix: raise --model_max_length, or split those records into one record per turn.")
    patch = "" if s["max_patches"] is None else (f", {s['patches_used']} patches used of "
                                                 f"{s['packs']} x {s['max_patches']} ({s['patch_fill_ratio']:.1%})")
    return (f"{s['samples']} samples -> {s['packs']} packs of at most {s['max_tokens']} tokens "
            f"({s['items_per_pack_mean']} samples per pack); fill ratio {s['fill_ratio']:.2%} "
            f"({s['tokens_used']} tokens used of {s['packs']} x {s['max_tokens']}){patch}.\n"
            f"dropped: {s['dropped_too_long']} too long, {s['dropped_over_patch_budget']} over the patch budget, "
            f"{s['dropped_bad']} bad (skipped: --bad_sample_policy skip).{over}")


def main(argv: list[str] | None = None) -> int:
    try:
        data_args, args = parse_tool_flags((DataArguments, PackArguments), argv)
    except DataError as err:  # an unknown flag, an invalid value
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.algorithm not in ALGORITHMS:
        print(f"error: --algorithm must be one of {', '.join(ALGORITHMS)}", file=sys.stderr)
        return 2
    from qwenvl.train.arguments import ConfigError

    try:
        plan = plan_packs(data_args, args)
    except ConfigError as err:  # an unusable --model_name_or_path
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if err.kind is DataKind.BAD_SAMPLES else 2
    write_packs(plan, args.output)
    summary = {**plan["summary"], "output": os.path.abspath(args.output)}
    print(format_summary(summary))
    print(f"wrote {args.output}")
    if args.register_as:
        path = register(data_args.dataset_dictionary, args.register_as, args.output)
        print(f"registered '{args.register_as}' in {path}")
    else:
        print("register it with: " + json.dumps({"my_packed": {"annotation_path": os.path.abspath(args.output),
                                                                "data_path": ""}}))
    if args.report:
        with open(args.report, "w") as f:
            json.dump({**summary, "dropped": plan["dropped"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
