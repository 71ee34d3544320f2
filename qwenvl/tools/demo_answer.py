"""Ask held-out questions before and after fine-tuning: the last lines of the demo.

    python -m qwenvl.tools.demo_answer --before .cache/tiny-qwen2_5_vl --after demo_output \\
        [--dataset demo_colour_eval] [--index N] [--dataset_dictionary dataset_dictionary.json]

Every record of ``--dataset`` (a held-out split the run did not train on) is asked, with
its image(s), to both checkpoints, greedily, with the prompt built as training renders it
(``qwenvl.tools.chat``) and the image settings the run saved in ``--after``'s processor
(so the two models see the same pixels).  One record is shown in full: ``--index``, or by
default the first whose reference is NOT the answer the run saw most often in training
for that question, so a right answer there cannot be the answer prior.  Then the score
over all records, per reference answer, so a constant answer shows as such::

    held-out question (demo_colour_eval, record 0): What colour is the shape?
    image: demo_data/images/colour_eval/0000.jpg
    reference answer:         red
    most common training answer to this question: 'green' (80 of 259 training records)
    before fine-tuning:       '\\n\\n\\n\\n\\n\\n\\n\\n'
    after fine-tuning:        'red'  (right)
    all 12 held-out records of demo_colour_eval: 0/12 right before fine-tuning, 12/12 after
      reference 'blue': 4/4 right after   (answers: 'blue' x4)
      reference 'green': 4/4 right after   (answers: 'green' x4)
      reference 'red': 4/4 right after   (answers: 'red' x4)

(the output of ``bash scripts/demo.sh``, measured).  The prior counts each training record
once, whatever its rate in the mixture.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


def _same(answer: str, reference: str) -> bool:
    """Equal up to case and surrounding space (the demo's notion of a right answer)."""
    return answer.strip().lower() == reference.strip().lower()


@dataclass
class DemoAnswer:
    question: str
    media: list[str]
    reference: str
    before: str
    after: str

    @property
    def right(self) -> bool:
        """The fine-tuned answer equals the reference (case and surrounding space aside)."""
        return _same(self.after, self.reference)


@dataclass
class HeldOut:
    """Every record of the held-out dataset asked to both checkpoints, and the one shown."""

    dataset: str
    answers: list[DemoAnswer]  # one per record, in record order
    shown: int  # index of the record shown in full
    prior: tuple[str, int, int] | None = None  # (answer, count, records) of the shown question in training
    by_reference: dict[str, list[DemoAnswer]] = field(init=False)

    def __post_init__(self):
        self.by_reference = {}
        for a in self.answers:
            self.by_reference.setdefault(a.reference, []).append(a)

    @property
    def right_before(self) -> int:
        return sum(_same(a.before, a.reference) for a in self.answers)

    @property
    def right_after(self) -> int:
        return sum(a.right for a in self.answers)


def _conversations(dictionary_path: str, dataset: str):
    """(conversation without its last reply, that reply) for every record of ``dataset``."""
    from qwenvl.data.catalog.formats import to_conversation
    from qwenvl.data.render.prompt import split_last_reply
    from qwenvl.data.catalog.registry import load_dictionary
    from qwenvl.data.catalog.sources import open_annotations

    dictionary = load_dictionary(dictionary_path)
    if dataset not in dictionary:
        raise SystemExit(f"error: no dataset {dataset!r} in {dictionary_path}")
    spec = dictionary[dataset]
    records = open_annotations(spec.annotation_path)
    return [split_last_reply(to_conversation(records[i], spec, i)) for i in range(len(records))]


def _question(prompt) -> str:
    from qwenvl.data.render.prompt import reply_text

    return reply_text(prompt.messages[-1]).strip()


def _media(prompt) -> list[str]:
    return [str(part.get(part["type"])) for m in prompt.messages for part in m["content"]
            if part["type"] in ("image", "video")]


def training_prior(run_dir: str | Path, question: str) -> tuple[str, int, int] | None:
    """The answer the run at ``run_dir`` trained on most often for ``question``: (answer, count, records).

    Read from the run's ``run_args.json`` (its ``--dataset_use`` and dictionary); each record
    counts once, whatever its rate in the mixture.  None when the run saved no arguments or
    no training record asks ``question`` as its last question.
    """
    from qwenvl.data.catalog.registry import load_dictionary, parse_dataset_use

    args_file = Path(run_dir) / "run_args.json"
    if not args_file.is_file():
        args_file = Path(run_dir).parent / "run_args.json"  # a checkpoint-N folder
    if not args_file.is_file():
        return None
    args = json.loads(args_file.read_text())
    dictionary_path = args.get("dataset_dictionary") or "dataset_dictionary.json"
    dictionary = load_dictionary(dictionary_path)
    answers = Counter()
    for entry in parse_dataset_use(args["dataset_use"], dictionary):
        for prompt, reply in _conversations(dictionary_path, entry.spec.name):
            if _question(prompt) == question:
                answers[reply.strip()] += 1
    if not answers:
        return None
    answer, count = answers.most_common(1)[0]
    return answer, count, sum(answers.values())


def pick_shown(answers: list[DemoAnswer], prior_of) -> int:
    """The first record whose reference is not its question's training prior (``prior_of(question)``
    gives (answer, count, records) or None); the first record when every one is."""
    for i, a in enumerate(answers):
        prior = prior_of(a.question)
        if prior is None or not _same(a.reference, prior[0]):
            return i
    return 0


def ask_all(before: str, after: str, dataset: str = "demo_colour_eval", index: int | None = None,
            dataset_dictionary: str = "dataset_dictionary.json", max_new_tokens: int = 8) -> HeldOut:
    """Every record of ``dataset`` asked to the ``before`` and ``after`` checkpoints.

    The shown record is ``index``, or else the first whose reference differs from the
    training prior of its question (the first record when there is no prior to avoid).
    ``max_new_tokens`` is small because the demo's answers are one word: the untrained
    model's reply is cut there rather than costing 24 x 32 greedy steps on a CPU.
    """
    from qwenvl.tools.chat import chat_data_args, generate, load_checkpoint, make_renderer, written_by_training

    items = _conversations(dataset_dictionary, dataset)
    if index is not None and not 0 <= index < len(items):
        raise SystemExit(f"error: --index {index} is outside {dataset} (records 0-{len(items) - 1})")
    replies: dict[str, list[str]] = {}
    settings = None
    for name, path in (("after", after), ("before", before)):
        model, processor = load_checkpoint(path, device="cpu")
        if settings is None:  # the run's saved settings, used for both models
            settings = chat_data_args(processor, written_by_training(path))
        renderer = make_renderer(model, processor, settings)
        replies[name] = [generate(model, processor, renderer, prompt, max_new_tokens).text for prompt, _ in items]
        del model
    answers = [DemoAnswer(_question(prompt), _media(prompt), reference, b, a)
               for (prompt, reference), b, a in zip(items, replies["before"], replies["after"])]
    priors: dict[str, tuple[str, int, int] | None] = {}  # question -> its training prior, read once

    def prior_of(question: str):
        if question not in priors:
            priors[question] = training_prior(after, question)
        return priors[question]

    index = pick_shown(answers, prior_of) if index is None else index
    prior = prior_of(answers[index].question)
    return HeldOut(dataset, answers, index, prior)


def ask(before: str, after: str, dataset: str = "demo_colour_eval", index: int = 0,
        dataset_dictionary: str = "dataset_dictionary.json", max_new_tokens: int = 8) -> DemoAnswer:
    """One held-out record's question asked to the ``before`` and ``after`` checkpoints."""
    return ask_all(before, after, dataset, index, dataset_dictionary, max_new_tokens).answers[index]


def report(held: HeldOut) -> str:
    """The lines the demo prints (module docstring)."""
    a = held.answers[held.shown]
    lines = [f"held-out question ({held.dataset}, record {held.shown}): {a.question}"]
    lines += [f"image: {ref}" for ref in a.media]
    lines.append(f"reference answer:         {a.reference}")
    if held.prior is not None:
        answer, count, total = held.prior
        lines.append(f"most common training answer to this question: {answer!r} ({count} of {total} training records)")
    lines.append(f"before fine-tuning:       {a.before!r}")
    lines.append(f"after fine-tuning:        {a.after!r}  ({'right' if a.right else 'wrong'})")
    n = len(held.answers)
    lines.append(f"all {n} held-out records of {held.dataset}: {held.right_before}/{n} right before fine-tuning, "
                 f"{held.right_after}/{n} after")
    for reference, group in sorted(held.by_reference.items()):
        given = ", ".join(f"{text!r} x{k}" for text, k in Counter(x.after for x in group).most_common())
        lines.append(f"  reference {reference!r}: {sum(x.right for x in group)}/{len(group)} right after   "
                     f"(answers: {given})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> HeldOut:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the checkpoint before fine-tuning")
    parser.add_argument("--after", required=True, help="the fine-tuned checkpoint (its processor's settings are used)")
    parser.add_argument("--dataset", default="demo_colour_eval", help="held-out dataset of the dictionary")
    parser.add_argument("--index", type=int, default=None,
                        help="record shown in full (default: the first whose answer is not the training prior)")
    parser.add_argument("--dataset_dictionary", default="dataset_dictionary.json")
    args = parser.parse_args(argv)
    held = ask_all(args.before, args.after, args.dataset, args.index, args.dataset_dictionary)
    print(report(held), flush=True)
    return held


if __name__ == "__main__":
    main(sys.argv[1:])
