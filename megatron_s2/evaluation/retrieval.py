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
from s2attn import S2Layout

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


def generate_document(task: RecallTask, rng: random.Random, *, length: int | None = None,
                      keys: list[int] | None = None) -> tuple[list[int], list[Question]]:
    """A document of ``length`` ids (default ``task.seq_length``; the last one end-of-document)
    binding and asking each of ``keys`` (default every key of the task) once, and its questions.

    Ids follow ``task`` whatever the length, so a model trained on the task reads shorter documents
    too. Raises ValueError when the events do not fit (``length - 1 - 2 * len(keys)`` slots for
    ``2 * len(keys)`` events)."""
    length = task.seq_length if length is None else length
    keys = list(range(task.num_keys)) if keys is None else list(keys)
    n_events = 2 * len(keys)
    slots = length - 1 - len(keys) * 2                   # a binding takes 1 token, a question 3
    if slots < n_events:
        raise ValueError(f"a document of {length} tokens cannot hold {len(keys)} keys (needs > {4 * len(keys)})")
    event_slots = sorted(rng.sample(range(slots), n_events))
    order = [k for k in keys for _ in range(2)]
    rng.shuffle(order)                                    # a key's first event binds, its second asks
    values = {k: rng.randrange(task.num_values) for k in keys}
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


def needle_document(task: RecallTask, length: int, depth: float, rng: random.Random) -> tuple[list[int], Question]:
    """A needle-in-a-haystack document of ``length`` ids: the question ``? k v`` ends it (the value
    at ``length - 2``, then end-of-document) and the binding of ``k`` sits at ``depth`` (0: the
    first token, 1: just before the question) of the ``length - 4`` ids before the question, moved
    back at most two ids so that it does not split another question.

    The haystack binds and asks other keys as ``generate_document`` does, with as many keys per
    token as the task (at least the needle's), so shorter documents look like the training ones.
    Returns (ids, the needle's Question); the haystack's questions are not scored."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    keys = rng.sample(range(task.num_keys), max(1, round(task.num_keys * length / task.seq_length)))
    needle, value = keys[0], rng.randrange(task.num_values)
    haystack = generate_document(task, rng, length=length - 4, keys=keys[1:])[0][:-1]   # length - 5 ids
    where = round(depth * len(haystack))
    inside_question = {task.ask_id, *map(task.key_id, range(task.num_keys))}
    while where and haystack[where - 1] in inside_question:
        where -= 1
    tokens = (haystack[:where] + [task.binding_id(needle, value)] + haystack[where:]
              + [task.ask_id, task.key_id(needle), task.value_id(value), EOD])
    return tokens, Question(length - 2, length - 2 - where, task.value_id(value))


def write_dataset(task: RecallTask, output_dir: str, num_train: int, num_valid: int, seed: int = 0,
                  train_lengths: list[int] | None = None) -> dict:
    """Write ``output_dir``/{train,valid}.bin/.idx/.json (ids of the byte tokenizer's vocabulary,
    with its metadata sidecar) and task.json; returns the metadata. Train and valid documents come
    from different seeds; every stored sequence is ``task.seq_length`` tokens.

    With ``train_lengths`` (each dividing ``task.seq_length``), each training sequence is
    ``seq_length // L`` documents of one length L drawn uniformly from them, each binding and
    asking every key, stored as one sequence with their end-of-document ids: train with
    data.reset_attention_mask and data.reset_position_ids so that each is attended alone. A
    curriculum in every batch: a question in a short document has few tokens to search, which
    gives the lookup a strong signal early, and short documents hold more questions per token.
    Validation is always ``seq_length``-token documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_s2.training.data import ByteTokenizer

    if num_train < 1 or num_valid < 1:
        raise ValueError(f"num_train ({num_train}) and num_valid ({num_valid}) must be >= 1")
    if train_lengths and any(n < 1 or task.seq_length % n for n in train_lengths):
        raise ValueError(f"train_lengths {train_lengths} must divide seq_length ({task.seq_length})")
    os.makedirs(output_dir, exist_ok=True)
    meta = {"task": task.__dict__, "seed": seed, "train_lengths": train_lengths or [task.seq_length]}
    for split, count, split_seed, lengths in (("train", num_train, seed, train_lengths),
                                              ("valid", num_valid, seed + 1, None)):
        rng = random.Random(split_seed)
        prefix = os.path.join(output_dir, split)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(count):
            if lengths:
                n = rng.choice(lengths)
                tokens = [t for _ in range(task.seq_length // n) for t in generate_document(task, rng, length=n)[0]]
            else:
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


def _scored(logits_fn, docs: list[tuple[list[int], list[Question]]], batch_size: int,
            device: str | torch.device) -> list[tuple[Question, bool]]:
    """(question, answered right) for every question of ``docs`` (equal lengths), in order. Right:
    the argmax over the whole vocabulary at the position before the value is the value."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for first in range(0, len(docs), batch_size):
        batch = docs[first:first + batch_size]
        predicted = logits_fn(torch.tensor([doc for doc, _ in batch], device=device)).argmax(dim=-1).cpu()
        out += [(q, predicted[row, q.position - 1].item() == q.value_id)
                for row, (_, questions) in enumerate(batch) for q in questions]
    return out


def _tally(answers: list[bool]) -> dict:
    return {"questions": len(answers), "correct": sum(answers),
            "accuracy": sum(answers) / len(answers) if answers else None}


@torch.no_grad()
def evaluate_recall(logits_fn, task: RecallTask, *, window: int, num_documents: int = 64, seed: int = 12345,
                    batch_size: int = 8, device: str | torch.device = "cpu", layout: S2Layout | None = None) -> dict:
    """Accuracy of ``logits_fn(tokens [b, s]) -> logits [b, s, vocab]`` on the asked values of
    fresh documents (``seed``), by distance bucket (see ``distance_buckets(window, ...)``), and by
    the residue of the binding's block under ``layout`` when given (see ``coverage_table``).

    A question counts as correct when the argmax over the whole vocabulary at the position before
    the value is the value. Returns {"buckets": [{lo, hi, questions, correct, accuracy}], "chance",
    "window", "beyond_window": {questions, correct, accuracy}} and, with ``layout``, "coverage".
    """
    if num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    rng = random.Random(seed)
    scored = _scored(logits_fn, [generate_document(task, rng) for _ in range(num_documents)], batch_size, device)
    buckets = [{"lo": lo, "hi": hi, **_tally([ok for q, ok in scored if lo <= q.distance < hi])}
               for lo, hi in distance_buckets(window, task.seq_length)]
    result = {"buckets": buckets, "chance": task.chance, "window": window,
              "beyond_window": _tally([ok for q, ok in scored if q.distance >= window])}
    if layout is not None:
        result["coverage"] = coverage_table(layout, task.seq_length, scored)
    return result


COVERAGE_CLASSES = ("window", "covered", "routed", "unreachable")
"""How the binding's block relates to the query block under an S2 pattern (``coverage_table``)."""


def coverage_table(layout: S2Layout, seq_length: int, scored: list[tuple[Question, bool]]) -> dict:
    """Accuracy by how the heads of ``layout`` connect the query block of each question to its
    binding's block, read from ``layout.block_mask`` at ``seq_length`` (U: some head computes the
    block pair):

    - "window": fewer than ``local_blocks`` blocks apart;
    - "covered": older, and U holds the pair (a strided head reads the binding's block);
    - "routed": U does not, but U·U does: a block m reads the binding's block and the query block
      reads m, so two S layers in a row can carry the binding over (e.g. through m's window);
    - "unreachable": not even U·U: no two S layers connect them (nor one).

    The query is the position before the value (where the value is predicted). Older pairs are
    also counted under the residue of the binding's block modulo ``vert_stride``. Returns
    {"vert_stride", "classes": {class: {questions, correct, accuracy}}, "residues": [{residue,
    class, questions, correct, accuracy}]} (one row per residue and class that occur).
    """
    n = -(-seq_length // layout.block_size)
    seen = layout.block_mask(n, n).any(dim=0)
    routes = (seen.float() @ seen.float()) > 0
    classes = {name: [] for name in COVERAGE_CLASSES}
    residues: dict[tuple[int, int], list[bool]] = {}
    for q, ok in scored:
        i, j = (q.position - 1) // layout.block_size, (q.position - q.distance) // layout.block_size
        kind = ("window" if i - j < layout.local_blocks else "covered" if seen[i, j]
                else "routed" if routes[i, j] else "unreachable")
        classes[kind].append(ok)
        if kind != "window":
            residues.setdefault((j % layout.vert_stride, COVERAGE_CLASSES.index(kind)), []).append(ok)
    return {"vert_stride": layout.vert_stride, "classes": {k: _tally(v) for k, v in classes.items()},
            "residues": [{"residue": r, "class": COVERAGE_CLASSES[c], **_tally(oks)}
                         for (r, c), oks in sorted(residues.items())]}


DEPTHS = tuple(i / 10 for i in range(11))
"""Needle depths: 0%, 10%, ..., 100% of the document, as the needle-in-a-haystack picture."""


@torch.no_grad()
def evaluate_needles(logits_fn, task: RecallTask, lengths: list[int], depths: tuple[float, ...] = DEPTHS, *,
                     num_documents: int = 16, seed: int = 23456, batch_size: int = 8,
                     device: str | torch.device = "cpu") -> dict:
    """Needle-in-a-haystack accuracy of ``logits_fn`` (as ``evaluate_recall``): for each document
    length and binding depth, ``num_documents`` fresh ``needle_document``s (``seed``), one question
    each, asked at the end. The distance of a question is about ``(1 - depth) * length`` tokens.

    Returns {"lengths", "depths", "documents", "chance", "accuracy": [len(lengths)][len(depths)],
    "distance": mean distance in tokens, same shape}.
    """
    if num_documents < 1 or not lengths or not depths:
        raise ValueError(f"num_documents ({num_documents}) must be >= 1 and lengths ({lengths}) and "
                         f"depths ({depths}) non-empty")
    rng = random.Random(seed)
    accuracy, distance = [], []
    for length in lengths:
        docs = [needle_document(task, length, d, rng) for d in depths for _ in range(num_documents)]
        scored = _scored(logits_fn, [(tokens, [q]) for tokens, q in docs], batch_size, device)
        cells = [scored[k * num_documents:(k + 1) * num_documents] for k in range(len(depths))]
        accuracy.append([_tally([ok for _, ok in cell])["accuracy"] for cell in cells])
        distance.append([sum(q.distance for q, _ in cell) / num_documents for cell in cells])
    return {"lengths": list(lengths), "depths": list(depths), "documents": num_documents,
            "chance": task.chance, "accuracy": accuracy, "distance": distance}


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


def _percent(tally: dict) -> str:
    return f"{tally['accuracy']:6.1%}" if tally["accuracy"] is not None else "     -"


def format_coverage(coverage: dict, label: str = "") -> str:
    """``coverage_table``'s result as lines: each class, then each residue and class beyond the
    window."""
    rows = ([(name, coverage["classes"][name]) for name in COVERAGE_CLASSES]
            + [(f"residue {r['residue']:>2} {r['class']}", r) for r in coverage["residues"]])
    return "\n".join([f"{label + ': ' if label else ''}accuracy by how the S layers' heads reach the binding's "
                      f"block (residues modulo {coverage['vert_stride']})"]
                     + [f"  {name:<24}{_percent(t)}  of {t['questions']:>5} questions" for name, t in rows])


def format_needles(result: dict, label: str = "") -> str:
    """``evaluate_needles``' result as a table: one row per depth, one column per length."""
    head = "  depth  " + "".join(f"{n:>8}" for n in result["lengths"])
    lines = [f"{label + ': ' if label else ''}needle accuracy by document length (tokens) and binding depth, "
             f"{result['documents']} documents a cell, chance {result['chance']:.0%}", head]
    for k, depth in enumerate(result["depths"]):
        cells = "".join(f"{row[k]:8.0%}" for row in result["accuracy"])
        lines.append(f"  {depth:5.0%}  {cells}")
    return "\n".join(lines)
