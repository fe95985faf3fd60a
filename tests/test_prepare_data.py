"""prepare_data: text, JSONL and folders -> indexed dataset; decode(encode(text)) == text."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
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


@pytest.fixture
def process_group():
    """Megatron's blended dataset asks for the rank: a one-process gloo group (the trainer has one)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blend_and_separate_validation_through_megatron(tmp_path, process_group):
    """Two prepared datasets blended 3:1 through BlendedMegatronDatasetBuilder, and a separate
    validation dataset (blend_per_split); samples are [seq] token windows of the right documents."""
    from megatron_s2.training.data import build_datasets, get_micro_batch

    tok = ByteTokenizer()
    prefixes = []
    for name, letter in (("a", "a"), ("b", "b"), ("v", "v")):
        src = tmp_path / f"{name}.txt"
        src.write_text(letter * 5000, encoding="utf-8")
        prepare_dataset([str(src)], str(tmp_path / name), tok, progress=False)
        prefixes.append(str(tmp_path / name))
    common = dict(seq_length=64, seed=3, cache_dir=str(tmp_path / "cache"))
    train, valid = build_datasets(prefixes[:2], [3.0, 1.0], [prefixes[2]], "98,2,0", tok,
                                  num_train_samples=400, num_valid_samples=8, **common)
    batch = get_micro_batch(train, 0, 400)
    assert batch["tokens"].shape == (400, 64)
    first = batch["tokens"][:, 0]
    share_a = (first == ord("a")).float().mean().item()
    assert 0.7 < share_a < 0.8 and share_a + (first == ord("b")).float().mean().item() > 0.99
    assert bool((batch["labels"][:, :-1] == batch["tokens"][:, 1:]).all())
    assert set(get_micro_batch(valid, 0, 8)["tokens"].unique().tolist()) <= {ord("v"), tok.eod}
    # A loss on chosen targets only: the mask keeps exactly the positions whose label is one of them.
    scored = get_micro_batch(train, 0, 400, loss_token_ids=[ord("b"), tok.eod])
    assert torch.equal(scored["tokens"], batch["tokens"])
    assert torch.equal(scored["loss_mask"].bool(), batch["loss_mask"].bool()
                       & ((batch["labels"] == ord("b")) | (batch["labels"] == tok.eod)))
    assert 0 < scored["loss_mask"].sum() < batch["loss_mask"].sum()

    train_only, no_valid = build_datasets(prefixes[:1], None, [], "98,2,0", tok, num_train_samples=10,
                                          num_valid_samples=0, **common)
    assert no_valid is None and len(train_only) >= 10
