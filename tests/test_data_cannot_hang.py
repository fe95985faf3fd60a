"""Small or oddly split corpora, from scripts/prepare_data.py to scripts/pretrain.py: each case ends
in a one-line refusal (exit status 2) or a working run, never in a hang. Megatron-Core's GPTDataset
loops forever when a split it must sample from is empty; every command here runs in a subprocess
under a time limit, so a hang fails the test instead of stalling the suite."""
import json
import os
import subprocess
import sys

import pytest

from test_train_loop import PRETRAIN, REPO, TINY, _env, _records

PREPARE = os.path.join(REPO, "scripts", "prepare_data.py")
LIMIT_S = 300       # far above a run here (about 10-30 s); reached only by a hang


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _prepare(tmp_path, name: str, text: str) -> tuple[str, subprocess.CompletedProcess]:
    src = tmp_path / name
    src.write_text(text, encoding="utf-8")
    prefix = str(tmp_path / src.stem)
    result = subprocess.run([sys.executable, PREPARE, "--input", str(src), "--output-prefix", prefix, "--quiet"],
                            env=_env(tmp_path), capture_output=True, text=True, timeout=LIMIT_S)
    return prefix, result


def _train(tmp_path, cache_dir, prefix: str, *overrides) -> subprocess.CompletedProcess:
    """Two steps of the tiny model (seq_length 128) on ``prefix``."""
    return subprocess.run([sys.executable, PRETRAIN, *TINY, f"data.prefixes=[{prefix}]", "train.iters=2",
                           f"run.dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", *overrides],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=LIMIT_S)


def _refused(result: subprocess.CompletedProcess, start: str) -> str:
    """The one stderr line of a refusal, which must begin with ``start``."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr
    return lines[0]


def test_one_document_text(tmp_path, cache_dir):
    """One paragraph is one document: with validation on, the 98,2,0 split leaves validation
    empty and the trainer refuses; with train.eval_interval=0 the same data trains."""
    prefix, prepared = _prepare(tmp_path, "one.txt", "a single paragraph of plain text. " * 20)
    assert prepared.returncode == 0 and "1 documents, 681 tokens" in prepared.stdout
    assert "the valid split gets 0 documents" in prepared.stderr
    line = _refused(_train(tmp_path, cache_dir, prefix, "train.eval_interval=2"), f"error: data.prefixes[0]={prefix}: ")
    assert "the valid split would get 0 documents and 0 tokens (train 1 documents / 681 tokens" in line
    assert "train.eval_interval=0" in line
    trained = _train(tmp_path, cache_dir, prefix, "train.eval_interval=0")
    assert trained.returncode == 0 and "iter 2/2 | loss" in trained.stdout, trained.stderr[-3000:]


def test_tiny_jsonl(tmp_path, cache_dir):
    """Three short records: not one 129-token sample in the train split."""
    records = "".join(json.dumps({"text": t}) + "\n" for t in ("hello", "tiny", "corpus"))
    prefix, prepared = _prepare(tmp_path, "tiny.jsonl", records)
    assert prepared.returncode == 0 and "3 documents, 18 tokens" in prepared.stdout
    line = _refused(_train(tmp_path, cache_dir, prefix), f"error: data.prefixes[0]={prefix}: ")
    assert "the train split would get 3 documents and 18 tokens" in line and "train.seq_length + 1 = 129" in line


def test_empty_file(tmp_path):
    _, prepared = _prepare(tmp_path, "empty.txt", "\n \n")
    line = _refused(prepared, f"error: --input={tmp_path / 'empty.txt'}: ")
    assert "no non-empty documents" in line
    assert [name for name in os.listdir(tmp_path) if name.startswith("empty")] == ["empty.txt"]   # nothing written


def test_split_that_gets_nothing(tmp_path, cache_dir):
    """Ten paragraphs: 98,2,0 gives validation documents [round(9.8), 10) = none, so the refusal
    names data.split; 80,20,0 gives it two and the run validates."""
    prefix, prepared = _prepare(tmp_path, "ten.txt", "\n\n".join(f"paragraph {i} " + "x" * 300 for i in range(10)))
    assert prepared.returncode == 0 and "10 documents" in prepared.stdout
    line = _refused(_train(tmp_path, cache_dir, prefix, "train.eval_interval=2"), "error: data.split=98,2,0: ")
    assert f"the valid split of {prefix} would get 0 documents" in line
    trained = _train(tmp_path, cache_dir, prefix, "train.eval_interval=2", "train.eval_iters=1", 'data.split="80,20,0"')
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert [r["iteration"] for r in _records(tmp_path / "run") if "val_loss" in r] == [2]
