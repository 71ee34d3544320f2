"""Answer accuracy and loss of a checkpoint on held-out datasets of the dictionary.

    python -m qwenvl.tools.evaluate --model out/run --dataset_use demo_shapes_eval \\
        [--dataset_dictionary F] [--max_new_tokens 32] [--limit N] [--output results.json] \\
        [--max_pixels N --min_pixels N --video_* ...]

For every sample: the prompt is the conversation up to its last trained assistant turn
(earlier turns included; answers a record switches off with ``"weight": 0`` / ``"loss": false``
are never references), rendered by the training renderer with the generation header, and the
reference is that turn's text.  The checkpoint answers greedily (``qwenvl.tools.chat``);
an answer counts as

* ``exact`` when it equals the reference after stripping surrounding whitespace;
* ``normalised`` when both agree after lower-casing and removing punctuation, the
  articles a/an/the and extra whitespace (the SQuAD rule, for short answers:
  "The red." == "red").

Qwen3.5/3.6 (think blocks): each sample is asked in the mode its reply trains in (thinking
when it has reasoning, or as ``--enable_thinking`` says), and the reasoning is taken off
before scoring: ``exact``, ``normalised`` and IoU compare the answer after ``</think>``
with the reference's answer (``reasoning`` in the JSON keeps what the model thought).  A
thinking-mode reply that never closes its think block has no answer and scores wrong.

Grounding answers (``bbox_2d``, Qwen2-VL box tokens; ``qwenvl/data/render/grounding.py``): the
model answers in its family's coordinates for the image as it saw it; ``exact`` and
``normalised`` compare that answer with the reference as training wrote it (converted
from the dataset's ``bbox_format``).  The answer is also converted back into the
dataset's coordinates (``prediction_user`` in the JSON) and its boxes are scored
against the reference's by IoU, paired in order (a missing box scores 0):
``iou`` is the mean IoU and ``iou@T`` the share of grounding samples whose IoU is at
least ``--iou_threshold`` T (default 0.5).

``loss`` is the teacher-forced cross-entropy of the whole sample, rendered and collated
exactly as in training (every assistant reply with its ``<|im_end|>``), averaged over
all trained tokens of the dataset (the per-token mean training logs).

The data flags default to the checkpoint's own settings (training saves its pixel and
frame flags in the processor); flags given here override them.  Prints a table
(dataset, samples, exact, normalised, loss) and writes JSON with every prediction to
``--output`` (default: ``eval/<checkpoint name>_<datasets>.json`` next to the checkpoint
folder, never inside it: a checkpoint folder is a model to load, upload or rotate away
by ``--save_total_limit``; the path is printed).  A progress bar counts the samples of
each dataset.  Generation is one sample at a
time: slower than batching, but no padding can change an answer.
"""
from __future__ import annotations

import json
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Checkpoint to evaluate: full, merged, or a LoRA adapter folder."})
    base: str | None = field(default=None, metadata={"help": "Base model of a LoRA adapter (default: its config's)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer generated."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate at most this many samples per dataset."})
    output: str | None = field(
        default=None,
        metadata={"help": "JSON file to write (default: eval/<checkpoint>_<datasets>.json beside the checkpoint "
                          "folder, not inside it)."})
    seed: int = field(default=42, metadata={"help": "Mixture seed (matters only for %% subsampling)."})
    model_max_length: int | None = field(
        default=None, metadata={"help": "As in training: longer samples are rendered smaller, or skipped."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda if present)."})
    iou_threshold: float = field(default=0.5, metadata={"help": "IoU at which a grounding answer counts as a hit."})


@dataclass
class Prediction:
    dataset: str
    origin: str
    reference: str
    prediction: str
    exact: bool
    normalised: bool
    stopped_at_end: bool
    prediction_user: str | None = None  # the answer with its boxes in the dataset's coordinates
    iou: float | None = None  # mean IoU of the reference's boxes (None: the reference holds none)
    reasoning: str | None = None  # Qwen3.5/3.6: the think block's text, taken off before scoring


@dataclass
class DatasetScore:
    dataset: str
    samples: int = 0
    exact: int = 0
    normalised: int = 0
    loss_sum: float = 0.0  # summed over trained tokens
    loss_tokens: int = 0
    skipped: int = 0
    grounding: int = 0  # samples whose reference holds boxes
    iou_sum: float = 0.0
    iou_hits: int = 0

    def add(self, other: "DatasetScore") -> None:
        for name in ("samples", "exact", "normalised", "loss_sum", "loss_tokens", "skipped", "grounding", "iou_sum",
                     "iou_hits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict:
        n = max(self.samples, 1)
        return {"dataset": self.dataset, "samples": self.samples, "exact": self.exact / n if self.samples else None,
                "normalised": self.normalised / n if self.samples else None,
                "loss": self.loss_sum / self.loss_tokens if self.loss_tokens else None,
                "exact_count": self.exact, "normalised_count": self.normalised, "skipped": self.skipped,
                "grounding_samples": self.grounding, "iou": self.iou_sum / self.grounding if self.grounding else None,
                "iou_hit": self.iou_hits / self.grounding if self.grounding else None}


@torch.no_grad()
def sample_loss(model, sample: dict, collator) -> tuple[float, int]:
    """(summed token cross-entropy, trained tokens) of one rendered sample, as training computes it."""
    batch = collator([sample])
    labels = batch.pop("labels").to(model.device)
    batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    logits = model(**batch, use_cache=False).logits[0, :-1].float()
    targets = labels[0, 1:]
    keep = targets != -100
    loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return float(loss), int(keep.sum())


def _conversations(dataset, i: int) -> list:
    conversation = dataset.conversations(i)
    return conversation if isinstance(conversation, list) else [conversation]


def split_reasoning(text: str, rules, opened: bool) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a reply or reference, for scoring the answer alone.

    Only on think-block families (``rules.think_blocks``, Qwen3.5/3.6); elsewhere the text is the
    answer.  ``opened``: the generation prompt opened a think block, so the reply starts inside it
    (a reply that never wrote ``</think>`` is all reasoning, no answer).
    """
    if not rules.think_blocks:
        return None, text
    if "</think>" in text:
        head, answer = text.rsplit("</think>", 1)
        return head.split("<think>")[-1].strip("\n"), answer.lstrip("\n")
    if opened:
        return text, ""
    return None, text


def trained_reference(renderer, conversation, resized: list) -> str:
    """The last reply of ``conversation`` as training writes it: boxes in the family's coordinates."""
    from qwenvl.data.render.prompt import split_last_reply
    from qwenvl.tools.chat import image_sizes

    if not resized:
        return split_last_reply(conversation)[1]
    trained = renderer.grounding.training_conversation(conversation, image_sizes(conversation), resized)
    return split_last_reply(trained)[1]


def evaluate_dataset(model, processor, renderer, collator, dataset, name: str, max_new_tokens: int,
                     limit: int | None = None, skip_bad: bool = False, progress: bool = True,
                     iou_threshold: float = 0.5) -> tuple[DatasetScore, list]:
    """Score the samples of one ``SupervisedDataset`` (with a progress bar on stderr unless ``progress``
    is False); returns its score and every prediction."""
    from tqdm.auto import tqdm

    from qwenvl.data.errors import DataError
    from qwenvl.data.render.grounding import boxes_in, matched_iou
    from qwenvl.data.render.prompt import split_last_reply
    from qwenvl.tools.chat import generate, in_user_coordinates

    score, predictions = DatasetScore(name), []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(count), desc=name, unit="sample", disable=not progress):
        for conversation in _conversations(dataset, i):
            try:
                prompt, reference = split_last_reply(conversation)
                # The prompt of the mode the reply trains in (Qwen3.5: thinking when it has reasoning).
                mode = renderer.reply_thinking(conversation)
                reply = generate(model, processor, renderer, prompt, max_new_tokens, thinking=mode)
                rules = renderer.chat.rules
                reasoning, text = split_reasoning(reply.text, rules,
                                                  rules.generation_prompt(mode).endswith("<think>\n"))
                trained = split_reasoning(trained_reference(renderer, conversation, reply.resized), rules, False)[1]
                reference = split_reasoning(reference, rules, False)[1]
                user_format = conversation.bbox_format or renderer.grounding.convention
                answer = in_user_coordinates(text, renderer, prompt, reply, user_format)
                loss, tokens = sample_loss(model, renderer.render(conversation), collator)
            except DataError as err:
                if not skip_bad:
                    raise
                print(f"skipping bad sample: {err}", file=sys.stderr)
                score.skipped += 1
                continue
            exact = text.strip() == trained.strip()
            loose = normalise(text) == normalise(trained)
            iou = matched_iou(boxes_in(answer), boxes_in(reference))
            if iou is not None:
                score.grounding += 1
                score.iou_sum += iou
                score.iou_hits += iou >= iou_threshold
            score.samples += 1
            score.exact += exact
            score.normalised += loose
            score.loss_sum += loss
            score.loss_tokens += tokens
            predictions.append(Prediction(name, conversation.origin, reference, text, exact, loose,
                                          reply.stopped_at_end, answer, iou, reasoning))
    return score, predictions


def format_table(rows: list[dict], threshold: float = 0.5) -> str:
    """The results as a fixed-width text table."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    width = max([len("dataset")] + [len(r["dataset"]) for r in rows])
    grounding = any(r.get("grounding_samples") for r in rows)
    head = f"{'dataset':<{width}}  {'samples':>7}  {'exact':>7}  {'normalised':>10}  {'loss':>8}"
    if grounding:
        head += f"  {'iou':>6}  {'iou@' + format(threshold, 'g'):>8}"
    lines = [head]
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        line = (f"{r['dataset']:<{width}}  {r['samples']:>7}  {pct(r['exact']):>7}  "
                f"{pct(r['normalised']):>10}  {loss:>8}")
        if grounding:
            iou = "-" if r.get("iou") is None else f"{r['iou']:.3f}"
            line += f"  {iou:>6}  {pct(r.get('iou_hit')):>8}"
        lines.append(line)
    return "\n".join(lines)


def _explicit(values, cls) -> dict:
    """The fields of dataclass instance ``values`` that differ from ``cls()``'s defaults (the flags given)."""
    import dataclasses

    default = cls()
    return {f.name: getattr(values, f.name) for f in dataclasses.fields(cls)
            if getattr(values, f.name) != getattr(default, f.name)}


def evaluate(eval_args: EvalArguments, data_args) -> dict:
    """Run the evaluation; returns the JSON written (``datasets`` rows and ``predictions``)."""
    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.batch.collate import PaddedCollator
    from qwenvl.data.catalog.registry import load_dictionary, parse_dataset_use
    from qwenvl.data.dataset import SupervisedDataset
    from qwenvl.tools.chat import chat_data_args, load_checkpoint, make_renderer, written_by_training

    dictionary = load_dictionary(data_args.dataset_dictionary)
    entries = parse_dataset_use(data_args.dataset_use, dictionary)  # data problems show before the model loads
    model, processor = load_checkpoint(eval_args.model, eval_args.base, eval_args.device)
    overrides = _explicit(data_args, DataArguments)
    settings = chat_data_args(processor, written_by_training(eval_args.model), **overrides)
    renderer = make_renderer(model, processor, settings, eval_args.model_max_length)
    collator = PaddedCollator(processor.tokenizer.pad_token_id)

    start = time.perf_counter()
    rows, predictions, total = [], [], DatasetScore("all")
    for entry in entries:
        dataset = SupervisedDataset([entry], renderer, eval_args.seed)
        score, preds = evaluate_dataset(model, processor, renderer, collator, dataset, entry.spec.name,
                                        eval_args.max_new_tokens, eval_args.limit,
                                        skip_bad=settings.bad_sample_policy == "skip",
                                        iou_threshold=eval_args.iou_threshold)
        rows.append(score.summary())
        predictions += preds
        total.add(score)
    if len(entries) > 1:
        rows.append(total.summary())
    return {"model": str(eval_args.model), "dataset_use": data_args.dataset_use,
            "max_new_tokens": eval_args.max_new_tokens, "limit": eval_args.limit,
            "iou_threshold": eval_args.iou_threshold,
            "data_settings": {k: getattr(settings, k) for k in ("min_pixels", "max_pixels", "video_min_pixels",
                                                                 "video_max_pixels", "video_fps", "video_min_frames",
                                                                 "video_max_frames")},
            "seconds": round(time.perf_counter() - start, 2),
            "datasets": rows, "predictions": [asdict(p) for p in predictions]}


def default_output(model: str, dataset_use: str) -> Path:
    """``<folder holding the checkpoint>/eval/<checkpoint name>_<datasets>.json`` for a local checkpoint,
    ``./eval/<model id>_<datasets>.json`` for a hub id."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_use)[:80]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
        return path.parent / "eval" / f"{path.name}_{tag}.json"
    return Path.cwd() / "eval" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}_{tag}.json"


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.errors import DataError
    from qwenvl.tools.chat import CheckpointError

    parser = HfArgumentParser((EvalArguments, DataArguments))
    try:
        eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not data_args.dataset_use:
        print("error: --dataset_use is empty: name the held-out dataset(s), e.g. --dataset_use demo_shapes_eval",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        results = evaluate(eval_args, data_args)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    text = json.dumps(results, indent=2) + "\n"
    output = Path(eval_args.output) if eval_args.output else default_output(eval_args.model, data_args.dataset_use)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError:
        if eval_args.output:
            raise
        output = Path.cwd() / "eval" / output.name  # the checkpoint's folder is read-only: here instead
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    print(format_table(results["datasets"], eval_args.iou_threshold))
    print(f"predictions and scores written to {output}")
    return results


if __name__ == "__main__":
    main()
