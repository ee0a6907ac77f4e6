"""Helpers for the instruction-data tests: records in the three formats, a LLaMA-2-style chat
template written here, and readers of preprocess-sft output through megatron-core's IndexedDataset.
The Hugging Face tokenizer folder with that template (`hf_tokenizer_dir`) is a fixture in conftest.py."""

from __future__ import annotations

import json

B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# (record, system, [(prompt, answer), ...]) — the conversation each record must become
RECORDS = [
    ({"id": 7, "conversations": [{"from": "human", "value": "What is metformin used for?"},
                                 {"from": "gpt", "value": "Type 2 diabetes; it lowers glucose."},
                                 {"from": "human", "value": "And the usual dose?"},
                                 {"from": "agent", "value": "500 mg twice daily, with meals."}]},
     None, [("What is metformin used for?", "Type 2 diabetes; it lowers glucose."),
            ("And the usual dose?", "500 mg twice daily, with meals.")]),
    ({"conversations": [{"from": "system", "value": "You are a careful clinician."},
                        {"from": "human", "value": "  Fever for 3 days, what next? "},
                        {"from": "agent", "value": "Check vitals and cultures. "}]},
     "You are a careful clinician.", [("  Fever for 3 days, what next? ", "Check vitals and cultures. ")]),
    ({"instruction": "Summarise the note.", "input": "Pt 64M, CHF, SOB x2d, crackles.", "output": "CHF exacerbation."},
     None, [("Summarise the note.\n\nPt 64M, CHF, SOB x2d, crackles.", "CHF exacerbation.")]),
    ({"instruction": "Name a loop diuretic.", "input": "", "output": "Furosemide."},
     None, [("Name a loop diuretic.", "Furosemide.")]),
    ({"messages": [{"role": "system", "content": "Answer with one letter."},
                   {"role": "user", "content": "Which is a statin?\nA. atorvastatin\nB. apixaban"},
                   {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "Why?"},
                   {"role": "assistant", "content": "Atorvastatin inhibits HMG-CoA reductase \u2603 \u00e6."}]},
     "Answer with one letter.", [("Which is a statin?\nA. atorvastatin\nB. apixaban", "A"),
                                 ("Why?", "Atorvastatin inhibits HMG-CoA reductase \u2603 \u00e6.")]),
]

# A LLaMA-2-chat-style template (written for these tests), with and without {% generation %} blocks.
LLAMA2_JINJA = (
    "{%- if messages[0].role == 'system' %}{%- set sys = '<<SYS>>\\n' + messages[0].content + '\\n<</SYS>>\\n\\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}{%- if m.role == 'user' %}"
    "{{ bos_token + '[INST] ' + ((sys if loop.first else '') + m.content).strip() + ' [/INST]' }}"
    "{%- else %}{% generation %}{{ ' ' + m.content.strip() + ' ' + eos_token }}{% endgeneration %}{%- endif %}"
    "{%- endfor %}")
LLAMA2_JINJA_PLAIN = LLAMA2_JINJA.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_sft(prefix) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per sample, both read by megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}_loss_mask")
    assert len(tokens) == len(masks)
    return [(tokens[i].tolist(), masks[i].tolist()) for i in range(len(tokens))]


def trained_runs(ids, mask) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
