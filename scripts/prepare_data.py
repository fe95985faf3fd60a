"""Tokenize text, JSONL or folders of files into a Megatron indexed dataset (.bin/.idx).

    python scripts/prepare_data.py --input corpus/ notes.txt data.jsonl --output-prefix data/my_corpus
    python scripts/prepare_data.py --input data.jsonl --tokenizer /path/to/hf_tokenizer_dir ...

Train on it with `python scripts/pretrain.py data.prefixes=[data/my_corpus]` (same tokenizer).
At the end it reports documents and tokens, and warns when the train or validation split of
--split would hold no sample of --seq-length tokens (the trainer refuses such a split).
"""
import argparse
import sys

from megatron_s2.accelerators import quiet_fallback_notices

quiet_fallback_notices()        # before Megatron is imported: its fallbacks are no concern here

from megatron_s2.training.config import DataConfig, TrainConfig  # noqa: E402
from megatron_s2.training.data import (SPLIT_NAMES, TEXT_DOCUMENTS_RULE, load_tokenizer,  # noqa: E402
                                       prepare_dataset, split_sizes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__ + "\nDocuments: " + TEXT_DOCUMENTS_RULE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files, .jsonl files (one document per record) or folders of them")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (built in) or a local Hugging Face tokenizer directory")
    parser.add_argument("--jsonl-key", default="text", help="the text field of JSONL records")
    parser.add_argument("--suffixes", nargs="*", default=None,
                        help="only files ending in these inside folders (e.g. .txt .md .jsonl)")
    parser.add_argument("--text-documents", choices=("paragraph", "file"), default="paragraph",
                        help="the document unit of plain text (default: paragraph)")
    parser.add_argument("--max-document-tokens", type=int, default=2048,
                        help="the token budget: longer paragraphs are cut into pieces of this many tokens (default 2048)")
    parser.add_argument("--split", default=DataConfig.split,
                        help=f"the trainer's data.split to check the corpus against (default {DataConfig.split})")
    parser.add_argument("--seq-length", type=int, default=TrainConfig.seq_length,
                        help=f"the trainer's train.seq_length (default {TrainConfig.seq_length})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except ValueError as e:
        parser.exit(2, f"error: --tokenizer={args.tokenizer}: {e}\n")
    try:
        meta = prepare_dataset(args.input, args.output_prefix, tokenizer,
                               jsonl_key=args.jsonl_key, suffixes=tuple(args.suffixes) if args.suffixes else None,
                               text_documents=args.text_documents, max_document_tokens=args.max_document_tokens,
                               progress=not args.quiet)
    except ValueError as e:
        parser.exit(2, f"error: --input={' '.join(args.input)}: {e}\n")
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']:,} documents, {meta['tokens']:,} tokens "
          f"(from {meta['files']:,} files)")
    need = args.seq_length + 1
    sizes = split_sizes(args.output_prefix, args.split)
    for name, size in zip(SPLIT_NAMES[:2], sizes[:2]):
        if size is not None and (size[0] < 1 or size[1] < need):
            print(f"warning: with data.split={args.split} the {name} split gets {size[0]:,} documents and "
                  f"{size[1]:,} tokens, fewer than one sample of train.seq_length={args.seq_length} needs "
                  f"({need:,} tokens): add text, or train with another data.split"
                  + (", train.eval_interval=0" if name == "valid" else "") + " or a smaller train.seq_length",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
