"""Associative recall: the generator's questions against an independent re-reading of the ids,
the scorer against oracles, a tiny untrained model, and a checkpoint round trip through the trainer."""
import json
import os
import random
import re
import subprocess
import sys

import warnings

import pytest
import torch

from megatron_s2 import S2AttentionConfig
from megatron_s2.evaluation.retrieval import (EOD, VOCAB, Question, RecallTask, coverage_table, distance_buckets,
                                              evaluate_needles, evaluate_recall, format_coverage, format_needles,
                                              generate_document, needle_document, write_dataset)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reread(task, tokens):
    """(position of each asked value, its distance, the value id) from the ids alone."""
    first_binding = task.binding_id(0, 0)
    bound, out = {}, []
    for i, t in enumerate(tokens):
        if first_binding <= t < EOD:                                  # B(key, value)
            key, value = divmod(t - first_binding, task.num_values)
            bound[key] = (i, task.value_id(value))
        elif t == task.ask_id:
            where, value_id = bound[tokens[i + 1]]
            out.append((i + 2, i + 2 - where, value_id))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_documents_have_the_exact_length_and_honest_questions(seed):
    task = RecallTask(seq_length=256, num_keys=8)
    tokens, questions = generate_document(task, random.Random(seed))
    assert len(tokens) == 256 and tokens[-1] == EOD and max(tokens[:-1]) < EOD
    assert [(q.position, q.distance, q.value_id) for q in questions] == reread(task, tokens)
    assert len(questions) == 8 and all(tokens[q.position] == q.value_id for q in questions)
    # Values occur only as answers, and the asked key is bound once and mentioned nowhere else.
    assert [i for i, t in enumerate(tokens) if t in task.answer_ids] == [q.position for q in questions]
    for q in questions:
        key = tokens[q.position - 1]
        bindings = {task.binding_id(key, v) for v in range(task.num_values)}
        assert [i for i, t in enumerate(tokens) if t in bindings] == [q.position - q.distance]
        assert [i for i, t in enumerate(tokens) if t == key] == [q.position - 1]


def test_mixed_length_training_sequences_pack_whole_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    task = RecallTask(seq_length=128, num_keys=4)
    meta = write_dataset(task, str(tmp_path), num_train=12, num_valid=2, train_lengths=[32, 64, 128])
    assert meta["train_lengths"] == [32, 64, 128]
    seen = set()
    for split, count in (("train", 12), ("valid", 2)):
        data = IndexedDataset(str(tmp_path / split))
        assert len(data) == count
        for k in range(count):
            tokens = data[k].tolist()
            assert len(tokens) == 128 and tokens[-1] == EOD
            ends = [i + 1 for i, t in enumerate(tokens) if t == EOD]
            docs = [tokens[a:b] for a, b in zip([0] + ends[:-1], ends)]
            lengths = {len(doc) for doc in docs}
            assert len(lengths) == 1 and (split == "train" or lengths == {128})
            seen |= lengths
            for doc in docs:                             # each document asks each of the 4 keys once
                assert sorted(doc[p - 1] for p, _, _ in reread(task, doc)) == [0, 1, 2, 3]
    assert seen == {32, 64, 128}
    with pytest.raises(ValueError, match="must divide seq_length"):
        write_dataset(task, str(tmp_path / "bad"), 1, 1, train_lengths=[48])


def test_task_rejects_ids_beyond_the_vocabulary():
    with pytest.raises(ValueError, match="token ids must fit"):
        RecallTask(seq_length=2048, num_keys=23, num_values=10)
    RecallTask(seq_length=2048, num_keys=22, num_values=10)        # 22 * 11 + 12 = 254 ids fit


def test_the_retrieval_recipes_score_exactly_the_answers():
    from megatron_s2.training.config import compose_config

    assert compose_config(recipe="retrieval_dense").data.loss_token_ids == RecallTask().answer_ids
    long = compose_config(recipe="retrieval2k_dense")
    assert long.train.seq_length == 2048
    assert long.data.loss_token_ids == RecallTask(seq_length=2048, num_keys=22).answer_ids


@pytest.mark.parametrize("length, depth", [(256, 0.0), (256, 0.5), (512, 1.0), (2048, 0.3), (64, 0.7)])
def test_needle_documents_end_with_the_question_and_bind_at_the_depth(length, depth):
    task = RecallTask(seq_length=2048, num_keys=22)
    tokens, needle = needle_document(task, length, depth, random.Random(length))
    assert len(tokens) == length and tokens[-1] == EOD and max(tokens[:-1]) < EOD
    questions = reread(task, tokens)                    # every key bound once, asked once after it
    assert questions[-1] == (needle.position, needle.distance, needle.value_id) == \
        (length - 2, needle.distance, tokens[length - 2])
    binding = length - 2 - needle.distance
    assert round(depth * (length - 5)) - 2 <= binding <= round(depth * (length - 5))
    # As many keys per token as the task (22 in 2048), at least the needle's.
    assert len(questions) == max(1, round(22 * length / 2048))


def test_documents_refuse_more_keys_than_fit():
    with pytest.raises(ValueError, match="cannot hold 5 keys"):
        generate_document(RecallTask(seq_length=64, num_keys=4), random.Random(0), length=20, keys=range(5))


def oracle(task, flip=False):
    """Logits that put all mass on the recalled value (or on a wrong value with ``flip``)."""
    def logits(tokens):
        out = torch.zeros(*tokens.shape, VOCAB)
        for b, row in enumerate(tokens.tolist()):
            for position, _, value_id in reread(task, row):
                guess = task.value_id((value_id - task.value_id(0) + 1) % task.num_values) if flip else value_id
                out[b, position - 1, guess] = 1.0
        return out
    return logits


def test_scorer_gives_full_marks_to_the_oracle_and_none_to_a_wrong_one():
    task = RecallTask(seq_length=256, num_keys=8)
    right = evaluate_recall(oracle(task), task, window=32, num_documents=4, batch_size=3)
    wrong = evaluate_recall(oracle(task, flip=True), task, window=32, num_documents=4, batch_size=3)
    assert sum(b["questions"] for b in right["buckets"]) == 4 * 8
    assert right["beyond_window"]["accuracy"] == 1.0 and wrong["beyond_window"]["accuracy"] == 0.0
    assert [(b["lo"], b["hi"]) for b in right["buckets"]] == distance_buckets(32, 256) == \
        [(1, 32), (32, 64), (64, 128), (128, 256)]


def limited(task, reach):
    """Logits that recall a value only when ``reach(query position, binding position)`` holds, and
    put a wrong value first otherwise: a model with a known blind spot."""
    def logits(tokens):
        out = torch.zeros(*tokens.shape, VOCAB)
        for b, row in enumerate(tokens.tolist()):
            for position, distance, value_id in reread(task, row):
                wrong = task.value_id((value_id - task.value_id(0) + 1) % task.num_values)
                out[b, position - 1, value_id if reach(position - 1, position - distance) else wrong] = 1.0
        return out
    return logits


def test_needle_cells_are_scored_at_their_length_and_depth():
    task = RecallTask(seq_length=512, num_keys=8)
    window = limited(task, lambda query, binding: query - binding < 100)
    result = evaluate_needles(window, task, [128, 512], depths=(0.0, 0.5, 1.0), num_documents=3, batch_size=2)
    # A needle at depth d of an n-token document is about (1 - d) * n tokens from its question.
    assert result["accuracy"] == [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert result["distance"][1][2] == 3 and 256 <= result["distance"][1][1] <= 258     # 510 - round(0.5 * 507)
    assert "  depth       128     512" in format_needles(result)


def test_coverage_classes_follow_the_s2_rule():
    """Stride 8 over 4 kv heads with step 1: the heads read older blocks at residues 0, 7, 6, 5
    only. Two S layers can still carry a binding at residue 4 over through the window of the next
    block (residue 5); residues 1-3 are beyond reach except just past the window. Oracles blind
    exactly where the S2 rule (written out here) reads nothing, in one layer or in two, score
    100% and 0% on the classes the table names."""
    s2 = S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=8, head_sliding_step=1)
    layout = s2.to_layout(num_heads=4, num_kv_heads=4)
    task = RecallTask(seq_length=512, num_keys=16)

    def read(i, j):                                   # some head computes query block i, key block j
        return j <= i and (i - j < 2 or any((j + g) % 8 == 0 for g in range(4)))

    def one_layer(query, binding):
        return read(query // 16, binding // 16)

    def two_layers(query, binding):
        i, j = query // 16, binding // 16
        return any(read(i, m) and read(m, j) for m in range(j, i + 1))

    def accuracy(result):
        return {name: c["accuracy"] for name, c in result["coverage"]["classes"].items()}

    direct = evaluate_recall(limited(task, one_layer), task, window=32, num_documents=16, layout=layout)
    routed = evaluate_recall(limited(task, two_layers), task, window=32, num_documents=16, layout=layout)
    assert accuracy(direct) == {"window": 1.0, "covered": 1.0, "routed": 0.0, "unreachable": 0.0}
    assert accuracy(routed) == {"window": 1.0, "covered": 1.0, "routed": 1.0, "unreachable": 0.0}
    coverage = routed["coverage"]
    assert sum(c["questions"] for c in coverage["classes"].values()) == 16 * 16
    by_class = {name: {row["residue"] for row in coverage["residues"] if row["class"] == name}
                for name in ("covered", "routed", "unreachable")}
    assert by_class["covered"] == {0, 5, 6, 7} and by_class["unreachable"] == {1, 2, 3}
    assert 4 in by_class["routed"] and by_class["routed"] <= {1, 2, 3, 4}
    assert re.search(r"\n  residue  2 unreachable +0\.0%  of +\d+ questions", format_coverage(coverage))
    # The value is predicted at the position before it: here the key ends block 1 and the binding
    # starts block 0, so the pair is inside the 2-block window although the value opens block 2.
    edge = coverage_table(layout, 512, [(Question(position=32, distance=32, value_id=0), True)])
    assert edge["classes"]["window"]["questions"] == 1


def test_plot_subcommand_draws_both_pictures(tmp_path):
    task = RecallTask(seq_length=256, num_keys=8)
    paths = []
    for name, reach in (("dense", lambda q, b: True), ("window", lambda q, b: q - b < 32)):
        result = evaluate_recall(limited(task, reach), task, window=32, num_documents=2)
        result["needles"] = evaluate_needles(limited(task, reach), task, [128, 256], num_documents=2)
        result["label"] = name
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    out = subprocess.run([sys.executable, "scripts/eval_retrieval.py", "plot", *map(str, paths),
                          "--out", str(tmp_path / "fig")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("fig_distance.png", "fig_needles.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "scripts/eval_retrieval.py", "plot", str(tmp_path / "none.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "none.json: no such file" in missing.stderr


def test_untrained_model_round_trip():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_s2 import S2AttentionConfig, build_gpt_model
    from megatron_s2.evaluation.checkpoints import logits_function
    from megatron_s2.parallel import model_parallel_session

    task = RecallTask(seq_length=64, num_keys=4)
    with model_parallel_session(1):
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                                   attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
        model = build_gpt_model(config, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=2),
                                "SD", vocab_size=VOCAB + 7, max_sequence_length=64).eval()
        result = evaluate_recall(logits_function(model), task, window=32, num_documents=3)
    assert sum(b["questions"] for b in result["buckets"]) == 3 * 4
    assert all(b["accuracy"] is None or 0.0 <= b["accuracy"] <= 1.0 for b in result["buckets"])


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_the_trainers_validation_loss(tmp_path):
    """Train 2 steps through the trainer; the evaluation loader's model gives the same loss on
    the trainer's validation batches as the trainer's final validation."""
    from megatron_s2.evaluation.checkpoints import trained_model
    from megatron_s2.training import pretrain, validate
    from megatron_s2.training.config import compose_config
    from megatron_s2.training.data import ByteTokenizer, build_datasets, get_micro_batch

    data = tmp_path / "data"
    write_dataset(RecallTask(seq_length=64, num_keys=4), str(data), num_train=40, num_valid=8)
    overrides = [f"data.prefixes=[{data}/train]", f"data.valid_prefixes=[{data}/valid]",
                 "train.seq_length=64", "train.iters=2", "train.warmup_iters=1", "train.eval_interval=2",
                 "train.micro_batch_size=2", "train.global_batch_size=2", "model.hidden_size=32",
                 "model.ffn_hidden_size=64", "attention.layout=SD", "attention.s2.local_blocks=2",
                 f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = validate(compose_config(overrides, recipe="retrieval_dense"), world_size=1)
    result = pretrain(cfg)
    with warnings.catch_warnings(record=True) as caught:       # pytest.ini's filters do not apply here
        warnings.simplefilter("always")
        with trained_model(str(tmp_path / "run")) as (model, loaded, path):
            pass
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    with trained_model(str(tmp_path / "run")) as (model, loaded, path):
        assert path == result["checkpoint"] and loaded.attention.layout == "SD"
        t = loaded.train
        _, valid = build_datasets([f"{data}/train"], None, [f"{data}/valid"], "98,2,0", ByteTokenizer(),
                                  seq_length=64, seed=t.seed, num_train_samples=4,
                                  num_valid_samples=t.eval_iters * 2, cache_dir=str(tmp_path / "cache"))
        total = tokens = 0.0
        with torch.no_grad():
            for k in range(t.eval_iters):
                batch = get_micro_batch(valid, 2 * k, 2, loaded.data.loss_token_ids)
                per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                total += (per_token * batch["loss_mask"]).sum().item()
                tokens += batch["loss_mask"].sum().item()
    assert total / tokens == pytest.approx(result["val_loss"], rel=1e-5)
