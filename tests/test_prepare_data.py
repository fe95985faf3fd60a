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


def _load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "scripts", "prepare_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_and_tokenizer_mismatch(tmp_path):
    cli = _load_cli()
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
    # A weighted blend split by data.split (each 5000-token file is 3 documents under the 2048-token budget).
    train, valid = build_datasets(prefixes[:2], [3.0, 1.0], [], "34,66,0", tok, num_train_samples=40,
                                  num_valid_samples=8, **common)
    assert len(train) >= 40 and len(valid) >= 8


def test_plain_text_documents_are_paragraphs_cut_at_the_budget(tmp_path):
    """Blank (or whitespace-only) lines separate documents; a paragraph over the token budget is cut
    into budget-sized pieces; JSONL records are never cut; text_documents='file' keeps whole files."""
    src = tmp_path / "book.txt"
    src.write_text("first paragraph,\ntwo lines\n\n\nsecond\n  \t\nthird " + "z" * 25 + "\n", encoding="utf-8")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"text": "y" * 25}) + "\n", encoding="utf-8")
    tok = ByteTokenizer()
    meta = prepare_dataset([str(src), str(jsonl)], str(tmp_path / "p"), tok, max_document_tokens=10, progress=False)
    third = "third " + "z" * 25 + "\n"
    expected = (["first para", "graph,\ntwo", " lines"] + ["second"]
                + [third[i:i + 10] for i in range(0, len(third), 10)] + ["y" * 25])
    assert _documents(str(tmp_path / "p"), tok) == expected
    assert meta["documents"] == len(expected) and meta["text_documents"] == "paragraph"
    prepare_dataset([str(src)], str(tmp_path / "f"), tok, text_documents="file", progress=False)
    assert _documents(str(tmp_path / "f"), tok) == [src.read_text(encoding="utf-8")]


def test_split_sizes_follow_megatrons_assignment(tmp_path, process_group):
    """split_sizes gives, for each split, the documents and tokens of the GPTDataset that
    Megatron-Core builds (its own split-index arithmetic, rounding included)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_s2.training.data import split_sizes

    tok = ByteTokenizer()
    for num_documents in (1, 2, 3, 7, 50, 101):
        src = tmp_path / f"d{num_documents}.jsonl"
        src.write_text("".join(json.dumps({"text": "w" * (5 + i % 7)}) + "\n" for i in range(num_documents)))
        prefix = str(tmp_path / f"d{num_documents}")
        prepare_dataset([str(src)], prefix, tok, progress=False)
        for split in ("98,2,0", "99,1,0", "90,5,5", "1,1,1", "100,0,0", "3,1"):
            config = GPTDatasetConfig(random_seed=1, sequence_length=4, tokenizer=tok, reset_position_ids=False,
                                      reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                                      path_to_cache=str(tmp_path / "cache"), blend=([prefix], None), split=split)
            built = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
            megatron = [None if d is None else (len(d.indices), int(d.dataset.sequence_lengths[d.indices].sum()))
                        for d in built]
            assert split_sizes(prefix, split) == megatron, (num_documents, split)


def _prefix_of(tmp_path, name: str, documents: list[str]) -> str:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    prepare_dataset([str(src)], str(tmp_path / name), ByteTokenizer(), progress=False)
    return str(tmp_path / name)


def test_check_splits_names_the_key_and_the_counts(tmp_path):
    from megatron_s2.training.data import check_splits
    from megatron_s2.training.errors import ConfigError

    one = _prefix_of(tmp_path, "one", ["x" * 300])
    ten = _prefix_of(tmp_path, "ten", ["y" * 300] * 10)
    tiny = _prefix_of(tmp_path, "tiny", ["a", "bb", "ccc"])
    check = dict(weights=None, valid_prefixes=[], split="98,2,0", seq_length=64)
    # One document: the validation split is empty (round(0.98 * 1) = 1 = the end); without eval it trains.
    with pytest.raises(ConfigError, match=rf"^data.prefixes\[0\]={one}: the valid split would get 0 documents and "
                                          r"0 tokens \(train 1 documents / 301 tokens, valid 0 documents / 0 tokens\)"
                                          r".*65 tokens.*train.eval_interval=0"):
        check_splits([one], read_valid=True, **check)
    check_splits([one], read_valid=False, **check)
    # Ten documents: the split string is what leaves validation empty (round(9.8) = 10).
    with pytest.raises(ConfigError, match=r"^data.split=98,2,0: the valid split of .*ten would get 0 documents"
                                          r".*'data.split=\"90,10,0\"'"):
        check_splits([ten], read_valid=True, **check)
    check_splits([ten], **{**check, "split": "80,20,0"}, read_valid=True)
    # Too few tokens for one sample anywhere; a blend names the dataset at fault.
    with pytest.raises(ConfigError, match=r"^data.prefixes\[1\]=.*tiny: the train split would get 3 documents and 9 tokens"):
        check_splits([ten, tiny], read_valid=False, **check)
    with pytest.raises(ConfigError, match=r"^data.valid_prefixes\[0\]=.*tiny: the dataset would get 3 documents "
                                          r"and 9 tokens, .*train.eval_interval=0"):
        check_splits([ten], **{**check, "valid_prefixes": [tiny]}, read_valid=True)
    with pytest.raises(ConfigError, match=r"^data.weights=\[1.0,0.0\]: every blend weight must be > 0"):
        check_splits([ten, one], **{**check, "weights": [1.0, 0.0]}, read_valid=False)


def test_cli_reports_counts_and_warns_about_small_corpora(tmp_path, capsys):
    cli = _load_cli()
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph\n", encoding="utf-8")
    cli.main(["--input", str(one), "--output-prefix", str(tmp_path / "one"), "--quiet"])
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path}/one.bin/.idx: 1 documents, 20 tokens (from 1 files)\n"
    assert err.splitlines() == [
        "warning: with data.split=98,2,0 the train split gets 1 documents and 20 tokens, fewer than one sample of "
        "train.seq_length=256 needs (257 tokens): add text, or train with another data.split or a smaller "
        "train.seq_length",
        "warning: with data.split=98,2,0 the valid split gets 0 documents and 0 tokens, fewer than one sample of "
        "train.seq_length=256 needs (257 tokens): add text, or train with another data.split, "
        "train.eval_interval=0 or a smaller train.seq_length"]
    cli.main(["--input", str(one), "--output-prefix", str(tmp_path / "one"), "--quiet", "--split", "100,0,0",
              "--seq-length", "8"])
    assert capsys.readouterr().err == ""

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(empty), "--output-prefix", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --input={empty}: inputs ['{empty}'] hold no non-empty documents\n"
    assert not list(tmp_path.glob("out*"))      # nothing written, no temporary file left


def test_progress_overwrites_itself_only_on_a_terminal(tmp_path, capsys):
    """stderr captured (not a terminal, as in a log file): the progress bar's last state once, no
    carriage returns."""
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(TEXTS[1], encoding="utf-8")
    prepare_dataset([str(tmp_path)], str(tmp_path / "out" / "corpus"), ByteTokenizer(), suffixes=(".txt",))
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("prepare_data [") and err.count("\n") == 1, err
    assert "3/3 files" in err
