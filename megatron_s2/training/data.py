"""Data: tokenizers, text -> Megatron indexed dataset (.bin/.idx), and batches for the trainer.

- ``ByteTokenizer`` needs no files (UTF-8 bytes + an end-of-document token); ``HFTokenizer``
  reads a local Hugging Face tokenizer directory (``transformers`` is imported only then; nothing
  is downloaded).
- ``prepare_dataset`` turns text files, JSONL files or folders of them into one indexed dataset
  (documents: a JSONL record; in plain text, a paragraph, see ``text_documents``), written
  atomically with a metadata sidecar ``<prefix>.json`` that names the tokenizer.
- ``check_splits`` refuses, before Megatron builds anything, a split that this run reads and that
  would get no sample (Megatron's GPTDataset loops forever on an empty split);
  ``build_datasets`` then reads the datasets through Megatron-Core's ``GPTDataset`` /
  ``BlendedMegatronDatasetBuilder`` (train/valid splits, blends; its sample indices are cached).
- ``get_micro_batch`` gives one rank its slice of a global batch by sample position, so the data
  position is just the number of consumed samples and a resumed run reads what the uninterrupted
  run would have read; ``pack_documents`` turns it into one pack of separately attended documents
  (data.reset_attention_mask).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import sysconfig
import time
from typing import Iterator

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDatasetBuilder

from .errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 ends a document. decode(encode(text)) == text."""

    vocab_size = 257
    eod = 256

    def __init__(self) -> None:
        # Megatron's datasets key their index caches on this.
        self.unique_identifiers = {"class": "ByteTokenizer"}

    def tokenize(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json)."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ValueError(f"tokenizer {path!r} is a Hugging Face tokenizer directory, which needs "
                             "`pip install transformers`") from e
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eod = self._tokenizer.eos_token_id
        if eod is None:
            raise ValueError(f"tokenizer {path!r} has no eos token to end documents with")
        self.vocab_size = len(self._tokenizer)
        self.eod = eod
        self.unique_identifiers = {"class": "HFTokenizer", "path": os.path.abspath(path)}

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'byte' or the path of a local Hugging Face tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isdir(spec):
        raise ValueError(f"tokenizer ({spec!r}) must be 'byte' or a local tokenizer directory")
    return HFTokenizer(spec)


# -- text -> indexed dataset ----------------------------------------------------------------------

def _input_files(inputs: list[str], suffixes: tuple[str, ...] | None) -> list[str]:
    files = []
    for path in inputs:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
                files += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and (suffixes is None or n.endswith(suffixes))]
        else:
            raise ValueError(f"input {path!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"inputs {inputs} hold no files" + (f" ending in {suffixes}" if suffixes else ""))
    return files


PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")     # a blank (or whitespace-only) line
TEXT_DOCUMENTS_RULE = (
    "A JSONL record is one document. In plain text a document is a paragraph (the text between "
    "blank lines), and a paragraph longer than the token budget is cut into pieces of that many "
    "tokens; with the 'file' unit each text file is one document.")


def _documents(path: str, jsonl_key: str, paragraphs: bool) -> Iterator[str]:
    """A JSONL file's records; a text file's paragraphs (``paragraphs``) or its whole text."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(JSONL_SUFFIXES):
            text = f.read()
            yield from (PARAGRAPH_BREAK.split(text) if paragraphs else [text])
            return
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number} is not a JSON record ({e.msg})") from None
                if jsonl_key not in record:
                    raise ValueError(f"{path}:{line_number} has no key {jsonl_key!r} (jsonl_key)")
                yield record[jsonl_key]


class _Progress:
    """One self-overwriting line on stderr (no dependency) when stderr is a terminal; elsewhere
    (a log file, a pipe) only its last state, once."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start, self.last = total, enabled, time.time(), 0.0
        self.terminal = sys.stderr.isatty()

    def update(self, done: int, tokens: int) -> None:
        now = time.time()
        if self.enabled and (done == self.total or (self.terminal and now - self.last > 0.2)):
            self.last = now
            width = 30
            filled = width * done // max(self.total, 1)
            rate = tokens / max(now - self.start, 1e-9)
            overwrite = "\r" if self.terminal else ""
            print(f"{overwrite}prepare_data [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} files, "
                  f"{tokens:,} tokens, {rate:,.0f} tok/s", end="" if done < self.total else "\n",
                  file=sys.stderr, flush=True)


def prepare_dataset(inputs: list[str], output_prefix: str, tokenizer, *, jsonl_key: str = "text",
                    suffixes: tuple[str, ...] | None = None, text_documents: str = "paragraph",
                    max_document_tokens: int = 2048, progress: bool = True) -> dict:
    """Tokenize text files, JSONL files (field ``jsonl_key``) or folders of them (``suffixes``
    filters folder contents) into ``output_prefix``.bin/.idx, each document followed by the
    tokenizer's eod. ``text_documents`` ('paragraph' or 'file') and ``max_document_tokens`` (the
    token budget) set the document unit of plain text: see TEXT_DOCUMENTS_RULE. Returns the
    metadata also written to ``output_prefix``.json (documents; tokens, eods included; files).
    ValueError when the inputs hold no non-empty document (nothing is written then).
    """
    if text_documents not in ("paragraph", "file"):
        raise ValueError(f"text_documents ({text_documents!r}) must be 'paragraph' or 'file'")
    if max_document_tokens < 1:
        raise ValueError(f"max_document_tokens ({max_document_tokens}) must be >= 1")
    files = _input_files(list(inputs), suffixes)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    bar = _Progress(len(files), progress)
    paragraphs = text_documents == "paragraph"
    num_documents = num_tokens = 0
    for done, path in enumerate(files, 1):
        budget = max_document_tokens if paragraphs and not path.endswith(JSONL_SUFFIXES) else None
        for text in _documents(path, jsonl_key, paragraphs):
            if not text.strip():
                continue
            ids = tokenizer.tokenize(text)
            for start in range(0, len(ids), budget or len(ids)):
                piece = np.append(ids[start:start + budget] if budget else ids, tokenizer.eod)
                builder.add_document(piece, [len(piece)])
                num_documents += 1
                num_tokens += len(piece)
        bar.update(done, num_tokens)
    if num_documents == 0:
        builder.data_file.close()
        os.remove(tmp_prefix + ".bin")
        raise ValueError(f"inputs {list(inputs)} hold no non-empty documents")
    builder.finalize(tmp_prefix + ".idx")
    meta = {"tokenizer": tokenizer.unique_identifiers, "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod, "documents": num_documents, "tokens": num_tokens,
            "files": len(files), "inputs": [os.path.abspath(p) for p in inputs],
            "text_documents": text_documents, "max_document_tokens": max_document_tokens}
    with open(tmp_prefix + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    # The .idx lands last: a prefix with an .idx is complete.
    for ext in (".bin", ".json", ".idx"):
        os.replace(tmp_prefix + ext, output_prefix + ext)
    return meta


def check_indexed_dataset(prefix: str, key: str, make: str = "python scripts/prepare_data.py") -> None:
    """A ValueError naming ``key`` (the config field, e.g. data.prefixes[0]), the file and the
    command that makes it (``make``) when ``prefix``.bin/.idx are missing, truncated, or do not
    belong together; reads only the .idx header and its last entries, so it is cheap for any
    dataset size."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise ValueError(f"{key} ({prefix!r}): {path} does not exist (make it with {make})")

    def bad(what: str) -> ValueError:
        return ValueError(f"{key} ({prefix!r}): {what}; prepare the dataset again with {make}")

    header_size = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size or header[:len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise bad(f"{idx_path} is not a Megatron index file (truncated or wrong header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(_INDEX_HEADER):])
    if version != 1 or code not in {c.value for c in DType}:
        raise bad(f"{idx_path} has an unknown version ({version}) or dtype code ({code})")
    expected = header_size + sequences * (4 + 8) + documents * 8
    if idx_size != expected:
        raise bad(f"{idx_path} is {idx_size} bytes but its header ({sequences} sequences, {documents} "
                  f"documents) needs {expected} (truncated or corrupt)")
    if sequences == 0:
        raise bad(f"{idx_path} holds no sequences")
    with open(idx_path, "rb") as f:     # the last sequence's length (int32) and byte offset (int64)
        f.seek(header_size + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(header_size + 4 * sequences + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    bin_expected = last_pointer + last_length * DType.size(code)
    if bin_size != bin_expected:
        raise bad(f"{bin_path} is {bin_size} bytes but {idx_path} indexes {bin_expected} "
                  "(truncated, or the .bin and .idx come from different datasets)")


def check_dataset_tokenizer(prefix: str, tokenizer) -> None:
    """Refuse a dataset prepared with another tokenizer (when its metadata sidecar exists)."""
    path = prefix + ".json"
    if not os.path.isfile(path):
        return
    with open(path) as f:
        made_with = json.load(f)["tokenizer"]
    if made_with != tokenizer.unique_identifiers:
        raise ValueError(f"dataset {prefix!r} was prepared with tokenizer {made_with}, but "
                         f"data.tokenizer gives {tokenizer.unique_identifiers}; set data.tokenizer to "
                         "the one the dataset was prepared with ('byte' or its directory)")


def default_dataset(cache_dir: str, tokenizer, documents: str = "file") -> str:
    """The embedded default: the standard library's top-level .py files, prepared once and cached,
    one document per file (``documents`` 'file') or per paragraph ('paragraph', see
    TEXT_DOCUMENTS_RULE). Returns the dataset prefix, named by the tokenizer (a Hugging Face
    tokenizer by a hash of its path too). Call it on one rank, then barrier."""
    stdlib = sysconfig.get_paths()["stdlib"]
    ids = tokenizer.unique_identifiers
    name = "stdlib-py{}.{}-{}".format(*sys.version_info[:2], ids["class"])
    if "path" in ids:
        name += "-" + hashlib.sha1(ids["path"].encode()).hexdigest()[:10]
    prefix = os.path.join(cache_dir, "datasets", name + ("" if documents == "file" else f"-{documents}s"))
    if not os.path.isfile(prefix + ".idx"):
        files = sorted(os.path.join(stdlib, n) for n in os.listdir(stdlib) if n.endswith(".py"))
        print(f"preparing the default dataset from {len(files)} files in {stdlib} -> {prefix}",
              file=sys.stderr)
        prepare_dataset(files, prefix, tokenizer, text_documents=documents)
    return prefix


# -- datasets and batches -------------------------------------------------------------------------

def split_sizes(prefix: str, split: str | None) -> list[tuple[int, int] | None]:
    """(documents, tokens) that Megatron-Core's GPTDataset takes from each split [train, valid,
    test] of the indexed dataset ``prefix``; None for a split that ``split`` (e.g. "98,2,0") leaves
    out. ``split`` None: the whole dataset is one split (data.valid_prefixes), returned as train.

    Megatron's rule (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits, 0.16): the
    normalised split vector's cumulative bookends (a, b) take sequences [round(a*N), round(b*N))
    of the N sequences (prepare_dataset writes one sequence per document).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths      # a view of the .idx mapping: used while dataset lives
    matrix = ([(0.0, 1.0), None, None] if split is None
              else convert_split_vector_to_split_matrix(parse_and_normalize_split(split)))
    sizes = []
    for bookends in matrix:
        if bookends is None:
            sizes.append(None)
            continue
        begin, end = (int(round(b * float(len(lengths)))) for b in bookends)
        sizes.append((end - begin, int(lengths[begin:end].sum())))
    del dataset
    return sizes


SPLIT_NAMES = ("train", "valid", "test")


def check_splits(prefixes: list[str], weights: list[float] | None, valid_prefixes: list[str],
                 split: str, *, seq_length: int, read_valid: bool) -> None:
    """Refuse a split that this run reads (train; valid when ``read_valid``) and that one of its
    datasets leaves without a sample: at least one document and seq_length + 1 tokens (a sample's
    tokens and the next-token label of its last one). Megatron would loop forever computing the
    epochs of an empty split, or fail on a blend with an empty part, so this runs before it.
    Raises ConfigError (a ValueError) "<key>=<value>: <counts per split and the fix>", the key being
    data.split, data.prefixes[i], data.valid_prefixes[i] or data.weights.
    """
    if weights is not None and not all(w > 0 for w in weights):
        raise ConfigError("data.weights", list(weights), "every blend weight must be > 0 (Megatron samples "
                                                          "each dataset in proportion to its weight)")
    need = seq_length + 1
    # (key, index, prefix, its split string or None for the whole dataset, the split read, for validation)
    sources = [("data.prefixes", i, p, None if valid_prefixes else split, 0, False) for i, p in enumerate(prefixes)]
    if read_valid:
        sources += ([("data.valid_prefixes", i, p, None, 0, True) for i, p in enumerate(valid_prefixes)]
                    if valid_prefixes else [("data.prefixes", i, p, split, 1, True) for i, p in enumerate(prefixes)])
    for key, i, prefix, prefix_split, index, for_valid in sources:
        sizes = split_sizes(prefix, prefix_split)
        documents, tokens = sizes[index] or (0, 0)
        if documents >= 1 and tokens >= need:
            continue
        total_documents = sum(size[0] for size in sizes if size is not None)
        total_tokens = sum(size[1] for size in sizes if size is not None)
        split_is_the_cause = prefix_split is not None and total_documents >= 2 and total_tokens >= 2 * need
        counts = ", ".join(f"{name} {size[0]:,} documents / {size[1]:,} tokens"
                           for name, size in zip(SPLIT_NAMES, sizes) if size is not None)
        what = ((f"the {SPLIT_NAMES[index]} split" + (f" of {prefix}" if split_is_the_cause else "")
                 if prefix_split else "the dataset")
                + f" would get {documents:,} documents and {tokens:,} tokens"
                + (f" ({counts})" if prefix_split else "")
                + f", and a split needs at least 1 document and train.seq_length + 1 = {need:,} tokens")
        more_data = "prepare more data with scripts/prepare_data.py (plain text: one document per paragraph)"
        no_eval = ", set train.eval_interval=0 (no validation)" if for_valid else ""
        if split_is_the_cause:
            raise ConfigError("data.split", split, f"{what}; give that split a larger share (e.g. "
                              f"'data.split=\"90,10,0\"'){no_eval}, pass data.valid_prefixes, or {more_data}")
        raise ConfigError(f"{key}[{i}]", prefix, f"{what}; {more_data}{no_eval}, or use a smaller train.seq_length")


def build_datasets(prefixes: list[str], weights: list[float] | None, valid_prefixes: list[str],
                   split: str, tokenizer, *, seq_length: int, seed: int, num_train_samples: int,
                   num_valid_samples: int, cache_dir: str, eod_mask_loss: bool = False):
    """(train, valid) GPTDatasets (valid is None when num_valid_samples is 0). Call on every rank:
    Megatron builds its index caches on rank 0 first. ValueError (before Megatron builds anything,
    the same on every rank) when a dataset was prepared with another tokenizer or a split that is
    read has no sample (``check_splits``). Only the splits this run reads are built.
    ``eod_mask_loss``: Megatron's (its ``_get_ltor_masks_and_position_ids`` zeroes the loss mask
    where the input token is the tokenizer's eod). Position ids and document boundaries are left
    to ``pack_documents`` (Megatron's reset flags stay off here)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for prefix in list(prefixes) + list(valid_prefixes):
        check_dataset_tokenizer(prefix, tokenizer)
    read_valid = num_valid_samples > 0
    check_splits(prefixes, weights, valid_prefixes, split, seq_length=seq_length, read_valid=read_valid)
    train_blend = (list(prefixes), list(weights) if weights else None)
    split_kwargs = (dict(blend_per_split=[train_blend, (list(valid_prefixes), None) if read_valid else None, None])
                    if valid_prefixes else dict(blend=train_blend, split=split))
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False, path_to_cache=os.path.join(cache_dir, "indices"),
        **split_kwargs)
    if not valid_prefixes:      # the same documents per split; Megatron skips the splits set to None
        config.split_matrix = [config.split_matrix[0], config.split_matrix[1] if read_valid else None, None]
    sizes = [num_train_samples, num_valid_samples, 0]      # a weighted blend needs a size for every split
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid if read_valid else None


def get_micro_batch(dataset, first_sample: int, micro_batch_size: int,
                    loss_token_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Samples [first_sample, first_sample + micro_batch_size) stacked: tokens, labels, loss_mask,
    position_ids, each [b, s]. Wraps around past the end (a resumed run with more iterations).
    With ``loss_token_ids`` the loss mask keeps only positions whose label is one of them."""
    samples = [dataset[(first_sample + i) % len(dataset)] for i in range(micro_batch_size)]
    batch = {key: torch.stack([s[key] for s in samples])
             for key in ("tokens", "labels", "loss_mask", "position_ids")}
    if loss_token_ids is not None:
        batch["loss_mask"] = batch["loss_mask"] * torch.isin(batch["labels"], torch.tensor(loss_token_ids))
    return batch


def pack_documents(batch: dict[str, torch.Tensor], eod: int) -> tuple[dict, list[list[int]]]:
    """A micro batch of ``get_micro_batch`` (host tensors [b, s]) as one pack of b*s tokens whose
    documents are attended separately (data.reset_attention_mask), as Megatron's
    ``_get_ltor_masks_and_position_ids`` draws them: a document ends at and includes an ``eod``
    token, the next token starts a new one, and so does every sample's first token (no document
    spans two samples; none is empty).

    Returns (pack, per-sample document lengths): the pack holds tokens, labels, loss_mask and
    position_ids as [1, b*s] (position ids restart at 0 in every document), ``cu_seqlens`` (int32
    [num_docs + 1], document starts over the flattened tokens, then b*s) and ``max_seqlen`` (int,
    the longest document). Each sample's lengths sum to s. Computed on the host, before the batch
    moves to the device, so nothing waits on the device.
    """
    b, s = batch["tokens"].shape
    tokens = batch["tokens"].reshape(-1)
    starts = torch.zeros(b * s, dtype=torch.bool)
    starts[::s] = True
    starts[1:] |= tokens[:-1] == eod
    begins = starts.nonzero().flatten()
    lengths = torch.diff(begins, append=torch.tensor([b * s]))
    document = torch.cumsum(starts, 0) - 1
    pack = {key: batch[key].reshape(1, b * s) for key in ("tokens", "labels", "loss_mask")}
    pack["position_ids"] = (torch.arange(b * s) - begins[document]).reshape(1, b * s)
    pack["cu_seqlens"] = torch.cat([begins, torch.tensor([b * s])]).to(torch.int32)
    pack["max_seqlen"] = int(lengths.max())
    per_sample = torch.split(lengths, torch.bincount(begins // s, minlength=b).tolist())
    return pack, [sample.tolist() for sample in per_sample]


def micro_batch_start(consumed_samples: int, accumulation_step: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> int:
    """First sample of one rank's micro batch: a global batch is accumulation steps x dp ranks x
    micro batches, laid out in that order from ``consumed_samples``."""
    return consumed_samples + (accumulation_step * dp_size + dp_rank) * micro_batch_size
