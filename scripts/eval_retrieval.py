"""Long-range associative recall: make the training data, or score a trained run by distance.

    python scripts/eval_retrieval.py generate --out data/retrieval           # train/valid datasets
    python scripts/pretrain.py --config-name retrieval_hybrid                # (or _dense, _sparse, _window)
    python scripts/eval_retrieval.py evaluate runs/retrieval_hybrid --json recall.json
    python scripts/eval_retrieval.py evaluate runs/retrieval2k_hybrid --data data/retrieval2k \
        --lengths 256 512 1024 2048 --json hybrid.json                  # also needles at 4 lengths
    python scripts/eval_retrieval.py plot dense.json hybrid.json --out docs/figures/retrieval2k

The task, the distance and chance are described in megatron_s2/evaluation/retrieval.py. The
window of the report is the run's S2 local window (attention.s2.local_blocks * block_size).
"""
import argparse
import json
import os

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported

from megatron_s2.evaluation.retrieval import (RecallTask, evaluate_needles, evaluate_recall,  # noqa: E402
                                              format_coverage, format_needles, format_recall, write_dataset)


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
    gen.add_argument("--train-lengths", type=int, nargs="*", default=None,
                     help="training sequences packed from documents of these lengths (dividing --seq-length); "
                          "train with data.reset_attention_mask=true data.reset_position_ids=true")
    about = "accuracy by distance of a run's newest checkpoint"
    ev = sub.add_parser("evaluate", help=about, description="Recall accuracy by distance between a key's "
                        "binding and its question, of a run's newest checkpoint, on fresh documents of the "
                        "generated task; the report marks the run's S2 local window.")
    ev.add_argument("run_dir", help="the run directory (config.yaml and checkpoints), e.g. runs/retrieval_hybrid")
    ev.add_argument("--data", default="data/retrieval", help="the generated data (its task.json: the task's shape)")
    ev.add_argument("--num-documents", type=int, default=64, help="documents to score (default 64)")
    ev.add_argument("--seed", type=int, default=12345, help="evaluation documents (not the training seeds)")
    ev.add_argument("--json", default=None, help="write the result here")
    ev.add_argument("--lengths", type=int, nargs="*", default=[],
                    help="also score needle documents of these lengths (tokens, multiples of the S2 block, "
                         "at most the run's train.seq_length): the question ends the document")
    ev.add_argument("--needles", type=int, default=16, help="needle documents per (length, depth) cell")
    pl = sub.add_parser("plot", help="draw the needle heatmaps and accuracy by distance of evaluate's --json files")
    pl.add_argument("results", nargs="+", help="evaluate --json files, one per model, drawn in this order")
    pl.add_argument("--out", default="retrieval", help="writes OUT_needles.png (if every file has needles) "
                                                       "and OUT_distance.png")
    a = p.parse_args(argv)

    if a.command == "generate":
        task = RecallTask(seq_length=a.seq_length, num_keys=a.num_keys, num_values=a.num_values)
        meta = write_dataset(task, a.out, a.num_train, a.num_valid, a.seed, a.train_lengths)
        print(f"wrote {a.out}/train ({meta['train']['documents']} documents) and {a.out}/valid "
              f"({meta['valid']['documents']} documents); train with "
              f"data.loss_token_ids=[{','.join(map(str, task.answer_ids))}] (the answers)")
        return

    if a.command == "plot":
        plot(a.results, a.out, p)
        return

    from megatron_s2.evaluation.checkpoints import load_run_config, logits_function, trained_model
    with open(os.path.join(a.data, "task.json")) as f:
        task = RecallTask(**json.load(f)["task"])
    block = load_run_config(a.run_dir).attention.s2.block_size
    for n in a.lengths:
        if not (0 < n <= task.seq_length and n % block == 0):
            p.error(f"--lengths {n}: must be a multiple of attention.s2.block_size ({block}) in (0, {task.seq_length}]")
    with trained_model(a.run_dir) as (model, cfg, path):
        s2 = cfg.attention.s2
        if cfg.train.seq_length != task.seq_length:
            raise ValueError(f"run {a.run_dir} has train.seq_length={cfg.train.seq_length} but the task in "
                             f"{a.data} has seq_length={task.seq_length}")
        m = cfg.model
        layout = (s2.to_layout(m.num_attention_heads, m.num_query_groups or m.num_attention_heads)
                  if "S" in cfg.attention.layout else None)
        result = evaluate_recall(logits_function(model), task,
                                 window=s2.local_blocks * s2.block_size, num_documents=a.num_documents,
                                 seed=a.seed, layout=layout)
        if a.lengths:
            result["needles"] = evaluate_needles(logits_function(model), task, a.lengths, num_documents=a.needles)
    label = f"{cfg.run.name} ({cfg.attention.layout})"
    result.update(run_dir=a.run_dir, checkpoint=path, layout=cfg.attention.layout, label=label)
    print(format_recall(result, f"{label}, {path}"))
    if "coverage" in result:
        print(format_coverage(result["coverage"], label))
    if "needles" in result:
        print(format_needles(result["needles"], label))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


def plot(paths: list[str], out: str, parser: argparse.ArgumentParser) -> None:
    from megatron_s2.plots import plot_needles, plot_recall_by_distance

    results = {}
    for path in paths:
        if not os.path.isfile(path):
            parser.error(f"results {path}: no such file (write it with evaluate --json)")
        with open(path) as f:
            result = json.load(f)
        results[result.get("label", os.path.basename(path))] = result
    print(plot_recall_by_distance(f"{out}_distance.png", results))
    if all("needles" in r for r in results.values()):
        print(plot_needles(f"{out}_needles.png", {label: r["needles"] for label, r in results.items()}))


if __name__ == "__main__":
    main()
