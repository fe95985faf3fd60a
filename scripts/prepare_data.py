"""Tokenize text, JSONL or folders of files into a Megatron indexed dataset (.bin/.idx).

    python scripts/prepare_data.py --input corpus/ notes.txt data.jsonl --output-prefix data/my_corpus
    python scripts/prepare_data.py --input data.jsonl --tokenizer /path/to/hf_tokenizer_dir ...

Train on it with `python scripts/pretrain.py data.prefixes=[data/my_corpus]` (same tokenizer).
"""
import argparse

from megatron_s2.training.data import load_tokenizer, prepare_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files, .jsonl files (one document per line) or folders of them")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (built in) or a local Hugging Face tokenizer directory")
    parser.add_argument("--jsonl-key", default="text", help="the text field of JSONL records")
    parser.add_argument("--suffixes", nargs="*", default=None,
                        help="only files ending in these inside folders (e.g. .txt .md .jsonl)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    meta = prepare_dataset(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                           jsonl_key=args.jsonl_key, suffixes=tuple(args.suffixes) if args.suffixes else None,
                           progress=not args.quiet)
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']:,} documents, {meta['tokens']:,} tokens")


if __name__ == "__main__":
    main()
