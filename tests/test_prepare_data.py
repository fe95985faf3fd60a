"""prepare_data: text, JSONL and folders -> indexed dataset; decode(encode(text)) == text."""
import importlib.util
import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_s2.training.data import ByteTokenizer, check_dataset_tokenizer, prepare_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["plain ascii text\nwith two lines\n", "unicode: héllo wörld — 日本語 🙂\n", "x"]


def _documents(prefix: str, tokenizer) -> list[str]:
    dataset = IndexedDataset(prefix)
    docs = []
    for i in range(len(dataset)):
        ids = dataset[i]
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        docs.append(tokenizer.detokenize(ids[:-1]))
    return docs


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids.max() < 256 and tok.detokenize(ids) == text


def test_round_trip_text_jsonl_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (folder / "sub" / "b.md").write_text(TEXTS[1], encoding="utf-8")
    (folder / "skipped.bin").write_bytes(b"\x00\x01")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)) + "\n",
                     encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text(TEXTS[2], encoding="utf-8")

    tok = ByteTokenizer()
    prefix = str(tmp_path / "out" / "data")
    meta = prepare_dataset([str(folder), str(jsonl), str(single)], prefix, tok,
                           suffixes=(".txt", ".md"), progress=False)
    expected = [TEXTS[0], TEXTS[1]] + TEXTS + [TEXTS[2]]
    assert _documents(prefix, tok) == expected
    assert meta["documents"] == len(expected)
    assert meta["tokens"] == sum(len(t.encode("utf-8")) + 1 for t in expected)
    assert np.asarray(IndexedDataset(prefix)[0]).dtype == np.uint16
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]
    check_dataset_tokenizer(prefix, tok)


def test_cli_and_tokenizer_mismatch(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "scripts", "prepare_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = tmp_path / "t.txt"
    src.write_text(TEXTS[1], encoding="utf-8")
    prefix = str(tmp_path / "cli")
    cli.main(["--input", str(src), "--output-prefix", prefix, "--quiet"])
    assert _documents(prefix, ByteTokenizer()) == [TEXTS[1]]

    class OtherTokenizer(ByteTokenizer):
        def __init__(self):
            self.unique_identifiers = {"class": "Other"}
    with pytest.raises(ValueError, match="prepared with tokenizer"):
        check_dataset_tokenizer(prefix, OtherTokenizer())


def test_bad_inputs(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        prepare_dataset([str(tmp_path / "missing.txt")], str(tmp_path / "x"), tok, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text key"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 has no key 'text'"):
        prepare_dataset([str(bad)], str(tmp_path / "x"), tok, progress=False)
    with pytest.raises(ValueError, match="hold no files"):
        prepare_dataset([str(tmp_path)], str(tmp_path / "x"), tok, suffixes=(".nothing",), progress=False)
