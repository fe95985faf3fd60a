"""Bytes each layer keeps for backward, measured on CPU against the memory model's count.

    python scripts/saved_bytes.py

Builds the tiny recipe's model and a wider one (fp32, CPU, one process), runs one training
forward per layout (D, S) and recomputation setting (none, selective core_attn, full), counts what
autograd saves per layer with torch.autograd.graph.saved_tensors_hooks
(megatron_s2.saved_tensors) and prints it next to megatron_s2.memory's figure for the same layer
(device "cpu"). Recomputation runs through megatron_s2.recompute (the CPU path's).
"""
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()

from megatron_s2.memory import Shape, layer_activations, outside_layers  # noqa: E402
from megatron_s2.parallel import model_parallel_session  # noqa: E402
from megatron_s2.saved_tensors import measure_forward  # noqa: E402
from megatron_s2.training.config import compose_config, validate  # noqa: E402
from megatron_s2.training.loop import padded_vocab_size, transformer_config  # noqa: E402

SHAPES = {"tiny": [],
          "wider": ["model.hidden_size=512", "model.num_attention_heads=8", "model.num_query_groups=4",
                    "model.ffn_hidden_size=1408", "train.seq_length=1024", "train.micro_batch_size=2",
                    "attention.s2.block_size=64", "attention.s2.local_blocks=4", "attention.s2.vert_stride=4"]}
SETTINGS = {"none": [], "core_attn": ["model.recompute_granularity=selective"],
            "full": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                     "model.recompute_num_layers=1"]}


def rows(dropout: float):
    for name, overrides in SHAPES.items():
        for setting, knobs in SETTINGS.items():
            cfg = validate(compose_config(overrides + knobs + ["model.num_layers=2", "attention.layout=DS",
                                                              f"model.hidden_dropout={dropout}",
                                                              "train.device=cpu"]), note=lambda _: None)
            config, t = transformer_config(cfg), cfg.train
            vocab = padded_vocab_size(257, cfg)
            shape = Shape(t.seq_length, t.micro_batch_size, device="cpu")
            saved = measure_forward(config, cfg.attention.s2, "DS", seq_length=t.seq_length,
                                    micro_batch_size=t.micro_batch_size, vocab_size=vocab)
            for kind, measured in zip("DS", saved.layers):
                yield name, kind, setting, measured, sum(layer_activations(config, kind, shape, setting).values())
            yield name, "other", setting, saved.other, sum(outside_layers(config, vocab, shape).values())


def main() -> int:
    warnings.filterwarnings("ignore")
    print(f"{'shape':<7}{'dropout':>8}  {'layer':<6}{'recompute':<11}{'measured KiB':>14}{'model KiB':>12}"
          f"{'model/measured':>16}")
    with model_parallel_session(1):
        for dropout in (0.0, 0.1):
            for name, kind, setting, measured, model in rows(dropout):
                print(f"{name:<7}{dropout:>8}  {kind:<6}{setting:<11}{measured / 1024:>14.1f}{model / 1024:>12.1f}"
                      f"{model / measured:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
