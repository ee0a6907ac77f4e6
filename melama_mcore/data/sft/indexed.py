"""The on-disk format of instruction data, written by `melama preprocess-sft`.

For `--output-prefix data/medqa`, the dataset prefix (what a blend lists) is `data/medqa_sft_document`:
- `data/medqa_sft_document.bin/.idx`: token ids, one document per conversation (uint16 or int32, as
  `melama preprocess`); readable by megatron-core's IndexedDataset like any pre-training pair;
- `data/medqa_sft_document_loss_mask.bin/.idx`: uint8, one per token, 1 where the token is trained
  (answers and the EOS after each), with the same document boundaries;
- `data/medqa_sft_document.sft.json`: the marker: format, template ({"name", "jinja", "system_prompt"}:
  what travels with the model, `blend_chat_template`), tokenizer, sequence length and counts. A prefix
  with a marker is instruction data (`is_sft_prefix`); the trainer needs no switch.

Publishing order (each step atomic): old marker and old token index removed, mask pair, marker, token
pair. A run killed at any point leaves no token index beside a missing or stale marker, so no
instruction data can be mistaken for pre-training data or paired with another run's masks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from melama_mcore.data.indexed_writer import INCOMPLETE, IndexedWriter, write_json_atomically
from melama_mcore.data.sft.templates import BUILT_IN_JINJA, jinja_sha256
from melama_mcore.data.verify import verify_indexed_dataset
from melama_mcore.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT, VERSION = "melama-sft", 1
MASK_SUFFIX = "_loss_mask"
MARKER_SUFFIX = ".sft.json"


def sft_prefix(output_prefix: str) -> str:
    """The dataset prefix `melama preprocess-sft --output-prefix P` writes (Megatron-style naming)."""
    return f"{output_prefix}_sft_document"


def mask_prefix(prefix: str) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def marker_path(prefix: str) -> str:
    return f"{prefix}{MARKER_SUFFIX}"


def _strip(prefix) -> str:
    prefix = os.fspath(prefix)
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def output_files(prefix: str) -> list[str]:
    """Every file preprocess-sft publishes for a dataset prefix."""
    return [prefix + ".bin", prefix + ".idx", mask_prefix(prefix) + ".bin", mask_prefix(prefix) + ".idx",
            marker_path(prefix)]


def is_sft_prefix(prefix) -> bool:
    """Whether a dataset prefix holds instruction data (written by `melama preprocess-sft`)."""
    return os.path.isfile(marker_path(_strip(prefix)))


def is_sft_blend(blend) -> bool:
    """True when every prefix of the blend is instruction data, False when none is; a mix is refused."""
    prefixes = [p for source in blend.sources for p in source.train + (source.valid or [])]
    kinds = {p: is_sft_prefix(p) for p in prefixes}
    if len(set(kinds.values())) > 1:
        sft = sorted(p for p, k in kinds.items() if k)
        other = sorted(p for p, k in kinds.items() if not k)
        raise ConfigError(f"the blend mixes instruction data (from preprocess-sft: {', '.join(sft)}) with "
                          f"pre-training data ({', '.join(other)}); train them in separate runs")
    return bool(prefixes) and all(kinds.values())


class SFTWriter:
    """Appends conversations (token ids + loss mask) to the two pairs; `commit` publishes them."""

    def __init__(self, prefix: str, token_dtype):
        self.prefix = prefix
        self._publishing = False
        self.tokens = IndexedWriter(prefix, token_dtype)
        self.masks = None
        try:
            self.masks = IndexedWriter(mask_prefix(prefix), np.uint8)
        except BaseException:
            self.tokens.abort()
            raise

    def add(self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.add_documents(tokens, lengths)
        self.masks.add_documents(masks, lengths)

    def commit(self, metadata: dict) -> None:
        self._publishing = True
        for stale in (marker_path(self.prefix), self.prefix + ".idx"):
            if os.path.exists(stale):
                os.remove(stale)
        self.masks.commit()
        write_json_atomically(marker_path(self.prefix), metadata)
        self.tokens.commit()

    def abort(self) -> None:
        """Remove this run's files, including what a failed commit had already published."""
        self.tokens.abort()
        if self.masks is not None:
            self.masks.abort()
        leftovers = [marker_path(self.prefix) + INCOMPLETE]
        if self._publishing:
            masks = mask_prefix(self.prefix)
            leftovers += [marker_path(self.prefix), masks + ".idx", masks + ".bin"]
        for path in leftovers:
            if os.path.exists(path):
                os.remove(path)


def read_marker(prefix) -> dict:
    path = marker_path(_strip(prefix))
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not written by melama preprocess-sft)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a melama-sft marker")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r}, this melama reads {VERSION}; "
                        "run preprocess-sft again")
    return meta


def marker_chat_template(meta: dict) -> dict | None:
    """The chat template a marker records ({"name", "jinja", "system_prompt"}). Markers written before
    the template's text was recorded ({"name"[, "sha256"]} and a "system_prompt" flag): a built-in
    template without a system prompt is known by its name; any other is unknown (None)."""
    template = meta.get("template") or {}
    if isinstance(template.get("jinja"), str):
        return {"name": template.get("name"), "jinja": template["jinja"],
                "system_prompt": template.get("system_prompt")}
    if template.get("name") in BUILT_IN_JINJA and not meta.get("system_prompt"):
        return {"name": template["name"], "jinja": BUILT_IN_JINJA[template["name"]], "system_prompt": None}
    return None


def _described(template: dict) -> str:
    system = ", with a system prompt" if template["system_prompt"] is not None else ""
    return f"{template['name']}{system} (sha256 {jinja_sha256(template['jinja'])[:12]})"


def blend_chat_template(blend) -> dict | None:
    """The chat template a blend's instruction data was rendered with, which the trainer keeps in the
    run's config (data.chat_template) so that every checkpoint, export and evaluation carries it;
    None for pre-training data, and (with a warning) for data whose markers do not record the
    template's text. A blend of prefixes rendered with different templates is refused: a model tuned
    in two formats has no one format its exports could carry and evaluation could prompt in."""
    prefixes = list(dict.fromkeys(_strip(p) for source in blend.sources for p in source.train + (source.valid or [])))
    if not prefixes or not is_sft_prefix(prefixes[0]):  # a blend is all instruction data or none (is_sft_blend)
        return None
    found, unknown = {}, []  # jinja text -> (template, its prefixes); prefixes without a known template
    for prefix in prefixes:
        template = marker_chat_template(read_marker(prefix))
        if template is None:
            unknown.append(prefix)
        else:
            found.setdefault(template["jinja"], (template, []))[1].append(prefix)
    if len(found) > 1:
        (first, first_prefixes), (second, second_prefixes) = list(found.values())[:2]
        raise DataError(f"the blend's instruction data was rendered with different chat templates: "
                        f"{', '.join(first_prefixes)} with {_described(first)}, {', '.join(second_prefixes)} with "
                        f"{_described(second)}. A model is tuned in one format, the one its exports carry and "
                        "evaluation prompts in: run preprocess-sft again on one side with the other's "
                        "--chat-template (and --system-prompt)")
    if unknown:
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("%s: the marker does not record the chat template's text (written by an older preprocess-sft); "
                        "this run's checkpoints and exports carry no chat template (run preprocess-sft again to have "
                        "it travel, or name it at evaluation: melama eval --chat-template)", ", ".join(unknown))
        return None
    return next(iter(found.values()))[0] if found else None


def verify_sft_prefix(prefix, vocab_size: int | None = None) -> dict:
    """Check both pairs and the marker agree; returns the marker. DataError naming the mismatch."""
    prefix = _strip(prefix)
    meta = read_marker(prefix)
    tokens = verify_indexed_dataset(prefix, vocab_size)
    masks = verify_indexed_dataset(mask_prefix(prefix))
    if np.dtype(masks.dtype) != np.uint8:
        raise DataError(f"{mask_prefix(prefix)}.idx: loss masks must be uint8, found {masks.dtype}")
    counts = meta.get("counts", {})
    if (tokens.sequences, tokens.tokens) != (counts.get("samples"), counts.get("tokens")) or \
            (masks.sequences, masks.tokens) != (tokens.sequences, tokens.tokens):
        raise DataError(f"{prefix}: the token pair ({tokens.sequences:,} samples, {tokens.tokens:,} tokens), "
                        f"the loss-mask pair ({masks.sequences:,}, {masks.tokens:,}) and {marker_path(prefix)} "
                        f"({counts.get('samples')}, {counts.get('tokens')}) disagree: files of different runs")
    return meta


class SFTIndexedData:
    """A verified instruction dataset: per conversation its token ids and loss mask (megatron-core's
    IndexedDataset reads both pairs)."""

    def __init__(self, prefix, vocab_size: int | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = _strip(prefix)
        self.meta = verify_sft_prefix(self.prefix, vocab_size)
        if self.meta["counts"]["samples"] == 0:  # checked before megatron's reader, which cannot map an empty file
            raise DataError(f"{self.prefix}: an empty instruction dataset (0 samples: preprocess-sft found no usable "
                            "conversation in its input); remove it from the blend")
        self.token_data = IndexedDataset(self.prefix)
        self.mask_data = IndexedDataset(mask_prefix(self.prefix))
        self.lengths = np.asarray(self.token_data.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self.mask_data.sequence_lengths):
            raise DataError(f"{self.prefix}: token and loss-mask pairs have different sample boundaries")
        if len(self.lengths) and self.lengths.min() < 2:  # preprocess-sft writes BOS .. answer EOS at least
            raise DataError(f"{self.prefix}: a sample of {int(self.lengths.min())} token: not preprocess-sft output")
        # What identifies these files in cached packing plans.
        self.identity = {"counts": self.meta["counts"], "template": self.meta.get("template"),
                         "tokenizer": self.meta.get("tokenizer")}

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.token_data[i], self.mask_data[i]
