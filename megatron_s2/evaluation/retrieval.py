"""Long-range associative recall: synthetic documents, training data, and accuracy by distance.

A document is a sequence of token ids (within the byte tokenizer's vocabulary) made of filler and
two events per key::

    . . . B(k,v) . . . . . . . . ? k v . . . B(j,u) . . . ? j u . .

The binding ``B(k,v)`` is one token that names key ``k`` and value ``v`` together; the question
``? k v`` asks for the key later, and ``v`` must be recalled from the only earlier token that
names ``k``: one attention lookup (match the key part, copy the value part) that may reach far
back. The **distance** of a question is the number of tokens from the binding to the asked value.
Questions whose binding lies beyond a model's local window can be answered only by attention that
reaches past the window; chance is 1 / ``num_values``. Every key is bound once and asked once, so
no nearer mention can stand in for the binding.

Value ids occur only as answers (``RecallTask.answer_ids``): a trainer loss restricted to them
(``data.loss_token_ids``) scores exactly the questions, which the rest of a document, random by
construction, would otherwise drown out.

Every document is ``seq_length - 1`` ids plus the byte tokenizer's end-of-document token, i.e.
exactly ``seq_length`` tokens: Megatron's GPTDataset then cuts training samples at document
boundaries. ``write_dataset`` writes train/valid indexed datasets for ``scripts/pretrain.py``
(recipes/retrieval_*.yaml, data.tokenizer byte); ``evaluate_recall`` scores any
``tokens -> logits`` function.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

EOD, VOCAB = 256, 257        # the byte tokenizer's end-of-document id and vocabulary


@dataclass(frozen=True)
class RecallTask:
    """The synthetic task's shape. Token ids: keys, values, ``?``, filler, then the bindings."""

    seq_length: int = 256
    """Tokens per document (end-of-document token included)."""
    num_keys: int = 16
    """Keys per document, each bound once and asked once."""
    num_values: int = 10
    """Values a key can take; chance accuracy is 1 / num_values."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "num_keys", "num_values"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.num_values < 2:
            raise ValueError(f"num_values must be >= 2, got {self.num_values}")
        last = self.binding_id(self.num_keys - 1, self.num_values - 1)
        if last >= EOD:
            raise ValueError(f"num_keys * (num_values + 1) + num_values + 2 ({last + 1}) token ids must "
                             f"fit below the end-of-document id {EOD}")
        if self.seq_length - 1 < 4 * self.num_keys:
            raise ValueError(f"seq_length ({self.seq_length}) must be > 4 * num_keys ({4 * self.num_keys})")

    def key_id(self, key: int) -> int:
        return key

    def value_id(self, value: int) -> int:
        return self.num_keys + value

    @property
    def ask_id(self) -> int:
        return self.value_id(self.num_values)

    @property
    def filler_id(self) -> int:
        return self.ask_id + 1

    def binding_id(self, key: int, value: int) -> int:
        return self.filler_id + 1 + key * self.num_values + value

    @property
    def answer_ids(self) -> list[int]:
        """The value ids: they occur only as answers."""
        return [self.value_id(v) for v in range(self.num_values)]

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


@dataclass(frozen=True)
class Question:
    """One scored token of a document."""

    position: int
    """Index of the asked value in the document."""
    distance: int
    """Tokens from the binding to this value."""
    value_id: int


def generate_document(task: RecallTask, rng: random.Random) -> tuple[list[int], list[Question]]:
    """A document (``task.seq_length`` ids, the last one end-of-document) and its questions."""
    n_events = 2 * task.num_keys
    slots = task.seq_length - 1 - 2 * task.num_keys       # a binding takes 1 token, a question 3
    event_slots = sorted(rng.sample(range(slots), n_events))
    order = [k for k in range(task.num_keys) for _ in range(2)]
    rng.shuffle(order)                                    # a key's first event binds, its second asks
    values = [rng.randrange(task.num_values) for _ in range(task.num_keys)]
    tokens, questions, bound_at = [], [], {}
    next_slot = 0
    for slot, key in zip(event_slots, order):
        tokens += [task.filler_id] * (slot - next_slot)
        next_slot = slot + 1
        if key not in bound_at:
            bound_at[key] = len(tokens)
            tokens.append(task.binding_id(key, values[key]))
        else:
            tokens += [task.ask_id, task.key_id(key), task.value_id(values[key])]
            questions.append(Question(len(tokens) - 1, len(tokens) - 1 - bound_at[key],
                                      task.value_id(values[key])))
    tokens += [task.filler_id] * (slots - next_slot) + [EOD]
    return tokens, questions


def write_dataset(task: RecallTask, output_dir: str, num_train: int, num_valid: int, seed: int = 0) -> dict:
    """Write ``output_dir``/{train,valid}.bin/.idx/.json (ids of the byte tokenizer's vocabulary,
    with its metadata sidecar) and task.json; returns the metadata. Train and valid documents come
    from different seeds."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_s2.training.data import ByteTokenizer

    if num_train < 1 or num_valid < 1:
        raise ValueError(f"num_train ({num_train}) and num_valid ({num_valid}) must be >= 1")
    os.makedirs(output_dir, exist_ok=True)
    meta = {"task": task.__dict__, "seed": seed}
    for split, count, split_seed in (("train", num_train, seed), ("valid", num_valid, seed + 1)):
        rng = random.Random(split_seed)
        prefix = os.path.join(output_dir, split)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(count):
            tokens = generate_document(task, rng)[0]
            builder.add_document(np.array(tokens, dtype=np.int64), [len(tokens)])
        builder.finalize(prefix + ".idx")
        info = {"tokenizer": ByteTokenizer().unique_identifiers, "vocab_size": VOCAB, "eod": EOD,
                "documents": count, "tokens": count * task.seq_length}
        with open(prefix + ".json", "w") as f:
            json.dump(info, f, indent=2)
        meta[split] = {"documents": count, "tokens": info["tokens"]}
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
        tokens = torch.tensor([doc for doc, _ in batch], device=device)
        predicted = logits_fn(tokens).argmax(dim=-1).cpu()
        for row, (_, questions) in enumerate(batch):
            for q in questions:
                bucket = next(b for b in buckets if b["lo"] <= q.distance < b["hi"])
                bucket["questions"] += 1
                bucket["correct"] += int(predicted[row, q.position - 1].item() == q.value_id)
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
