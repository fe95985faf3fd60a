"""Evidence a user can look at: figures of the attention layout, training-speed sweeps, run
comparisons and a long-range retrieval test.

- figures: ``megatron_s2.plots`` (the trainer draws the layout picture with it too).
- ``compare``: read several runs' metrics.jsonl and tabulate final losses.
- ``retrieval``: synthetic associative-recall documents; a model's accuracy by distance, by how an S2
  pattern reaches the binding (window, covered, routed, unreachable), and by needle depth and length.
- ``checkpoints``: rebuild a trained model from its run directory for evaluation.

Scripts in ``scripts/`` (plot_layout, bench_training, compare_runs, eval_retrieval) are thin CLIs
over these.
"""
