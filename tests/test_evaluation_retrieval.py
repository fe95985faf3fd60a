"""Associative recall: the generator's questions against an independent re-reading of the text,
the scorer against oracles, a tiny untrained model, and a checkpoint round trip through the trainer."""
import random

import pytest
import torch

from megatron_s2.evaluation.retrieval import (RecallTask, distance_buckets, document_tokens,
                                              evaluate_recall, generate_document, write_dataset)

VOCAB = 257


def reread(text):
    """(position of each asked value, its distance, the value) from the text alone."""
    last, out = {}, []
    for start in range(0, len(text) - 3, 4):
        key, op, val = text[start], text[start + 1], text[start + 2]
        if op == "?":
            out.append((start + 2, start + 2 - last[key][0], last[key][1]))
        if op in "=?":
            last[key] = (start + 2, val)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_documents_have_the_exact_length_and_honest_questions(seed):
    task = RecallTask(seq_length=256)
    text, questions = generate_document(task, random.Random(seed))
    assert len(text) == 255 and len(document_tokens(text)) == 256
    assert [(q.position, q.distance, q.value) for q in questions] == reread(text)
    assert all(text[q.position] == q.value for q in questions)
    bound = [text[i] for i in range(0, len(text) - 3, 4) if text[i + 1] == "="]
    assert len(bound) == len(set(bound))        # a key is bound once


def oracle(flip=False):
    """Logits that put all mass on the recalled value (or on a wrong digit with ``flip``)."""
    def logits(tokens):
        out = torch.zeros(*tokens.shape, VOCAB)
        for b, row in enumerate(tokens.tolist()):
            text = bytes(t for t in row if t < 256).decode()
            for position, _, value in reread(text):
                guess = str((int(value) + 1) % 10) if flip else value
                out[b, position - 1, ord(guess)] = 1.0
        return out
    return logits


def test_scorer_gives_full_marks_to_the_oracle_and_none_to_a_wrong_one():
    task = RecallTask(seq_length=256)
    right = evaluate_recall(oracle(), task, window=32, num_documents=4, batch_size=3)
    wrong = evaluate_recall(oracle(flip=True), task, window=32, num_documents=4, batch_size=3)
    expected = sum(len(generate_document(task, random.Random(12345))[1]) for _ in range(1))
    assert right["beyond_window"]["accuracy"] == 1.0 and wrong["beyond_window"]["accuracy"] == 0.0
    assert sum(b["questions"] for b in right["buckets"]) > expected    # 4 documents, not one
    assert [(b["lo"], b["hi"]) for b in right["buckets"]] == distance_buckets(32, 256) == \
        [(1, 32), (32, 64), (64, 128), (128, 256)]


def test_untrained_model_round_trip():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_s2 import S2AttentionConfig, build_gpt_model
    from megatron_s2.evaluation.checkpoints import logits_function
    from megatron_s2.parallel import model_parallel_session

    task = RecallTask(seq_length=64)
    with model_parallel_session(1):
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2,
                                   attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
        model = build_gpt_model(config, S2AttentionConfig(block_size=16, local_blocks=2, vert_stride=2),
                                "SD", vocab_size=VOCAB + 7, max_sequence_length=64).eval()
        result = evaluate_recall(logits_function(model), task, window=32, num_documents=3)
    total = sum(len(generate_document(task, random.Random(12345))[1]) for _ in range(1))
    assert sum(b["questions"] for b in result["buckets"]) >= total
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
    write_dataset(RecallTask(seq_length=64), str(data), num_train=40, num_valid=8)
    overrides = [f"data.prefixes=[{data}/train]", f"data.valid_prefixes=[{data}/valid]",
                 "train.seq_length=64", "train.iters=2", "train.warmup_iters=1", "train.eval_interval=2",
                 "train.micro_batch_size=2", "train.global_batch_size=2", "model.hidden_size=32",
                 "model.ffn_hidden_size=64", "attention.layout=SD", "attention.s2.local_blocks=2",
                 f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = validate(compose_config(overrides, recipe="retrieval_dense"), world_size=1)
    result = pretrain(cfg)
    with trained_model(str(tmp_path / "run")) as (model, loaded, path):
        assert path == result["checkpoint"] and loaded.attention.layout == "SD"
        t = loaded.train
        _, valid = build_datasets([f"{data}/train"], None, [f"{data}/valid"], "98,2,0", ByteTokenizer(),
                                  seq_length=64, seed=t.seed, num_train_samples=4,
                                  num_valid_samples=t.eval_iters * 2, cache_dir=str(tmp_path / "cache"))
        total = tokens = 0.0
        with torch.no_grad():
            for k in range(t.eval_iters):
                batch = get_micro_batch(valid, 2 * k, 2)
                per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                total += (per_token * batch["loss_mask"]).sum().item()
                tokens += batch["loss_mask"].sum().item()
    assert total / tokens == pytest.approx(result["val_loss"], rel=1e-5)
