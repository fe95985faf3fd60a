"""The pretraining config: one dataclass per component, registered in Hydra's ConfigStore.

Hydra composes a recipe from ``recipes/`` over these schemas, so typos and wrong types fail at
composition (``megatron_s2.training.cli`` turns them into one line naming the key).
``validate`` then checks every combination once, before any process group or model exists, and
returns the typed config.

Stable keys (others rely on them): ``STABLE_KEYS``. ``schema_keys()`` lists every key with the
first paragraph of its docstring (``scripts/pretrain.py --help``, "did you mean" for typos).
A refusal is a ``ConfigError`` naming the key the user sets and its value.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import os
import re
import textwrap
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, FrozenSet, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megatron_s2 import S2AttentionConfig, resolve_hybrid_layout, validate_hybrid_model

from .data import check_dataset_tokenizer, check_indexed_dataset, load_tokenizer
from .errors import ConfigError, require, show_value


# The S2 pattern's schema is S2AttentionConfig's own fields, unfrozen so that recipes and
# command-line overrides can set them; validate() turns it into an S2AttentionConfig.
S2Schema = dataclasses.make_dataclass(
    "S2Schema", [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(S2AttentionConfig)])


class Device(Enum):
    auto = "auto"      # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    auto = "auto"      # bf16 on cuda, fp32 on cpu
    fp32 = "fp32"
    bf16 = "bf16"


class LrDecayStyle(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class RecomputeGranularity(Enum):
    selective = "selective"
    full = "full"


class RecomputeMethod(Enum):
    uniform = "uniform"
    block = "block"


RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""Megatron's selective recompute modules that apply to this model (no MoE, no MLA)."""


class NonFinitePolicy(Enum):
    stop = "stop"      # save diagnostics (iteration, non-finite parameters) and exit non-zero
    skip = "skip"      # drop the step's update; stop after train.max_consecutive_skips in a row


class DocumentUnit(Enum):
    file = "file"              # each source file is one document
    paragraph = "paragraph"    # the text between blank lines (scripts/prepare_data.py's default)


class WandbMode(Enum):
    auto = "auto"      # online when an API key is configured, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, optional GQA, no biases."""

    num_layers: int = 4
    """Transformer layers (attention.layout has one character per layer)."""
    hidden_size: int = 128
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None means num_attention_heads (MHA)."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; None means Megatron's default of 4 * hidden_size."""
    swiglu: bool = True
    """Gated SiLU MLP (Llama) instead of GELU."""
    rotary_base: int = 10000
    """RoPE base (Llama 3 uses 500000 for long contexts)."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (the S2 kernels take none: keep 0)."""
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded to a multiple of this times parallel.tp."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the output layer."""
    recompute_granularity: Optional[RecomputeGranularity] = None
    """Activation recomputation (Megatron's --recompute-granularity): null keeps every activation;
    selective recomputes model.recompute_modules of every layer; full recomputes whole layers
    (needs model.recompute_method and model.recompute_num_layers). The cuda path runs Megatron's
    own; the cpu path ours (megatron_s2.recompute: full layer by layer, selective core_attn)."""
    recompute_method: Optional[RecomputeMethod] = None
    """With full recomputation (Megatron's --recompute-method): uniform recomputes every layer, in
    chunks of model.recompute_num_layers of which only the first keeps its input (the cpu path:
    chunks of 1); block recomputes the first model.recompute_num_layers layers of each pipeline
    stage and keeps the others' activations."""
    recompute_num_layers: Optional[int] = None
    """With full recomputation: the chunk size (uniform) or the number of recomputed layers per
    pipeline stage (block), Megatron's --recompute-num-layers."""
    recompute_modules: Optional[List[str]] = None
    """With selective recomputation: which parts of each layer, any of core_attn (the core
    attention), mlp, layernorm (the cuda path only for the last two); null means [core_attn], as in
    Megatron (--recompute-modules)."""
    vocab_size: Optional[int] = None
    """Rows of the embedding and output layer. None: the tokenizer's vocabulary padded to a multiple
    of make_vocab_size_divisible_by x parallel.tp. Set: at least the tokenizer's vocabulary and a
    multiple of parallel.tp (a checkpoint.init_from folder's config.json gives it)."""
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2; Megatron's add_qkv_bias)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the RMSNorms (Megatron's layernorm_epsilon; Hugging Face's rms_norm_eps)."""
    rope_scaling: bool = False
    """Llama-3.x RoPE frequency scaling (Megatron's rope_scaling: low and high frequency factors 1
    and 4 over 8192 original positions)."""
    rope_scaling_factor: float = 8.0
    """The scaling factor of rope_scaling (Llama 3.1: 8, Llama 3.2: 32)."""


@dataclass
class AttentionConfig:
    """Which layers are S2-sparse and the S2 pattern they share."""

    layout: Optional[str] = None
    """One character per layer, S (S2-sparse) or D (dense), e.g. DSSS. None: use the shorthands
    below; validate() replaces it with the resolved string."""
    dense_every: Optional[int] = None
    """Shorthand: every dense_every-th layer is dense (see megatron_s2.resolve_hybrid_layout)."""
    dense_layers: Optional[List[int]] = None
    """Shorthand: these 0-based layers are dense, the rest sparse."""
    s2: S2Schema = field(default_factory=S2Schema)
    """The S2 block pattern of the sparse layers (fields of megatron_s2.S2AttentionConfig)."""


@dataclass
class ParallelConfig:
    """Model parallel sizes; data parallel size = world size / (tp * cp * pp)."""

    tp: int = 1
    """Tensor parallel size."""
    cp: int = 1
    """Context parallel size (sequence split over ranks)."""
    pp: int = 1
    """Pipeline parallel size (GPU path only)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism with tp > 1 (GPU path only)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with the backward pass, bucket by bucket
    (Megatron's --overlap-grad-reduce; the cuda path)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass
    (Megatron's --overlap-param-gather; the cuda path, with parallel.overlap_grad_reduce)."""
    distributed_timeout_minutes: float = 10.0
    """Process group timeout: a collective that waits longer (a dead or stuck rank) raises instead
    of hanging (Megatron's --distributed-timeout-minutes)."""


@dataclass
class TrainConfig:
    """Optimisation: AdamW with linear warmup then decay (Megatron's OptimizerParamScheduler)."""

    iters: int = 300
    """Optimizer steps of the whole run (a resumed run continues up to this number)."""
    seq_length: int = 256
    """Tokens per sample."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step = micro_batch_size x dp x accumulation steps. null (Megatron's
    default): micro_batch_size x dp, so a recipe runs unchanged on any number of processes; an
    explicit value must be a multiple of micro_batch_size x dp."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_iters: int = 20
    """Linear warmup steps from 0 to lr. When it does not fit before lr_decay_iters (a short run
    such as train.iters=20) it is clamped to lr_decay_iters // 10 with a note, as torchtitan clamps
    its warmup (Megatron refuses); set it explicitly to choose."""
    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr; None means train.iters."""
    lr_decay_style: LrDecayStyle = LrDecayStyle.cosine
    """Decay after warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_interval: int = 100
    """Validation loss every this many steps (and at the end); 0 disables validation."""
    eval_iters: int = 4
    """Global batches of the validation set per evaluation."""
    seed: int = 1234
    """Seed of weights, data order and every rank's RNG."""
    device: Device = Device.auto
    """cpu: our gloo path (fp32); cuda: Megatron DDP + distributed optimizer."""
    precision: Precision = Precision.auto
    """Parameter/compute precision."""
    on_non_finite: NonFinitePolicy = NonFinitePolicy.stop
    """A NaN/Inf loss or gradient norm on any rank, found before the optimizer step: ``stop``
    writes <run.dir>/non_finite_iter_<N>.json (iteration, loss, grad norm, the parameters whose
    gradients were non-finite) and raises; ``skip`` leaves the weights and optimizer untouched
    for that step and goes on (the data and the lr schedule advance)."""
    max_consecutive_skips: int = 3
    """With on_non_finite=skip: stop as ``stop`` does once this many steps in a row were skipped."""
    override_opt_param_scheduler: bool = False
    """On resume, take this config's schedule (lr, min_lr, warmup_iters, lr_decay_iters,
    lr_decay_style, weight_decay) instead of the checkpoint's, from the next step on (Megatron's
    --override-opt_param-scheduler). With neither this nor use_checkpoint_opt_param_scheduler, a
    resume whose schedule differs from the checkpoint's is refused, naming the key and both values."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, keep the checkpoint's schedule whatever this config says (Megatron's
    --use-checkpoint-opt_param-scheduler); config.yaml then records the schedule in force."""
    exit_duration_in_mins: Optional[float] = None
    """Stop after the first step that ends this many minutes after the launch started: save and
    exit 0 (Megatron's --exit-duration-in-mins). Set it below a job's time limit by more than a
    step and a save; rerunning the command resumes. None: no limit."""
    exit_interval: Optional[int] = None
    """Stop after every iteration that is a multiple of this: save and exit 0 (Megatron's
    --exit-interval). None: never."""


@dataclass
class DataConfig:
    """Megatron indexed datasets (.bin/.idx, made by scripts/prepare_data.py)."""

    prefixes: List[str] = field(default_factory=list)
    """Dataset path prefixes (without .bin/.idx). Empty: the embedded default, the Python
    standard library's source files, prepared on first use under data.cache_dir."""
    default_documents: DocumentUnit = DocumentUnit.file
    """The documents of the embedded default dataset: ``file`` (one per source file, mostly
    longer than a sample) or ``paragraph`` (the code between blank lines, median 144 bytes: many
    documents per sample, for data.reset_attention_mask). Ignored when data.prefixes is set."""
    weights: Optional[List[float]] = None
    """Blend weights, one per prefix; None weighs by size."""
    split: str = "98,2,0"
    """train,valid,test split of the blend (ignored when valid_prefixes is set)."""
    valid_prefixes: List[str] = field(default_factory=list)
    """Separate validation datasets; when set, all of data.prefixes is training data."""
    tokenizer: Optional[str] = None
    """'byte' (built in, no files) or a local Hugging Face tokenizer directory; must match the
    one the datasets were prepared with. null: the checkpoint.init_from folder when it is set,
    else 'byte'."""
    make_command: str = "python scripts/prepare_data.py"
    """The command that makes data.prefixes (a recipe whose data another script makes names it
    here), shown when a dataset is missing or damaged."""
    cache_dir: str = "${oc.env:MEGATRON_S2_CACHE,'~/.cache/megatron_s2'}"
    """Where the embedded dataset and Megatron's sample indices are cached."""
    loss_token_ids: Optional[List[int]] = None
    """Score only the positions whose target token is one of these ids (e.g. the value tokens of
    a synthetic recall task, whose other tokens are noise by construction); None scores every
    token. Training and validation loss both use this mask."""
    reset_attention_mask: bool = False
    """Attend each document separately (Megatron's --reset-attention-mask): a document ends at and
    includes the tokenizer's end-of-document token, and every sample starts one. A micro batch
    [b, s] is packed into one sequence of b*s tokens with document boundaries (PackedSeqParams,
    qkv_format thd); each document is attended from its own position 0 (S2 blocks relative to its
    first token, nothing across documents). Needs data.reset_position_ids=true and parallel.cp=1."""
    reset_position_ids: bool = False
    """Restart position ids (RoPE) at every document (Megatron's --reset-position-ids). Under the
    packed layout RoPE restarts exactly where attention does, so it must equal
    data.reset_attention_mask."""
    eod_mask_loss: bool = False
    """No loss at end-of-document tokens (Megatron's --eod-mask-loss): the target of an EOD is the
    next document's first token, which under data.reset_attention_mask it cannot attend."""


@dataclass
class RunConfig:
    """Where a run's outputs go (fixed, so every rank agrees)."""

    name: str = "tiny"
    """Run name (wandb name too)."""
    dir: str = "runs/${run.name}"
    """Resolved config, metrics.jsonl, checkpoints (unless checkpoint.dir), wandb files."""


@dataclass
class CheckpointConfig:
    """Megatron-Core dist_checkpointing saves."""

    dir: Optional[str] = None
    """Checkpoint directory; None means <run.dir>/checkpoints."""
    interval: int = 0
    """Save every this many steps; 0 saves only at the end (and on SIGTERM)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a successful save."""
    resume: bool = True
    """Resume from the newest complete checkpoint in checkpoint.dir when there is one."""
    init_from: Optional[str] = None
    """A local Hugging Face checkpoint folder (config.json, safetensors, tokenizer) of
    LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM, or an export of ours, whose weights
    start the run (Megatron's habit: weights only, fresh optimizer and schedule, iteration 0; any
    layout and parallel sizes). The model.* keys it determines must equal its config.json (scripts/
    convert_hf.py recipe writes them). Ignored once checkpoint.dir holds a checkpoint to resume."""


@dataclass
class WandbConfig:
    """Weights & Biases; never prompts, never blocks on the network in offline mode."""

    mode: WandbMode = WandbMode.auto
    """auto (online when an API key is configured, else offline), online, offline or disabled."""
    project: str = "megatron-s2"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team); null: your default."""


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and wandb, from rank 0 only."""

    interval: int = 10
    """One console line / metrics record every this many steps."""
    peak_tflops_per_device: Optional[float] = None
    """Peak TFLOP/s for MFU; None looks up known GPUs (bf16 dense) and reports no MFU on CPU."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests; leave empty in real runs."""

    inject_nan_at_iters: List[int] = field(default_factory=list)
    """Optimizer steps (1-based) at which rank 0 writes NaN into one parameter's gradient after
    the backward pass, before the non-finite check."""
    inject_nan_param: str = "decoder.layers.0.mlp.linear_fc2.weight"
    """The parameter (a name from model.named_parameters()) that gets the NaN gradient."""
    step_sleep_seconds: float = 0.0
    """Every training step sleeps this long after its backward pass: a step longer than a
    launcher's shutdown grace, for the stopping tests."""


@dataclass
class PretrainConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    derived: ClassVar[FrozenSet[str]] = frozenset()
    """Not a key: the keys that ``validate`` filled in because they were null
    (train.global_batch_size, train.lr_decay_iters)."""

    @property
    def checkpoint_dir(self) -> str:
        """checkpoint.dir, or <run.dir>/checkpoints when it is not set."""
        return self.checkpoint.dir or os.path.join(self.run.dir, "checkpoints")


RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "recipes")


def register_configs() -> None:
    """Store the schema as ``pretrain_schema``; recipes list it first in their defaults."""
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def compose_config(overrides: list[str] = (), recipe: str = "tiny",
                   recipes_dir: str = RECIPES_DIR) -> DictConfig:
    """The composed (not yet validated) config of a recipe with command-line style overrides
    (the command line, tests, notebooks). Hydra's errors propagate (the CLI turns them into one
    line)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(recipes_dir), version_base=None):
        return compose(config_name=recipe, overrides=list(overrides))


# -- keys and their docs (for --help and "did you mean") -----------------------------------------

STABLE_KEYS = ("model.*", "attention.layout", "attention.s2.*", "parallel.tp", "parallel.cp", "parallel.pp",
               "parallel.overlap_grad_reduce", "parallel.overlap_param_gather",
               "train.iters", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
               "train.exit_interval", "train.exit_duration_in_mins", "train.override_opt_param_scheduler",
               "train.use_checkpoint_opt_param_scheduler",
               "data.reset_attention_mask", "data.reset_position_ids", "data.eod_mask_loss", "run.dir",
               "checkpoint.dir", "checkpoint.interval", "checkpoint.init_from", "logging.interval",
               "logging.wandb.mode")


def _field_docs(cls) -> dict[str, str]:
    """The first paragraph of each field's docstring (the string literal under the field) in
    ``cls``'s source; S2Schema's come from S2AttentionConfig."""
    source = S2AttentionConfig if cls is S2Schema else cls
    tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split("\n\n")[0].split())
    return docs


def schema_keys(cls=PretrainConfig, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the schema (leaves only) -> the first paragraph of its docstring."""
    keys, docs = {}, _field_docs(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested):
            keys.update(schema_keys(nested, key + "."))
        else:
            keys[key] = docs.get(f.name, "")
    return keys


# -- refusals ------------------------------------------------------------------------------------

def _lookup(cfg, key: str):
    """The value at a dotted key, e.g. data.prefixes[1]."""
    value = cfg
    for part in key.split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index.rstrip("]"))]
    return value


# The model side (megatron_s2.config) and the data checks name their arguments; users set keys.
_ARGUMENT_KEYS = {"tensor_model_parallel_size": "parallel.tp", "context_parallel_size": "parallel.cp",
                  "num_attention_heads": "model.num_attention_heads", "num_query_groups": "model.num_query_groups",
                  "num_layers": "model.num_layers", "seq_length": "train.seq_length", "s2": "attention.s2",
                  "layout": "attention.layout", "dense_every": "attention.dense_every",
                  "dense_layers": "attention.dense_layers"}
_ARGUMENT = re.compile(r"(?<![\w.])(" + "|".join(_ARGUMENT_KEYS) + r")(?!\w)")
_NAMED = re.compile(r"(?P<key>[a-z_]+\.[\w.]+) \(")
_SUBJECT = re.compile(r"^(?P<key>[\w.]+(?:\[\d+\])?)(?: \([^)]*\)| '[^']*'| \[[^\]]*\])?:? (?P<reason>.+)$", re.S)


@contextlib.contextmanager
def _refusals_of(cfg, key: str):
    """Turn a lower layer's ValueError into a ConfigError: its inner names become the keys the user
    sets (num_attention_heads -> model.num_attention_heads), and a message that starts with a key
    ("s2.block_size must be ...") is refused on that key; otherwise on ``key``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        message = _ARGUMENT.sub(lambda m: _ARGUMENT_KEYS[m.group(1)], " ".join(str(e).split()))
        match = _SUBJECT.match(message)
        if match and _is_key(cfg, match["key"]):
            raise ConfigError(match["key"], _lookup(cfg, match["key"]), match["reason"]) from e
        # No key leads the message: refuse on the first key it gives a value of, "key (value)".
        named = next((m["key"] for m in _NAMED.finditer(message) if _is_key(cfg, m["key"])), key)
        raise ConfigError(named, _lookup(cfg, named), message) from e


def _is_key(cfg, key: str) -> bool:
    try:
        _lookup(cfg, key)
        return "." in key
    except (AttributeError, IndexError):
        return False


def _print_note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", flush=True)


def _vocab_size(tokenizer: str) -> int:
    """The vocabulary of data.tokenizer; a directory that holds no loadable tokenizer is refused."""
    try:
        return load_tokenizer(tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError("data.tokenizer", tokenizer, "holds no Hugging Face tokenizer that loads: "
                          + str(e).strip().splitlines()[0]) from e


def validate(cfg: DictConfig | PretrainConfig, world_size: int | None = None,
             note: Callable[[str], None] = _print_note, check_environment: bool = True) -> PretrainConfig:
    """Check every combination once and return the typed config with derived fields filled in:
    attention.layout (resolved S/D string), train.global_batch_size (micro x dp when null),
    train.warmup_iters (clamped when it does not fit), train.device / train.precision (never auto),
    train.lr_decay_iters, run.dir and data.cache_dir (absolute); ``cfg.derived`` names the keys
    filled in because they were null. A refusal raises ConfigError
    (a ValueError) naming the key and its value; an adjusted value is reported through ``note``
    (default: one ``note:`` line on stdout from rank 0).

    world_size defaults to $WORLD_SIZE (torchrun) or 1. ``check_environment=False`` (a plan for
    another machine) skips what depends on this one: a CUDA device for train.device=cuda, and the
    files of data.prefixes, data.valid_prefixes and data.tokenizer.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    with _refusals_of(cfg, "attention.s2"):
        cfg.attention.s2 = S2AttentionConfig(**dataclasses.asdict(cfg.attention.s2))   # its own checks
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    m, a, p, t, d = cfg.model, cfg.attention, cfg.parallel, cfg.train, cfg.data

    at_least_one = ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "parallel.tp",
                    "parallel.cp", "parallel.pp", "train.iters", "train.seq_length", "train.micro_batch_size",
                    "logging.interval", "checkpoint.keep_last", "train.max_consecutive_skips",
                    "model.make_vocab_size_divisible_by")
    for key in at_least_one + (("train.global_batch_size",) if t.global_batch_size is not None else ()):
        require(_lookup(cfg, key) >= 1, key, _lookup(cfg, key), "must be >= 1")
    for key in ("train.warmup_iters", "train.eval_interval", "train.eval_iters", "checkpoint.interval",
                "train.clip_grad", "train.weight_decay", "train.min_lr"):
        require(_lookup(cfg, key) >= 0, key, _lookup(cfg, key), "must be >= 0")
    require(all(i >= 1 for i in cfg.debug.inject_nan_at_iters), "debug.inject_nan_at_iters",
             cfg.debug.inject_nan_at_iters, "must hold optimizer steps >= 1")
    require(p.distributed_timeout_minutes > 0, "parallel.distributed_timeout_minutes",
             p.distributed_timeout_minutes, "must be > 0")
    require(t.lr >= t.min_lr, "train.lr", t.lr, f"must be >= train.min_lr ({t.min_lr})")
    for key in ("train.exit_duration_in_mins", "train.exit_interval"):
        require(_lookup(cfg, key) is None or _lookup(cfg, key) > 0, key, _lookup(cfg, key), "must be > 0 or null")
    require(not (t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler),
            "train.override_opt_param_scheduler", True, "and train.use_checkpoint_opt_param_scheduler=true "
            "contradict each other: take this config's schedule or keep the checkpoint's, not both")
    require(cfg.debug.step_sleep_seconds >= 0, "debug.step_sleep_seconds", cfg.debug.step_sleep_seconds,
            "must be >= 0")
    derived = set()
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    require(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size", m.hidden_size,
             f"must be a multiple of model.num_attention_heads ({m.num_attention_heads})")

    # Packed documents (before the world size: more processes cannot fix these).
    set_key, other = (("data.reset_attention_mask", "data.reset_position_ids") if d.reset_attention_mask
                      else ("data.reset_position_ids", "data.reset_attention_mask"))
    require(d.reset_position_ids == d.reset_attention_mask, set_key, True,
             f"needs {other}=true too: packed documents restart RoPE positions exactly where attention "
             "restarts; set both to true or both to false")
    require(not d.reset_attention_mask or p.cp == 1, "data.reset_attention_mask", True,
             f"packed documents are not supported with parallel.cp > 1 (parallel.cp={p.cp}); use "
             "parallel.tp or data parallelism, or set data.reset_attention_mask=false")

    # Parallel layout and batch arithmetic.
    model_parallel = p.tp * p.cp * p.pp
    key = next(k for k in ("parallel.tp", "parallel.cp", "parallel.pp") if _lookup(cfg, k) > 1) \
        if model_parallel > 1 else "parallel.tp"
    require(world_size % model_parallel == 0, key, _lookup(cfg, key),
             f"the world size ({world_size}) must be a multiple of parallel.tp * parallel.cp * "
             f"parallel.pp ({p.tp} * {p.cp} * {p.pp} = {model_parallel}); launch a multiple of "
             f"{model_parallel} processes or change the parallel sizes")
    dp = world_size // model_parallel
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
        derived.add("train.global_batch_size")
    require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
             t.global_batch_size,
             f"must be a multiple of train.micro_batch_size ({t.micro_batch_size}) x data-parallel size "
             f"(dp {dp} = world size {world_size} / tp*cp*pp {model_parallel}); or set it to null for "
             f"micro_batch_size x dp = {t.micro_batch_size * dp}")
    require(p.pp == 1 or m.num_layers % p.pp == 0, "parallel.pp", p.pp,
             f"model.num_layers ({m.num_layers}) must be a multiple of it")

    # Device and precision.
    if t.device == Device.auto:
        t.device = Device.cuda if torch.cuda.is_available() else Device.cpu
    require(t.device != Device.cuda or torch.cuda.is_available() or not check_environment, "train.device", t.device,
             "torch sees no CUDA device; use train.device=auto or cpu")
    if t.precision == Precision.auto:
        t.precision = Precision.bf16 if t.device == Device.cuda else Precision.fp32
    if t.device == Device.cpu:
        require(t.precision == Precision.fp32, "train.precision", t.precision,
                 "the cpu path trains in fp32; use train.precision=fp32 (or auto)")
        require(p.pp == 1, "parallel.pp", p.pp, "pipeline parallelism needs the cuda path (Megatron's "
                                                 "pipeline schedules); the cpu path supports tp, cp and dp")
        require(not p.sequence_parallel, "parallel.sequence_parallel", True, "needs the cuda path")
    require(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel", True, "needs parallel.tp > 1")
    _check_recompute(cfg)
    _check_overlap(cfg)

    # Schedule: a warmup that does not fit (a short run from the command line) is clamped.
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.iters
        derived.add("train.lr_decay_iters")
    require(t.lr_decay_iters >= 1, "train.lr_decay_iters", t.lr_decay_iters, "must be >= 1")
    if t.warmup_iters >= t.lr_decay_iters:
        clamped = t.lr_decay_iters // 10
        note(f"train.warmup_iters={t.warmup_iters} does not fit before train.lr_decay_iters="
             f"{t.lr_decay_iters}: warming up over {clamped} steps (10%) instead; set train.warmup_iters "
             "to choose")
        t.warmup_iters = clamped

    # The hybrid model: layout and every model/parallel check that needs no process group.
    shorthand = next((k for k in ("attention.dense_every", "attention.dense_layers")
                      if _lookup(cfg, k) is not None), "attention.layout")
    with _refusals_of(cfg, shorthand):
        a.layout = resolve_hybrid_layout(m.num_layers, layout=a.layout, dense_every=a.dense_every,
                                         dense_layers=a.dense_layers)
    with _refusals_of(cfg, "attention.s2"):
        validate_hybrid_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                              num_query_groups=m.num_query_groups, tensor_model_parallel_size=p.tp,
                              seq_length=t.seq_length, s2=a.s2, layout=a.layout,
                              context_parallel_size=p.cp)

    # Data.
    require(d.weights is None or len(d.weights) == len(d.prefixes), "data.weights", d.weights,
             f"needs one weight per data.prefixes entry ({len(d.prefixes)})")
    require(not d.valid_prefixes or d.prefixes, "data.valid_prefixes", d.valid_prefixes,
             "needs data.prefixes (the training data) too")
    for key, prefixes in (("data.prefixes", d.prefixes), ("data.valid_prefixes", d.valid_prefixes)):
        for i, prefix in enumerate(prefixes if check_environment else ()):
            with _refusals_of(cfg, f"{key}[{i}]"):
                check_indexed_dataset(prefix, f"{key}[{i}]", d.make_command)
    if cfg.checkpoint.init_from is not None:
        cfg.checkpoint.init_from = os.path.abspath(os.path.expanduser(cfg.checkpoint.init_from))
        require(os.path.isdir(cfg.checkpoint.init_from) or not check_environment, "checkpoint.init_from",
                cfg.checkpoint.init_from, "must be a local Hugging Face checkpoint folder (config.json, "
                "*.safetensors, tokenizer)")
    if d.tokenizer is None:
        d.tokenizer = cfg.checkpoint.init_from or "byte"
    require(d.tokenizer == "byte" or os.path.isdir(d.tokenizer) or not check_environment, "data.tokenizer",
            d.tokenizer, "must be 'byte' or a local Hugging Face tokenizer directory")
    if d.prefixes and check_environment:
        with _refusals_of(cfg, "data.tokenizer"):
            tokenizer = load_tokenizer(d.tokenizer)
            for prefix in list(d.prefixes) + list(d.valid_prefixes):
                check_dataset_tokenizer(prefix, tokenizer)
    if m.vocab_size is not None:
        require(m.vocab_size % p.tp == 0, "model.vocab_size", m.vocab_size,
                f"must be a multiple of parallel.tp ({p.tp}); or null to pad the tokenizer's vocabulary")
        vocab_size = _vocab_size(d.tokenizer) if check_environment else 0
        require(m.vocab_size >= vocab_size, "model.vocab_size", m.vocab_size,
                f"must be >= the tokenizer's vocabulary ({vocab_size}, data.tokenizer {d.tokenizer}); or null "
                "to pad the tokenizer's vocabulary")
    if d.loss_token_ids is not None and check_environment:
        vocab_size = _vocab_size(d.tokenizer)
        require(len(d.loss_token_ids) > 0 and all(0 <= i < vocab_size for i in d.loss_token_ids),
                 "data.loss_token_ids", d.loss_token_ids,
                 f"must be null or a non-empty list of token ids in [0, {vocab_size}) (data.tokenizer "
                 f"{d.tokenizer})")
    d.cache_dir = os.path.abspath(os.path.expanduser(d.cache_dir))
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    if cfg.checkpoint.dir is not None:
        cfg.checkpoint.dir = os.path.abspath(cfg.checkpoint.dir)
    require(cfg.logging.peak_tflops_per_device is None or cfg.logging.peak_tflops_per_device > 0,
             "logging.peak_tflops_per_device", cfg.logging.peak_tflops_per_device, "must be > 0 or null")
    cfg.derived = frozenset(derived)
    return cfg


def _check_recompute(cfg: PretrainConfig) -> None:
    """Megatron's rules for the recompute knobs (TransformerConfig and Megatron-LM's arguments),
    one refusal each, plus what the cpu path's recomputation (megatron_s2.recompute) cannot do."""
    m, cpu = cfg.model, cfg.train.device == Device.cpu
    granularity, method, n, modules = (m.recompute_granularity, m.recompute_method, m.recompute_num_layers,
                                       m.recompute_modules)
    per_stage = m.num_layers // cfg.parallel.pp
    if granularity is None:
        for key in ("model.recompute_method", "model.recompute_num_layers", "model.recompute_modules"):
            require(_lookup(cfg, key) is None, key, _lookup(cfg, key),
                    "has no effect without model.recompute_granularity (selective or full)")
        return
    if granularity == RecomputeGranularity.full:
        require(method is not None, "model.recompute_granularity", granularity,
                "needs model.recompute_method (uniform or block) and model.recompute_num_layers, as in Megatron")
        require(n is not None and 1 <= n <= per_stage, "model.recompute_num_layers", n,
                f"must be between 1 and the layers per pipeline stage ({per_stage}) with full recomputation")
        require(method != RecomputeMethod.uniform or per_stage % n == 0, "model.recompute_num_layers", n,
                f"must divide the layers per pipeline stage ({per_stage}) with model.recompute_method=uniform")
        require(not cpu or method != RecomputeMethod.uniform or n == 1, "model.recompute_num_layers", n,
                "must be 1 with model.recompute_method=uniform on the cpu path (it recomputes layer by "
                "layer); use model.recompute_method=block or the cuda path")
        require(modules is None, "model.recompute_modules", modules, "applies to selective recomputation only")
        return
    require(method is None, "model.recompute_method", method, "applies to full recomputation only (Megatron-LM "
                                                              "refuses it with selective)")
    require(n is None, "model.recompute_num_layers", n, "applies to full recomputation only (Megatron requires "
                                                        "None with selective)")
    if modules is not None:
        require(len(modules) > 0 and set(modules) <= set(RECOMPUTE_MODULES), "model.recompute_modules", modules,
                f"must be a non-empty list of {list(RECOMPUTE_MODULES)}")
        require(not cpu or modules == ["core_attn"], "model.recompute_modules", modules,
                "the cpu path recomputes core_attn only (mlp and layernorm: the cuda path, Megatron's own)")


def _check_overlap(cfg: PretrainConfig) -> None:
    p = cfg.parallel
    for key in ("parallel.overlap_grad_reduce", "parallel.overlap_param_gather"):
        require(not _lookup(cfg, key) or cfg.train.device == Device.cuda, key, True,
                "needs the cuda path (Megatron's DistributedDataParallel); the cpu path reduces gradients "
                "after the backward")
    require(not p.overlap_param_gather or p.overlap_grad_reduce, "parallel.overlap_param_gather", True,
            "needs parallel.overlap_grad_reduce=true too (as in Megatron-LM)")


def to_plain_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """JSON/YAML-friendly nested dict (enums as their values)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(cfg)
