"""The command line of ``scripts/convert_hf.py``.

    recipe HF_DIR --layout DSDS --out DIR/NAME.yaml [--base RECIPE] [key=value ...]
        the recipe (the key=value overrides, Hydra's syntax, applied last) that starts a run from a Hugging Face checkpoint folder (``recipe.write_recipe``)
    export RUN_DIR OUT_DIR [--dtype float32|bfloat16|float16]
        a run's newest checkpoint as a Hugging Face folder (``export.export_run``)

``main(argv)`` returns the exit status: 0 done, 2 refused (one line on stderr, ``error: ...``,
nothing written; argparse's usage errors also exit 2).
"""
from __future__ import annotations

import argparse
import sys

from .config import CheckpointError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/convert_hf.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recipe = commands.add_parser("recipe", help="write the recipe that starts a run from a Hugging Face folder")
    recipe.add_argument("hf_dir", metavar="HF_DIR", help="config.json, *.safetensors and a tokenizer")
    recipe.add_argument("--layout", required=True, help="one S/D character per layer, e.g. DSDS")
    recipe.add_argument("--out", required=True, help="DIR/NAME.yaml")
    recipe.add_argument("--base", default="tiny", help="the recipe (recipes/) whose other keys it takes")
    export = commands.add_parser("export", help="write a run's newest checkpoint as a Hugging Face folder")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR", help="a new folder")
    export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if overrides and (args.command != "recipe" or any(o.startswith("-") for o in overrides)):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    from megatron_s2.training.errors import ConfigError
    try:
        if args.command == "recipe":
            from megatron_s2.training.cli import _composition_error
            from .recipe import write_recipe
            try:
                path = write_recipe(args.hf_dir, args.layout, args.out, args.base, overrides)
            except (ConfigError, CheckpointError):
                raise
            except Exception as e:          # Hydra's composition errors: one line on the key
                refusal = _composition_error(e, args.base, overrides)
                if refusal is None:
                    raise
                raise refusal from e
            print(f"wrote {path}")
        else:
            from megatron_s2.training.cli import _quiet_notices
            from .export import export_run
            _quiet_notices(cpu=True)         # torch's deprecation notices on every dist_checkpointing load
            print(f"wrote {export_run(args.run_dir, args.out_dir, args.dtype)}")
        return 0
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
