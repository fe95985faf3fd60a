"""Data: tokenizers, text -> Megatron indexed dataset (.bin/.idx), and batches for the trainer.

- ``ByteTokenizer`` needs no files (UTF-8 bytes + an end-of-document token); ``HFTokenizer``
  reads a local Hugging Face tokenizer directory (``transformers`` is imported only then; nothing
  is downloaded).
- ``prepare_dataset`` turns text files, JSONL files or folders of them into one indexed dataset,
  one document per file (per line for JSONL), written atomically with a metadata sidecar
  ``<prefix>.json`` that names the tokenizer.
- ``build_datasets`` reads them through Megatron-Core's ``GPTDataset`` /
  ``BlendedMegatronDatasetBuilder`` (train/valid splits, blends; its sample indices are cached).
- ``get_micro_batch`` gives one rank its slice of a global batch by sample position, so the data
  position is just the number of consumed samples and a resumed run reads what the uninterrupted
  run would have read.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import sysconfig
import time
from typing import Iterator

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDatasetBuilder

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


def _documents(path: str, jsonl_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(JSONL_SUFFIXES):
            yield f.read()
            return
        for line_number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if jsonl_key not in record:
                    raise ValueError(f"{path}:{line_number} has no key {jsonl_key!r} (jsonl_key)")
                yield record[jsonl_key]


class _Progress:
    """One self-overwriting line on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start, self.last = total, enabled, time.time(), 0.0

    def update(self, done: int, tokens: int) -> None:
        now = time.time()
        if self.enabled and (now - self.last > 0.2 or done == self.total):
            self.last = now
            width = 30
            filled = width * done // max(self.total, 1)
            rate = tokens / max(now - self.start, 1e-9)
            print(f"\rprepare_data [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} files, "
                  f"{tokens:,} tokens, {rate:,.0f} tok/s", end="" if done < self.total else "\n",
                  file=sys.stderr, flush=True)


def prepare_dataset(inputs: list[str], output_prefix: str, tokenizer, *, jsonl_key: str = "text",
                    suffixes: tuple[str, ...] | None = None, progress: bool = True) -> dict:
    """Tokenize text files, JSONL files (one document per line, field ``jsonl_key``) or folders of
    them (``suffixes`` filters folder contents) into ``output_prefix``.bin/.idx, each document
    followed by the tokenizer's eod. Returns the metadata also written to ``output_prefix``.json.
    """
    files = _input_files(list(inputs), suffixes)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    bar = _Progress(len(files), progress)
    num_documents = num_tokens = 0
    for done, path in enumerate(files, 1):
        for text in _documents(path, jsonl_key):
            if not text:
                continue
            ids = np.append(tokenizer.tokenize(text), tokenizer.eod)
            builder.add_document(ids, [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
        bar.update(done, num_tokens)
    if num_documents == 0:
        raise ValueError(f"inputs {list(inputs)} hold no non-empty documents")
    builder.finalize(tmp_prefix + ".idx")
    meta = {"tokenizer": tokenizer.unique_identifiers, "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod, "documents": num_documents, "tokens": num_tokens,
            "files": len(files), "inputs": [os.path.abspath(p) for p in inputs]}
    with open(tmp_prefix + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    # The .idx lands last: a prefix with an .idx is complete.
    for ext in (".bin", ".json", ".idx"):
        os.replace(tmp_prefix + ext, output_prefix + ext)
    return meta


def check_indexed_dataset(prefix: str, key: str) -> None:
    """A ValueError naming ``key`` (the config field, e.g. data.prefixes[0]) and the file when
    ``prefix``.bin/.idx are missing, truncated, or do not belong together; reads only the .idx
    header and its last entries, so it is cheap for any dataset size."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise ValueError(f"{key} ({prefix!r}): {path} does not exist (make it with scripts/prepare_data.py)")

    def bad(what: str) -> ValueError:
        return ValueError(f"{key} ({prefix!r}): {what}; prepare the dataset again with scripts/prepare_data.py")

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
                         f"data.tokenizer gives {tokenizer.unique_identifiers}")


def default_dataset(cache_dir: str, tokenizer) -> str:
    """The embedded default: the standard library's top-level .py files, prepared once and cached.
    Returns the dataset prefix. Call it on one rank, then barrier."""
    stdlib = sysconfig.get_paths()["stdlib"]
    name = "stdlib-py{}.{}-{}".format(*sys.version_info[:2], tokenizer.unique_identifiers["class"])
    prefix = os.path.join(cache_dir, "datasets", name)
    if not os.path.isfile(prefix + ".idx"):
        files = sorted(os.path.join(stdlib, n) for n in os.listdir(stdlib) if n.endswith(".py"))
        print(f"preparing the default dataset from {len(files)} files in {stdlib} -> {prefix}",
              file=sys.stderr)
        prepare_dataset(files, prefix, tokenizer)
    return prefix


# -- datasets and batches -------------------------------------------------------------------------

def build_datasets(prefixes: list[str], weights: list[float] | None, valid_prefixes: list[str],
                   split: str, tokenizer, *, seq_length: int, seed: int, num_train_samples: int,
                   num_valid_samples: int, cache_dir: str):
    """(train, valid) GPTDatasets (valid is None when num_valid_samples is 0). Call on every rank:
    Megatron builds its index caches on rank 0 first."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for prefix in list(prefixes) + list(valid_prefixes):
        check_dataset_tokenizer(prefix, tokenizer)
    train_blend = (list(prefixes), list(weights) if weights else None)
    split_kwargs = (dict(blend_per_split=[train_blend, (list(valid_prefixes), None), None])
                    if valid_prefixes else dict(blend=train_blend, split=split))
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=os.path.join(cache_dir, "indices"),
        **split_kwargs)
    sizes = [num_train_samples, num_valid_samples or None, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"the training split of {prefixes} is empty (data.split={split!r})")
    if num_valid_samples and (valid is None or len(valid) == 0):
        raise ValueError(f"the validation split is empty (data.split={split!r}); set "
                         "data.split or data.valid_prefixes, or train.eval_interval=0")
    return train, (valid if num_valid_samples else None)


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


def micro_batch_start(consumed_samples: int, accumulation_step: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> int:
    """First sample of one rank's micro batch: a global batch is accumulation steps x dp ranks x
    micro batches, laid out in that order from ``consumed_samples``."""
    return consumed_samples + (accumulation_step * dp_size + dp_rank) * micro_batch_size
