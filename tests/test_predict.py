"""`python -m jaxedit.predict` against transformers: the printed top next tokens and the logit-lens ranks."""

import re

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxedit.models.config import config_from_hf
from jaxedit.models.model import Model, export_hf
from jaxedit.models.params import init_params
from jaxedit.predict import main
from jaxedit.tokenizer import Tokenizer

PROMPTS = ["Fact: Michael Jordan plays the sport of", "Hello", "The Eiffel Tower is located in the city of"]
TOP = 4


@pytest.fixture(scope="module")
def peaked_dir(smollm2_dir, tmp_path_factory):
    """A 2-layer random Llama (SmolLM2's tokenizer, untied unembedding scaled ×30): well-separated logits, so
    the top tokens and the ranks are the same in float32 on both sides, and layers disagree in the logit lens."""
    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=49152,
                              hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    params = init_params(cfg, jax.random.key(1))
    params["unembed"]["w"] = params["unembed"]["w"] * 30.0
    return export_hf(Model(cfg, params, None, source=smollm2_dir), tmp_path_factory.mktemp("predict") / "peaked")


def _hf_reference(model_dir):
    """Per prompt (alone, unpadded): top-TOP ids and probabilities, and the rank of the argmax token when each
    layer's input residual (HF hidden_states[l], final norm, lm_head) and the output are unembedded."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer(model_dir)
    tops, ranks, gaps = [], [], []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            logits = out.logits[0, -1].double()
            probs = torch.softmax(logits, -1)
            top = torch.argsort(probs, descending=True)[:TOP]
            answer = int(top[0])
            layers = [model.lm_head(model.model.norm(h[0, -1])).double() for h in out.hidden_states[:-1]]
        tops.append([(int(t), float(probs[t])) for t in top])
        ranks.append([int((lens > lens[answer]).sum()) for lens in layers + [logits]])
        gaps.append(float((logits[top[:-1]] - logits[top[1:]]).min()))
    return tokenizer, tops, np.array(ranks).T, min(gaps)  # ranks [L+1, B]


def test_top_tokens_and_logit_lens_equal_transformers(peaked_dir, capsys):
    tokenizer, tops, ranks, gap = _hf_reference(peaked_dir)
    assert gap > 1e-3  # the top tokens are well separated: their order is not a float32 accident
    argv = ["--model", str(peaked_dir), "--top", str(TOP)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    out = capsys.readouterr().out
    shown = re.findall(r"\n  next: (.*)", out)
    assert len(shown) == len(PROMPTS)
    for line, top in zip(shown, tops):
        want = ", ".join(f"{tokenizer.decode([t])!r} {p:.3f}" for t, p in top)
        assert line == want
    table = out.split("logit lens")[1].splitlines()[2:]
    rows = [line.split() for line in table if line.split() and (line.split()[0].isdigit() or line.split()[0] == "out")]
    got = np.array([[int(r) for r in row[1:]] for row in rows])
    assert [row[0] for row in rows] == [str(i) for i in range(len(ranks) - 1)] + ["out"]
    np.testing.assert_array_equal(got, ranks)
    assert (ranks[-1] == 0).all() and ranks[:-1].any()  # the output ranks its own argmax first; layers differ
