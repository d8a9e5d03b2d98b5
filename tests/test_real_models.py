"""The real offline models: jaxedit's logits against transformers' own GGUF loading."""

import numpy as np
import pytest
import torch

import jaxedit
from conftest import hf_gguf_reference
from jaxedit.readout import logits_after

PROMPTS = [f"Fact: {name} plays the sport of" for name in (
    "Michael Jordan", "Tom Brady", "Babe Ruth", "Tiger Woods", "LeBron James", "Derek Jeter", "Peyton Manning",
    "Kobe Bryant", "Aaron Rodgers", "Shohei Ohtani", "Stephen Curry", "Serena Williams")] + [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "In 1969, Neil Armstrong became the first person to",
    "Photosynthesis converts sunlight into",
    "The chemical symbol for gold is",
    "A haiku about autumn:",
    "Translate to French: good morning ->",
]


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m"])
def pair(request):
    return jaxedit.load(request.param), *hf_gguf_reference(request.param)


def test_last_token_logits_match_transformers_gguf(pair):
    model, hf, hf_tokenizer = pair
    assert len(PROMPTS) >= 20
    ours = logits_after(model, PROMPTS)  # one right-padded batch
    for prompt, row in zip(PROMPTS, ours):
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids  # each prompt alone, unpadded
        assert model.tokenizer.encode(prompt) == ids[0].tolist()
        with torch.no_grad():
            ref = hf(input_ids=ids).logits[0, -1].numpy()
        assert np.abs(row - ref).max() <= 1e-3, prompt
        assert row.argmax() == ref.argmax(), prompt


def test_gemma_knows_michael_jordan_plays_basketball():
    model = jaxedit.load("gemma-3-270m")
    logits = logits_after(model, ["Fact: Michael Jordan plays the sport of"])
    assert model.tokenizer.decode([int(logits[0].argmax())]) == " basketball"
