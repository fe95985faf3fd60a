"""Long-range associative recall: make the training data, or score a trained run by distance.

    python scripts/eval_retrieval.py generate --out data/retrieval           # train/valid datasets
    python scripts/pretrain.py --config-name retrieval_hybrid                # (or _dense, _sparse, _window)
    python scripts/eval_retrieval.py evaluate runs/retrieval_hybrid --json recall.json

The task, the distance and chance are described in megatron_s2/evaluation/retrieval.py. The
window of the report is the run's S2 local window (attention.s2.local_blocks * block_size).
"""
import argparse
import json
import os

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported

from megatron_s2.evaluation.retrieval import RecallTask, evaluate_recall, format_recall, write_dataset  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    about = "write train/valid indexed datasets of recall documents (and task.json, the task's shape)"
    gen = sub.add_parser("generate", help=about, description=about[0].upper() + about[1:] + "; train on them "
                         "with the retrieval_* recipes, which read data/retrieval by default.")
    gen.add_argument("--out", default="data/retrieval", help="output folder (default data/retrieval)")
    gen.add_argument("--seq-length", type=int, default=RecallTask.seq_length,
                     help=f"tokens per document, end of document included (default {RecallTask.seq_length})")
    gen.add_argument("--num-keys", type=int, default=RecallTask.num_keys,
                     help=f"keys per document, each bound once and asked once (default {RecallTask.num_keys})")
    gen.add_argument("--num-values", type=int, default=RecallTask.num_values,
                     help=f"values a key can take; chance is 1 / this (default {RecallTask.num_values})")
    gen.add_argument("--num-train", type=int, default=8000, help="training documents (default 8000)")
    gen.add_argument("--num-valid", type=int, default=64, help="validation documents (default 64)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the training documents; validation uses "
                                                         "seed + 1 (default 0)")
    about = "accuracy by distance of a run's newest checkpoint"
    ev = sub.add_parser("evaluate", help=about, description="Recall accuracy by distance between a key's "
                        "binding and its question, of a run's newest checkpoint, on fresh documents of the "
                        "generated task; the report marks the run's S2 local window.")
    ev.add_argument("run_dir", help="the run directory (config.yaml and checkpoints), e.g. runs/retrieval_hybrid")
    ev.add_argument("--data", default="data/retrieval", help="the generated data (its task.json: the task's shape)")
    ev.add_argument("--num-documents", type=int, default=64, help="documents to score (default 64)")
    ev.add_argument("--seed", type=int, default=12345, help="evaluation documents (not the training seeds)")
    ev.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)

    if a.command == "generate":
        task = RecallTask(seq_length=a.seq_length, num_keys=a.num_keys, num_values=a.num_values)
        meta = write_dataset(task, a.out, a.num_train, a.num_valid, a.seed)
        print(f"wrote {a.out}/train ({meta['train']['documents']} documents) and {a.out}/valid "
              f"({meta['valid']['documents']} documents); train with "
              f"data.loss_token_ids=[{','.join(map(str, task.answer_ids))}] (the answers)")
        return

    from megatron_s2.evaluation.checkpoints import logits_function, trained_model
    with open(os.path.join(a.data, "task.json")) as f:
        task = RecallTask(**json.load(f)["task"])
    with trained_model(a.run_dir) as (model, cfg, path):
        s2 = cfg.attention.s2
        if cfg.train.seq_length != task.seq_length:
            raise ValueError(f"run {a.run_dir} has train.seq_length={cfg.train.seq_length} but the task in "
                             f"{a.data} has seq_length={task.seq_length}")
        result = evaluate_recall(logits_function(model), task,
                                 window=s2.local_blocks * s2.block_size, num_documents=a.num_documents,
                                 seed=a.seed)
    result.update(run_dir=a.run_dir, checkpoint=path, layout=cfg.attention.layout)
    print(format_recall(result, f"{cfg.run.name} ({cfg.attention.layout}, {path})"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
