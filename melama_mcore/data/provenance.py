"""What a dataset records about how it was made, and the check that a run reads it with the same
tokenizer.

`melama preprocess` writes `{prefix}.meta.json` beside each `.bin`/`.idx` pair and `melama
preprocess-sft` its marker `{prefix}.sft.json` (data/sft/indexed.py); both record the tokenizer
(Tokenizer.record: path, vocabulary size, vocabulary sha256, BOS and EOS ids). Token ids mean
nothing under another vocabulary, and a smaller or equal vocabulary lets every id through the range
checks, so a run compares its tokenizer with the data's by content (the vocabulary's digest, the
one checkpoints record), never by path: a copy of the same tokenizer elsewhere is the same tokenizer.
Data without a record (written by Megatron-LM's tools or an earlier melama) cannot be checked.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from melama_mcore.data.indexed_writer import META_SUFFIX
from melama_mcore.data.sft.indexed import is_sft_prefix, read_marker
from melama_mcore.data.tokenizer import Tokenizer, load_tokenizer, vocabulary_difference
from melama_mcore.errors import DataError

log = logging.getLogger(__name__)
FORMAT, VERSION = "melama-pretraining", 1


def meta_path(prefix) -> str:
    return os.fspath(prefix) + META_SUFFIX


def pretraining_meta(tok: Tokenizer, *, json_key: str, prepend_bos: bool, append_eod: bool, inputs: list[str],
                     documents: int, tokens: int) -> dict:
    """What `melama preprocess` records beside one output pair."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": tok.record(), "json_key": json_key,
            "prepend_bos": prepend_bos, "append_eod": append_eod, "inputs": [str(f) for f in inputs],
            "counts": {"documents": documents, "tokens": tokens}}


def recorded_tokenizer(prefix) -> dict | None:
    """The tokenizer a dataset prefix records (Tokenizer.record's fields; older records lack
    vocab_sha256), or None when it records none. DataError for a record that cannot be read."""
    if is_sft_prefix(prefix):
        return read_marker(prefix).get("tokenizer")
    path = Path(meta_path(prefix))
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}); run melama preprocess again, or delete it "
                        "(the tokenizer check is then skipped)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a melama preprocess record; run melama preprocess again, or delete it")
    return meta.get("tokenizer")


def _listed(prefixes: list[str]) -> str:
    shown = ", ".join(prefixes[:3])
    return shown + (f" and {len(prefixes) - 3} more" if len(prefixes) > 3 else "")


def check_data_tokenizer(blend, tokenizer, *, allow_mismatch: bool = False, tokenizer_key: str = "data.tokenizer",
                         override: str = "data.allow_tokenizer_mismatch=true") -> None:
    """Refuse a blend whose data records another vocabulary than `tokenizer` (a Tokenizer or its path):
    one line naming both tokenizers and what to change (`tokenizer_key`, `override`). With
    `allow_mismatch` the mismatch is a warning (rank 0) instead."""
    prefixes = [p for source in blend.sources for p in source.train + (source.valid or [])]
    check_prefixes_tokenizer(prefixes, tokenizer, allow_mismatch=allow_mismatch, tokenizer_key=tokenizer_key,
                             override=override)


def check_prefixes_tokenizer(prefixes, tokenizer, *, allow_mismatch: bool = False, tokenizer_key: str,
                             override: str | None) -> None:
    """check_data_tokenizer for a list of dataset prefixes; `override` None: there is none to offer."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    by_tokenizer = {}  # (path, size) the data records -> its prefixes
    for prefix in dict.fromkeys(os.fspath(p) for p in prefixes):
        recorded = recorded_tokenizer(prefix)
        if recorded is not None and vocabulary_difference(recorded, tok.record()) is not None:
            by_tokenizer.setdefault((recorded.get("path"), recorded.get("vocab_size")), []).append(prefix)
    if not by_tokenizer:
        return
    made_with = "; ".join(f"{_listed(found)} {'was' if len(found) == 1 else 'were'} tokenised with {path} "
                          f"({size:,} tokens)" for (path, size), found in by_tokenizer.items())
    same_size = all(size == tok.vocab_size for _, size in by_tokenizer)
    mine = f"{tok.path} ({tok.vocab_size:,} tokens{', another vocabulary' if same_size else ''})"
    if allow_mismatch:
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("%s, not with %s %s: training on it anyway (%s)", made_with, tokenizer_key, mine, override)
        return
    anyway = f"; if you mean it, {override} trains anyway" if override else ""
    raise DataError(f"{made_with}, but {tokenizer_key} is {mine}: token ids mean other text under another "
                    f"vocabulary. Use the tokenizer the data was made with, or preprocess the data again with "
                    f"{tok.path}{anyway}")
