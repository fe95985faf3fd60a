"""The command line of ``scripts/pretrain.py``: Hydra's override syntax over ``recipes/``, and an
early end always shown as one line.

    main(argv) -> exit status: 0 trained (or the run was already complete), 2 refused config,
    130 interrupted (Ctrl-C)

The recipe is composed with Hydra's compose API instead of ``@hydra.main`` (which prints a
traceback for any exception of the task), so that every refusal, Hydra's own (unknown key, wrong
type, malformed override, unknown recipe) and ``validate``'s or ``pretrain``'s, prints one line on
stderr, ``error: <key>=<value>: <what is wrong and how to fix it>``, from rank 0 only ($RANK, as
torchrun sets it; the other ranks print nothing), with exit status 2 on every rank (torchrun's
SIGTERM to the slower ranks is held back while they refuse too: ``megatron_s2.sigterm_deferral``).
``HYDRA_FULL_ERROR=1`` raises instead, with the traceback. Options: ``--config-name NAME``
(``-cn``), ``--config-path DIR`` (``-cp``: recipes outside recipes/), ``--cfg job`` (print the
composed recipe), ``--help``, and ``--plan`` (print the run's memory and speed plan for the target
machine and exit 0, whether it fits or not; ``megatron_s2.training.plan``) with ``--world-size N``
(default: one model replica, tp x cp x pp), ``--gpu-memory GIB`` (memory per rank, default 80),
``--mfu F`` (default 0.4) and ``--vocab-size N`` (when data.tokenizer is not on this machine).
"""
from __future__ import annotations

import difflib
import glob
import itertools
import os
import re
import sys
import warnings

from omegaconf import OmegaConf

from .config import RECIPES_DIR, STABLE_KEYS, Device, compose_config, schema_keys, validate
from .errors import ConfigError, RunInterrupted
from .loop import pretrain

USAGE = """usage: python scripts/pretrain.py [--config-path DIR] [--config-name RECIPE] [key=value ...]
       torchrun --nproc_per_node=N scripts/pretrain.py [--config-name RECIPE] [key=value ...]

       python scripts/pretrain.py [--config-name RECIPE] [key=value ...] --plan [--world-size N]
              [--gpu-memory GIB] [--mfu F] [--vocab-size N]

Pretrain a hybrid S2/dense GPT model. Overrides use Hydra's syntax (key=value, key=[a,b]); every
output goes under run.dir, and rerunning a command resumes its run. --plan prints the run's memory
(per rank, against --gpu-memory, default 80 GiB) and speed plan for --world-size ranks and exits."""


def _first_sentence(text: str, width: int = 96) -> str:
    sentence = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text.strip() + " ", maxsplit=1)[0].strip()
    return sentence if len(sentence) <= width else sentence[:width - 3] + "..."


def recipes(recipes_dir: str = RECIPES_DIR) -> dict[str, str]:
    """Recipe name -> the first sentence of its leading comment."""
    found = {}
    for path in sorted(glob.glob(os.path.join(recipes_dir, "*.yaml"))):
        name = os.path.basename(path)[:-5]
        if name == "base":
            continue
        with open(path) as f:
            lines = f.read().splitlines()
        leading = [line.lstrip("# ").strip() for line in itertools.takewhile(lambda l: l.startswith("#"), lines)]
        found[name] = _first_sentence(" ".join(leading))
    return found


def help_text() -> str:
    keys = schema_keys()
    stable = [k for k in keys if any(k == s or (s.endswith("*") and k.startswith(s[:-1])) for s in STABLE_KEYS)]
    width = max(map(len, stable)) + 2
    lines = [USAGE, "", "recipes (--config-name, default tiny):"]
    lines += [f"  {name:<18}{about}" for name, about in recipes().items()]
    lines += ["", "stable keys:"] + [f"  {k:<{width}}{_first_sentence(keys[k])}" for k in stable]
    lines += ["", "Every key and its value in a recipe: --cfg job (all keys: megatron_s2/training/config.py).",
              "A refused config prints one line, 'error: <key>=<value>: <reason>', and exits with status 2;",
              "HYDRA_FULL_ERROR=1 shows the traceback instead."]
    return "\n".join(lines)


def _option(arg: str, args: list[str], name: str, short: str, needs: str) -> str | None:
    """The value of option ``name`` (or ``short``) when ``arg`` is it: ``--name V`` (V taken from
    ``args``) or ``--name=V``; None when ``arg`` is another argument."""
    if arg in (name, short):
        if not args:
            raise ConfigError(name, "", f"needs {needs}")
        return args.pop(0)
    if arg.startswith((name + "=", short + "=")):
        return arg.split("=", 1)[1]
    return None


def _parse(argv: list[str]) -> tuple[str, list[str], bool, bool]:
    """(recipe, overrides, --help, --cfg job)."""
    recipe, overrides, show_help, show_cfg = "tiny", [], False, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            show_help = True
        elif (name := _option(arg, args, "--config-name", "-cn", "a recipe name")) is not None:
            recipe = name
        elif arg in ("--cfg", "-c"):
            show_cfg = True
            if args and args[0] == "job":
                args.pop(0)
        elif arg.startswith("-"):
            raise ConfigError("option", arg, "unknown; the options are --config-name, --config-path, --cfg job, "
                                             "--plan and --help")
        else:
            overrides.append(arg)
    return recipe, overrides, show_help, show_cfg


PLAN_OPTIONS = {"--world-size": int, "--gpu-memory": float, "--mfu": float, "--vocab-size": int}


def _plan_options(argv: list[str]) -> tuple[list[str], dict | None]:
    """(argv without the plan's options, {option: value} or None without --plan)."""
    rest, options, plan = [], {}, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if arg == "--plan":
            plan = True
        elif name in PLAN_OPTIONS:
            if not eq:
                if not args:
                    raise ConfigError(name, "", "needs a value")
                value = args.pop(0)
            try:
                options[name] = PLAN_OPTIONS[name](value)
            except ValueError:
                raise ConfigError(name, value, f"must be a number ({PLAN_OPTIONS[name].__name__})") from None
            if options[name] <= 0 or (name == "--mfu" and options[name] > 1):
                raise ConfigError(name, value, "must be > 0" + (" and <= 1" if name == "--mfu" else ""))
        else:
            rest.append(arg)
    if options and not plan:
        raise ConfigError(next(iter(options)), options[next(iter(options))], "is an option of --plan")
    return rest, options if plan else None


def _print_plan(composed, options: dict) -> None:
    from .plan import DEFAULT_PEAK_TFLOPS, describe, make_plan

    p = composed.parallel
    world_size = options.get("--world-size", p.tp * p.cp * p.pp)
    plan, change = make_plan(composed, world_size, options.get("--gpu-memory", 80.0), options.get("--vocab-size"))
    peak = plan.cfg.logging.peak_tflops_per_device or DEFAULT_PEAK_TFLOPS
    print(describe(plan, change, options.get("--mfu", 0.4), peak))


def _override_value(overrides: list[str], key: str) -> str:
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name == key:
            return value
    return "?"


def _config_path(argv: list[str]) -> tuple[str, list[str]]:
    """(--config-path DIR or recipes/, the other arguments): Hydra's flag for recipes that live
    outside recipes/ (a relative DIR is taken from the current directory)."""
    args, rest, config_path = list(argv), [], RECIPES_DIR
    while args:
        arg = args.pop(0)
        if (path := _option(arg, args, "--config-path", "-cp", "a directory")) is not None:
            config_path = path
        else:
            rest.append(arg)
    if not os.path.isdir(config_path):
        raise ConfigError("--config-path", config_path, "is not a directory")
    return os.path.abspath(config_path), rest


def _composition_error(error: Exception, recipe: str, overrides: list[str],
                       recipes_dir: str = RECIPES_DIR) -> ConfigError | None:
    """Hydra's composition errors as ConfigErrors on the key (the cause carries full_key); None
    for an error of another kind."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException):
        where = "" if recipes_dir == RECIPES_DIR else f" in {recipes_dir}"
        return ConfigError("--config-name", recipe, f"no such recipe{where}; recipes: "
                           + ", ".join(recipes(recipes_dir)))
    if isinstance(error, OverrideParseException):
        bad = re.search(r"Error parsing override '([^']*)'", str(error))
        text = bad.group(1) if bad else str(error).splitlines()[0]
        name, _, value = text.partition("=")
        return ConfigError(name, value, "is not an override of the form key=value (Hydra's syntax, "
                                        "e.g. train.iters=50 or data.prefixes=[a,b])")
    cause = error
    while cause is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    key, message = cause.full_key, str(getattr(cause, "msg", cause)).splitlines()[0]
    value = _override_value(overrides, key)
    if "not in" in message or "Missing key" in message:
        return _no_such_key(key, value)
    return ConfigError(key, value, message)


def _no_such_key(key: str, value) -> ConfigError:
    close = difflib.get_close_matches(key, list(schema_keys()), n=1, cutoff=0.6)
    return ConfigError(key, value, "no such key" + (f"; did you mean {close[0]}?" if close
                                                    else "; python scripts/pretrain.py --help lists the keys"))


def _check_keys(composed) -> None:
    """Keys added with Hydra's ``+key=value`` pass composition; the schema does not know them."""
    def leaves(node, prefix=""):
        for name, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value
    known = schema_keys()
    for key, value in leaves(OmegaConf.to_container(composed, resolve=False)):
        if key not in known:
            raise _no_such_key(key, value)


def _quiet_notices(cpu: bool) -> None:
    """Hide (by message) a third-party warning a user cannot act on: on the CPU path Megatron's
    advice to set CUDA_DEVICE_MAX_CONNECTIONS (given to every tensor-parallel run). (torch's
    notices inside Megatron's dist_checkpointing: ``checkpoint``.)"""
    if cpu:
        warnings.filterwarnings("ignore", message="When using (sequence parallelism|async grad allreduce) it is "
                                                  "recommended to set the environment variable CUDA_DEVICE_MAX")


def _say_error(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse, compose, validate, train; returns the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        recipes_dir, argv = _config_path(argv)
        argv, plan_options = _plan_options(argv)
        recipe, overrides, show_help, show_cfg = _parse(argv)
        if show_help:
            print(help_text())
            return 0
        try:
            composed = compose_config(overrides, recipe=recipe, recipes_dir=recipes_dir)
        except Exception as e:      # Hydra's own errors: map the known kinds, raise anything else
            refusal = _composition_error(e, recipe, overrides, recipes_dir)
            if refusal is None or debug:
                raise
            raise refusal from e
        _check_keys(composed)
        if show_cfg:
            print(OmegaConf.to_yaml(composed), end="")
            return 0
        if plan_options is not None:
            _print_plan(composed, plan_options)
            return 0
        cfg = validate(composed)
        _quiet_notices(cpu=cfg.train.device == Device.cpu)
        pretrain(cfg)
        return 0
    except ConfigError as e:
        if debug:
            raise
        _say_error(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        _say_error(str(e) if isinstance(e, RunInterrupted) else "interrupted")
        return 130

