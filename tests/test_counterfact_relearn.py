"""The relearning attack on CounterFact trains toward the TRUE answers (the paper's script used target_false, §10.1)."""

import jax
import numpy as np
import pytest

import jaxedit
from jaxedit import Model
from jaxedit.attacks.relearn import RelearnSettings, relearn
from jaxedit.data.counterfact import load_counterfact
from jaxedit.models.config import config_from_hf
from jaxedit.models.model import export_hf
from jaxedit.models.params import init_params
from jaxedit.readout import token_log_probs
from jaxedit.tasks.counterfact import CounterFactTask


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer and an untied unembedding large enough that training
    the linear layers moves the answer's probability (the embedding and unembedding are not trained)."""
    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=49152,
                              hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    params = init_params(cfg, jax.random.key(2))
    params["unembed"]["w"] = params["unembed"]["w"] * 10.0
    model = jaxedit.load(export_hf(Model(cfg, params, None, source=smollm2_dir), tmp_path_factory.mktemp("cf") / "tiny"))
    facts = load_counterfact()
    first = lambda text: model.tokenizer.encode(text, add_special_tokens=False)[0]  # noqa: E731  (by hand)
    usable = [f for f in facts if first(f.target_true) != first(f.target_false)]
    return model, usable[:4], usable[4:6], first


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_relearning_raises_the_true_answer_on_the_facts_it_trains(setup, lora_rank):
    model, trained, maintain, first = setup
    sets = CounterFactTask(trained + maintain).relearn_sets(model.tokenizer, trained, maintain)
    prompts, targets = sets["forget"]
    assert prompts == [f.prompt for f in trained]
    assert list(targets) == [first(f.target_true) for f in trained]  # the true answers' first tokens
    assert list(sets["maintain"][1]) == [first(f.target_true) for f in maintain]
    ids = np.array([[first(f.target_true), first(f.target_false)] for f in trained])

    def measure(params):
        logp = token_log_probs(model, prompts, ids, params=params)[0]  # [N, (true, false)]
        return {"true": float(logp[:, 0].mean()), "margin": float((logp[:, 0] - logp[:, 1]).mean())}

    settings = RelearnSettings(lora_rank=lora_rank, lora_alpha=8.0, lr=1e-2, steps=6, eval_at=(0, 6), batch_size=4,
                               accumulate=1)
    out = relearn(model, model.params, sets, measure, settings)
    assert out["relearn/6/true"] > out["relearn/0/true"] + 1.0  # log P(true) up by more than 1 nat
    assert out["relearn/6/margin"] > out["relearn/0/margin"] + 1.0  # and toward true, away from the false answer
