"""Long-range associative recall: synthetic documents, training data, and accuracy by distance.

A document is a run of 4-character items over a byte vocabulary::

    c=7;q=2;c?7;x=0;q?2;...

``k=v;`` binds key ``k`` (a lowercase letter, each bound once per document) to a random digit
``v``; ``k?v;`` asks for a bound key again (a random one, or the least recently mentioned one for
long distances), and its value must be recalled. The scored tokens are
the values after ``?``: a model predicts them only by finding the key's previous mention (a binding
or an earlier question). The **distance** of a question is the number of tokens from that previous
mention's value to the asked value. Questions whose distance is beyond a model's local window can
be answered only by attention that reaches past the window; chance is 1 in ``num_values``.

Every document is ``seq_length - 1`` bytes plus the byte tokenizer's end-of-document token, i.e.
exactly ``seq_length`` tokens: Megatron's GPTDataset then cuts training samples at document
boundaries. ``write_dataset`` writes train/valid indexed datasets for ``scripts/pretrain.py``
(recipes/retrieval_*.yaml); ``evaluate_recall`` scores any ``tokens -> logits`` function.
"""
from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass

import torch

ITEM = 4   # "k=v;" / "k?v;"
FILLER = "."


@dataclass(frozen=True)
class RecallTask:
    """The synthetic task's shape."""

    seq_length: int = 512
    """Tokens per document (its bytes plus the end-of-document token)."""
    num_keys: int = 26
    """Distinct keys per document (lowercase letters, at most 26)."""
    num_values: int = 10
    """Values are the first ``num_values`` digits; chance accuracy is 1 / num_values."""
    new_key_probability: float = 0.5
    """Chance that an item binds a new key (while keys are left) rather than asks a bound one."""
    oldest_key_probability: float = 0.5
    """Chance that a question asks the least recently mentioned key (long distances) rather than
    a uniformly drawn bound key."""

    def __post_init__(self) -> None:
        if not (isinstance(self.seq_length, int) and self.seq_length >= 2 * ITEM + 1):
            raise ValueError(f"seq_length must be an integer >= {2 * ITEM + 1}, got {self.seq_length!r}")
        if not 1 <= self.num_keys <= 26:
            raise ValueError(f"num_keys must be in [1, 26], got {self.num_keys!r}")
        if not 2 <= self.num_values <= 10:
            raise ValueError(f"num_values must be in [2, 10], got {self.num_values!r}")
        if not 0.0 < self.new_key_probability <= 1.0:
            raise ValueError(f"new_key_probability must be in (0, 1], got {self.new_key_probability!r}")
        if not 0.0 <= self.oldest_key_probability <= 1.0:
            raise ValueError(f"oldest_key_probability must be in [0, 1], got {self.oldest_key_probability!r}")

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


@dataclass(frozen=True)
class Question:
    """One scored token of a document."""

    position: int
    """Index of the asked value in the document."""
    distance: int
    """Tokens from the key's previous mention's value to this value."""
    value: str


def generate_document(task: RecallTask, rng: random.Random) -> tuple[str, list[Question]]:
    """A document of ``task.seq_length - 1`` characters and its questions, from ``rng``."""
    keys = rng.sample(string.ascii_lowercase, task.num_keys)
    digits = string.digits[:task.num_values]
    value, last_mention = {}, {}
    parts, questions = [], []
    for item in range((task.seq_length - 1) // ITEM):
        start = item * ITEM
        fresh = [k for k in keys if k not in value]
        if fresh and (not value or rng.random() < task.new_key_probability):
            key = fresh[0]
            value[key] = rng.choice(digits)
            parts.append(f"{key}={value[key]};")
        else:
            if rng.random() < task.oldest_key_probability:
                key = min(value, key=last_mention.get)
            else:
                key = rng.choice(sorted(value))
            questions.append(Question(start + 2, start + 2 - last_mention[key], value[key]))
            parts.append(f"{key}?{value[key]};")
        last_mention[key] = start + 2
    text = "".join(parts)
    return text + FILLER * (task.seq_length - 1 - len(text)), questions


def document_tokens(text: str) -> list[int]:
    """The byte tokenizer's ids of a document, end-of-document token included."""
    from megatron_s2.training.data import ByteTokenizer   # the trainer's tokenizer, so the ids agree
    return ByteTokenizer().tokenize(text).tolist() + [ByteTokenizer.eod]


def write_dataset(task: RecallTask, output_dir: str, num_train: int, num_valid: int, seed: int = 0) -> dict:
    """Write ``output_dir``/{train,valid}.bin/.idx (byte tokenizer) and task.json; returns the
    metadata. Train and valid documents come from different seeds."""
    from megatron_s2.training.data import ByteTokenizer, prepare_dataset

    if num_train < 1 or num_valid < 1:
        raise ValueError(f"num_train ({num_train}) and num_valid ({num_valid}) must be >= 1")
    os.makedirs(output_dir, exist_ok=True)
    meta = {"task": task.__dict__, "seed": seed}
    for split, count, split_seed in (("train", num_train, seed), ("valid", num_valid, seed + 1)):
        rng = random.Random(split_seed)
        jsonl = os.path.join(output_dir, f"{split}.jsonl")
        with open(jsonl, "w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": generate_document(task, rng)[0]}) + "\n")
        info = prepare_dataset([jsonl], os.path.join(output_dir, split), ByteTokenizer(), progress=False)
        os.remove(jsonl)
        meta[split] = {"documents": info["documents"], "tokens": info["tokens"]}
    with open(os.path.join(output_dir, "task.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def distance_buckets(window: int, seq_length: int) -> list[tuple[int, int]]:
    """[lo, hi) distance ranges: inside the local window, then doublings of it to the end."""
    edges = [1, window]
    while edges[-1] * 2 < seq_length:
        edges.append(edges[-1] * 2)
    edges.append(seq_length)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def evaluate_recall(logits_fn, task: RecallTask, *, window: int, num_documents: int = 64, seed: int = 12345,
                    batch_size: int = 8, device: str | torch.device = "cpu") -> dict:
    """Accuracy of ``logits_fn(tokens [b, s]) -> logits [b, s, vocab]`` on the asked values of
    fresh documents (``seed``), by distance bucket (see ``distance_buckets(window, ...)``).

    A question counts as correct when the argmax over the whole vocabulary at the position before
    the value is the value. Returns {"buckets": [{lo, hi, questions, correct, accuracy}], "chance",
    "window", "beyond_window": {questions, correct, accuracy}}.
    """
    if num_documents < 1 or batch_size < 1:
        raise ValueError(f"num_documents ({num_documents}) and batch_size ({batch_size}) must be >= 1")
    rng = random.Random(seed)
    docs = [generate_document(task, rng) for _ in range(num_documents)]
    buckets = [{"lo": lo, "hi": hi, "questions": 0, "correct": 0} for lo, hi in distance_buckets(window, task.seq_length)]
    for first in range(0, num_documents, batch_size):
        batch = docs[first:first + batch_size]
        tokens = torch.tensor([document_tokens(text) for text, _ in batch], device=device)
        predicted = logits_fn(tokens).argmax(dim=-1).cpu()
        for row, (text, questions) in enumerate(batch):
            for q in questions:
                bucket = next(b for b in buckets if b["lo"] <= q.distance < b["hi"])
                bucket["questions"] += 1
                bucket["correct"] += int(predicted[row, q.position - 1].item() == ord(q.value))
    for b in buckets:
        b["accuracy"] = b["correct"] / b["questions"] if b["questions"] else None
    far = [b for b in buckets if b["lo"] >= window]
    far_questions = sum(b["questions"] for b in far)
    far_correct = sum(b["correct"] for b in far)
    return {"buckets": buckets, "chance": task.chance, "window": window,
            "beyond_window": {"questions": far_questions, "correct": far_correct,
                              "accuracy": far_correct / far_questions if far_questions else None}}


def format_recall(result: dict, label: str = "") -> str:
    lines = [f"{label + ': ' if label else ''}accuracy by distance (window {result['window']} tokens, "
             f"chance {result['chance']:.0%})"]
    for b in result["buckets"]:
        acc = f"{b['accuracy']:6.1%}" if b["accuracy"] is not None else "     -"
        lines.append(f"  [{b['lo']:>4}, {b['hi']:>4})  {acc}  of {b['questions']:>5} questions")
    far = result["beyond_window"]
    if far["accuracy"] is not None:
        lines.append(f"  beyond the window: {far['accuracy']:.1%} of {far['questions']} questions")
    return "\n".join(lines)
