"""The tokenizer of an export: the run's Hugging Face tokenizer, or our byte tokenizer as a Hugging
Face tokenizer (built with the ``tokenizers`` library, nothing downloaded).

``byte_tokenizer()`` gives ids equal to ``megatron_s2.training.data.ByteTokenizer``'s: UTF-8 byte b
is token b, ``<|endoftext|>`` is 256 (end of document: eos and pad). It is GPT-2's byte-level
scheme without merges: the byte-level pre-tokenizer spells each byte as one printable character
(``bytes_to_unicode``) and the vocabulary maps that character to the byte's value.
"""
from __future__ import annotations

EOD = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte (the one the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A PreTrainedTokenizerFast with ByteTokenizer's ids (left padding, for batched generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    vocab[EOD] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD, pad_token=EOD, padding_side="left")


def save_tokenizer(spec: str, out_dir: str):
    """Write data.tokenizer ``spec`` ('byte' or a Hugging Face tokenizer folder) into ``out_dir``;
    returns the tokenizer."""
    if spec == "byte":
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(spec)      # a local folder: nothing is downloaded
    tokenizer.save_pretrained(out_dir)
    return tokenizer
