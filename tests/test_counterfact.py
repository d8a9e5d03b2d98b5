"""CounterFact: loaders (JSON flat/nested, CSV, Parquet, MCQ join), splits (§1.3), prompt formats, metrics."""

import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import jaxedit
from jaxedit import Model
from jaxedit.data import counterfact as cf
from jaxedit.data.counterfact import MCQ, CounterFactFact
from jaxedit.errors import JaxeditError
from jaxedit.eval import counterfact_eval as ce
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import param_shapes
from jaxedit.tokenizer import Tokenizer as JaxeditTokenizer

HEAD = "Help me answer the following multiple choice question:\n\n"
TAIL = "\n\nPlease respond with the letter of the correct answer, A, B, C, or D. Answer:"

# Two facts in the HF-export ("flat") layout of method.md §1.3: subject and targets with a leading space.
FLAT = [
    {"case_id": 0, "prompt_id": 70, "prompt": "The mother tongue of Danielle Darrieux is",
     "subject": " Danielle Darrieux", "target_true": " French", "target_false": " English",
     "paraphrase_prompts": ["Shayna walked home. Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Jacques Chirac is a native speaker of"]},
    {"case_id": 7, "prompt_id": 71, "prompt": "Apple A5 was created by", "subject": " Apple A5",
     "target_true": " Apple", "target_false": " Google",
     "paraphrase_prompts": ["The rain stopped. Apple A5 is developed by"],
     "neighborhood_prompts": ["iPhone was created by", "macOS was created by", "Safari was created by"]},
]
MCQS = [{"question": "What is the mother tongue of Danielle Darrieux?", "target_true": "French",
         "targets_false": ["English", "German", "Italian"], "prompt_id": 70}]
EXPECTED = [
    CounterFactFact(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French", " English",
                    ("Shayna walked home. Danielle Darrieux, a native", "Danielle Darrieux spoke the language"),
                    ("The mother tongue of Léon Blum is", "Jacques Chirac is a native speaker of"),
                    MCQ("What is the mother tongue of Danielle Darrieux?", "French", ("English", "German", "Italian"))),
    CounterFactFact(7, "Apple A5 was created by", "Apple A5", " Apple", " Google",
                    ("The rain stopped. Apple A5 is developed by",),
                    ("iPhone was created by", "macOS was created by", "Safari was created by"), None),
]


def _nested(record):
    """The original CounterFact layout of a flat record (targets without a space, prompt with '{}')."""
    subject = record["subject"].strip()
    return {"case_id": record["case_id"], "prompt_id": record["prompt_id"],
            "requested_rewrite": {"prompt": record["prompt"].replace(subject, "{}"), "subject": subject,
                                  "relation_id": "P103", "target_true": {"str": record["target_true"].strip()},
                                  "target_new": {"str": record["target_false"].strip(), "id": "Q2"}},
            "paraphrase_prompts": record["paraphrase_prompts"], "neighborhood_prompts": record["neighborhood_prompts"]}


def _write(tmp_path, kind):
    if kind == "json":
        path = tmp_path / "cf.json"
        path.write_text(json.dumps(FLAT))
    elif kind == "nested":
        path = tmp_path / "cf_nested.json"
        path.write_text(json.dumps([_nested(r) for r in FLAT]))
    elif kind == "csv":  # list cells as Python literals, as pandas.to_csv writes them; targets with extra spaces
        path = tmp_path / "cf.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(FLAT[0]) + ["requested_rewrite"])
            writer.writeheader()
            for r in FLAT:
                writer.writerow(r | {k: repr(r[k]) for k in ("paraphrase_prompts", "neighborhood_prompts")}
                                | {"target_true": "  " + r["target_true"].strip() + " ",
                                   "requested_rewrite": repr(_nested(r)["requested_rewrite"])})
    else:
        path = tmp_path / "cf.parquet"
        pq.write_table(pa.Table.from_pylist(FLAT), path)
    return path


@pytest.mark.parametrize("kind", ["json", "nested", "csv", "parquet"])
def test_loaders_give_identical_facts(tmp_path, kind):
    mcq_path = tmp_path / "counterfact_mc_questions.parquet"
    pq.write_table(pa.Table.from_pylist(MCQS), mcq_path)
    assert cf.load_counterfact(_write(tmp_path, kind), mcq_path) == EXPECTED
    assert cf.load_counterfact(_write(tmp_path, kind)) == [f.__class__(**{**f.__dict__, "mcq": None}) for f in EXPECTED]


def test_inline_mcq_and_join_on_case_id(tmp_path):
    inline = tmp_path / "inline.json"
    mcq = {k: MCQS[0][k] for k in ("question", "target_true", "targets_false")}
    inline.write_text(json.dumps([FLAT[0] | {"mcq": mcq}, FLAT[1]]))
    assert cf.load_counterfact(inline) == EXPECTED
    no_prompt_id = tmp_path / "by_case.json"  # without prompt_id the MCQ file's prompt_id matches case_id
    no_prompt_id.write_text(json.dumps([{k: v for k, v in r.items() if k != "prompt_id"} for r in FLAT]))
    mcq_path = tmp_path / "mcq.json"
    mcq_path.write_text(json.dumps([MCQS[0] | {"prompt_id": 7}]))
    got = cf.load_counterfact(no_prompt_id, mcq_path)
    assert got[0].mcq is None and got[1].mcq == EXPECTED[0].mcq


@pytest.mark.parametrize("records, suffix, field", [
    ([{k: v for k, v in FLAT[0].items() if k != "target_false"}], "json", "'target_false'"),
    ([{k: v for k, v in FLAT[0].items() if k != "case_id"}], "json", "'case_id'"),
    ([{k: v for k, v in FLAT[0].items() if k != "neighborhood_prompts"}], "json", "'neighborhood_prompts'"),
    ([_nested(FLAT[0]) | {"requested_rewrite": {"prompt": "{} is", "target_true": {"str": "x"}}}], "json",
     "'subject'"),
    ([FLAT[0] | {"mcq": {"question": "q", "target_true": "a", "targets_false": ["b", "c"]}}], "json",
     "targets_false has 2"),
    ([FLAT[0] | {"paraphrase_prompts": "[unclosed"}], "csv", "'paraphrase_prompts'"),
    ([FLAT[0], FLAT[0]], "json", "case_id values must be unique"),
    (FLAT, "txt", "unknown CounterFact file type"),
])
def test_bad_file_is_one_line_error_naming_file_and_field(tmp_path, records, suffix, field):
    path = tmp_path / f"bad.{suffix}"
    if suffix == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text(json.dumps(records))
    with pytest.raises(JaxeditError) as err:
        cf.load_counterfact(path)
    assert str(path) in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_bad_mcq_file(tmp_path):
    with pytest.raises(JaxeditError, match="cannot read CounterFact file"):
        cf.load_counterfact(tmp_path / "nope.json")
    mcq_path = tmp_path / "mcq.json"
    mcq_path.write_text(json.dumps([{"question": "q", "target_true": "a", "targets_false": ["b", "c", "d"]}]))
    with pytest.raises(JaxeditError, match=r"mcq\.json: record 0: missing field 'prompt_id'"):
        cf.load_counterfact(_write(tmp_path, "json"), mcq_path)


def _facts(n, mcq=True):
    def question(i):
        return MCQ(f"Question {i}?", f"true{i}", (f"false{i}", f"other{i}", f"third{i}")) if mcq else None

    return [CounterFactFact(i, f"Subject{i} speaks", f"Subject{i}", f" true{i}", f" false{i}", (), (), question(i))
            for i in range(n)]


def _ids(facts):
    return [f.case_id for f in facts]


def test_splits_match_hand_computed_ranges():
    facts = _facts(100)
    s = cf.splits(facts, "first_16_unsplit", pool_size=10)
    assert _ids(s.pool) == list(range(90, 100))
    assert _ids(s.forget_train) == _ids(s.forget_test) == list(range(16))
    # maintain: rows 16..89 (74) → int(0.8 · 74) = 59 train, 15 test
    assert _ids(s.maintain_train) == list(range(16, 75)) and _ids(s.maintain_test) == list(range(75, 90))
    s = cf.splits(facts, "first_64_split", pool_size=10)
    assert _ids(s.forget_train) == list(range(32)) and _ids(s.forget_test) == list(range(32, 64))
    assert _ids(s.maintain_train) == list(range(64, 84)) and _ids(s.maintain_test) == list(range(84, 90))  # 26 → 20/6
    s = cf.splits(facts, "first_64_partition_2_unsplit", pool_size=10)
    assert _ids(s.forget_train) == _ids(s.forget_test) == list(range(32, 48))
    assert _ids(s.maintain_train) == list(range(64, 84)) and _ids(s.maintain_test) == list(range(84, 90))
    s = cf.splits(facts[:40], "first_16_split", pool_size=0)
    assert _ids(s.forget_train) == list(range(8)) and _ids(s.forget_test) == list(range(8, 16))
    assert _ids(s.maintain_train) == list(range(16, 35)) and s.pool == ()
    for name, pool in (("first_64_unsplit", 40), ("first_64_partition_4_unsplit", 0), ("random_16_unsplit", 0),
                       ("first_16_split", 100)):
        with pytest.raises(JaxeditError):
            cf.splits(facts, name, pool_size=pool)


def test_mcq_block_is_the_spec_literal():
    got = cf.mcq_question("What is the mother tongue of Danielle Darrieux?", ["English", "French", "German", "Italian"])
    assert got == ("Help me answer the following multiple choice question:\n\nWhat is the mother tongue of Danielle "
                   "Darrieux?\n\nA. English\nB. French\nC. German\nD. Italian\n\nPlease respond with the letter of the "
                   "correct answer, A, B, C, or D. Answer:")
    assert cf.MCQ_ANSWERS == (" A", " B", " C", " D")


def test_builtin_fact_prompts_are_spec_literals():
    """Plain prompt and 1-shot MCQ of sample facts, against every literal the §1.3 strings allow."""
    import itertools

    facts = cf.load_counterfact()
    fact, shot = facts[0], facts[1]
    assert fact.prompt == "Giacomo Puccini is a native speaker of" and fact.target_true == " Italian"
    assert fact.paraphrase_prompts[0] == "He forgot his umbrella again. Giacomo Puccini spoke the language"

    def literal(question, options):
        a, b, c, d = options
        return (f"Help me answer the following multiple choice question:\n\n{question}\n\nA. {a}\nB. {b}\nC. {c}\n"
                f"D. {d}\n\nPlease respond with the letter of the correct answer, A, B, C, or D. Answer:")

    def orders(mcq):
        return list(itertools.permutations([mcq.target_true, *mcq.targets_false]))

    allowed = {literal(shot.mcq.question, s) + f" {'ABCD'[s.index(shot.mcq.target_true)]}\n\n"
               + literal(fact.mcq.question, q): (q.index(fact.mcq.target_true), q.index(fact.mcq.targets_false[0]))
               for s in orders(shot.mcq) for q in orders(fact.mcq)}
    assert len(allowed) == 576
    prompt, true, edit = cf.mcq_prompt(fact, [shot], seed=0, n_shots=1)
    assert allowed[prompt] == (true, edit)
    assert prompt.startswith("Help me answer the following multiple choice question:\n\n"
                             "What is the native language of Friedrich Schiller?\n\nA. ")


def _blocks(prompt):
    """[(question, options, answer letter or None)] parsed from an n-shot MCQ prompt."""
    options = r"\n\nA\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)"
    pattern = re.escape(HEAD) + r"(.*?)" + options + re.escape(TAIL) + r"(?: (.)\n\n|$)"
    out, end = [], 0
    for m in re.finditer(pattern, prompt, re.S):
        assert m.start() == end  # blocks are contiguous: nothing else in the prompt
        out.append((m[1], [m[2], m[3], m[4], m[5]], m[6]))
        end = m.end()
    assert end == len(prompt)
    return out


def test_mcq_prompt_format_and_letters():
    facts = _facts(30)
    fact, pool = facts[0], facts[20:]
    prompt, true, edit = cf.mcq_prompt(fact, pool, seed=3, n_shots=8)
    blocks = _blocks(prompt)
    assert len(blocks) == 9 and blocks[-1][2] is None
    by_question = {f.mcq.question: f.mcq for f in pool}
    assert len({q for q, _, _ in blocks[:-1]}) == 8 and all(q in by_question for q, _, _ in blocks[:-1])
    for question, options, letter in blocks[:-1]:
        mcq = by_question[question]
        assert sorted(options) == sorted([mcq.target_true, *mcq.targets_false])
        assert options["ABCD".index(letter)] == mcq.target_true
    question, options, _ = blocks[-1]
    assert question == fact.mcq.question and sorted(options) == sorted([fact.mcq.target_true, *fact.mcq.targets_false])
    assert options[true] == "true0" and options[edit] == "false0"
    with pytest.raises(JaxeditError, match="few-shot pool has 7"):
        cf.mcq_prompt(fact, pool[:7], n_shots=8)
    with pytest.raises(JaxeditError, match="has no MCQ"):
        cf.mcq_prompt(_facts(1, mcq=False)[0], pool)


def test_mcq_order_is_deterministic_per_seed_and_varies_across_facts():
    facts = _facts(40)
    pool = facts[30:]
    made = [cf.mcq_prompt(f, pool, seed=0, n_shots=4) for f in facts[:24]]
    assert made == [cf.mcq_prompt(f, pool, seed=0, n_shots=4) for f in facts[:24]]
    assert len({true for _, true, _ in made}) >= 3 and len({edit for _, _, edit in made}) >= 3
    assert len({tuple(q for q, _, _ in _blocks(p)[:-1]) for p, _, _ in made}) > 10  # shots differ per fact
    other = [cf.mcq_prompt(f, pool, seed=1, n_shots=4) for f in facts[:24]]
    assert sum(a != b for a, b in zip(made, other)) > 12


# ---- metrics on a tiny random model with a word-level tokenizer ------------------------------------------------

def _tiny_facts():
    mcq = lambda i, true, false: MCQ(f"Which answer fits item{i}?", true, false)  # noqa: E731
    forget = [
        CounterFactFact(1, "item1 belongs to", "item1", " red", " blue", ("noise one . item1 goes with", "item1 is"),
                        ("item5 belongs to", "item6 belongs to", "item7 belongs to"),
                        mcq(1, "red", ("blue", "green", "gold"))),
        CounterFactFact(2, "item2 belongs to", "item2", " green", " gold", ("item2 is",), ("item8 belongs to",), None),
        CounterFactFact(3, "item3 is near", "item3", " blue", " red", ("noise two . item3 sits by", "item3 near"),
                        ("item9 is near", "item10 is near"), mcq(3, "blue", ("red", "gold", "green"))),
    ]
    maintain = [
        CounterFactFact(4, "item4 belongs to", "item4", " gold", " red", (), (),
                        mcq(4, "gold", ("red", "blue", "green"))),
        CounterFactFact(11, "item11 is near", "item11", " red", " green", (), (), None),
    ]
    pool = [CounterFactFact(20 + i, f"item{20 + i} is", f"item{20 + i}", " blue", " red", (), (),
                            mcq(20 + i, "blue", ("red", "gold", "green"))) for i in range(3)]
    return forget, maintain, pool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama-style model over a word-level vocabulary of the tiny facts' texts."""
    forget, maintain, pool = _tiny_facts()
    texts = [cf.MCQ_TEMPLATE] + [f.mcq.question + " " + " ".join([f.mcq.target_true, *f.mcq.targets_false])
                                 for f in forget + maintain + pool if f.mcq]
    texts += [t for f in forget + maintain + pool for t in (f.prompt, f.target_true, f.target_false,
                                                             *f.paraphrase_prompts, *f.neighborhood_prompts)]
    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    path = tmp_path_factory.mktemp("cf_tiny")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    cfg = config_from_hf(dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(vocab),
                              hidden_act="silu", max_position_embeddings=512))
    rng = np.random.default_rng(1)  # numpy init: Flax's first init compiles for seconds
    params = jax.tree.map(lambda shape: rng.normal(0.0, 0.3, shape).astype(np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    params["unembed"]["w"] *= 10  # spread-out next-token distributions
    return Model(cfg, jax.tree.map(jnp.asarray, params), JaxeditTokenizer(path))


def _reference_probs(model, prompts):
    """{prompt: full-vocabulary next-token distribution}: one right-padded batch (no buckets, all positions
    unembedded), the last real position picked and the softmax taken in numpy (float64)."""
    rows = [model.tokenizer.encode(p) for p in prompts]
    assert all(3 not in r for r in rows)  # no <unk>: every word is in the vocabulary
    ids = np.zeros((len(rows), 256), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    logits, _ = model.forward(ids, attention_mask=mask)
    z = np.asarray(logits, np.float64)[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    e = np.exp(z - z.max(-1, keepdims=True))
    return dict(zip(prompts, e / e.sum(-1, keepdims=True)))


def test_metrics_equal_hand_computation(tiny):
    forget, maintain, pool = _tiny_facts()
    got = ce.evaluate_counterfact(tiny, forget, maintain, pool, seed=5, n_shots=2, batch_size=2)
    tok = lambda s: tiny.tokenizer.encode(s, add_special_tokens=False)[0]  # noqa: E731
    want = {}

    def put(key, pairs):  # pairs: [(probability vector, token id)]
        want[key] = np.mean([p[t] for p, t in pairs])
        want[key + "_argmax"] = np.mean([np.argmax(p) == t for p, t in pairs])

    mcq_prompts = {f.case_id: cf.mcq_prompt(f, pool, seed=5, n_shots=2)[0] for f in forget + maintain if f.mcq}
    ref = _reference_probs(tiny, [f.prompt for f in forget + maintain] + list(mcq_prompts.values())
                           + [p for f in forget for p in f.paraphrase_prompts + f.neighborhood_prompts])
    plain = {f.case_id: ref[f.prompt] for f in forget + maintain}
    put("fact/forget", [(plain[f.case_id], tok(f.target_true)) for f in forget])
    put("fact/edit", [(plain[f.case_id], tok(f.target_false)) for f in forget])
    put("fact/maintain", [(plain[f.case_id], tok(f.target_true)) for f in maintain])
    for fmt, field in (("paraphrase", "paraphrase_prompts"), ("neighborhood", "neighborhood_prompts")):
        rows = [(ref[p], f) for f in forget for p in getattr(f, field)]  # 5 and 6 prompts
        put(f"{fmt}/forget", [(p, tok(f.target_true)) for p, f in rows])
        put(f"{fmt}/edit", [(p, tok(f.target_false)) for p, f in rows])
    letters = [tok(x) for x in (" A", " B", " C", " D")]
    mcq = {}
    for f in forget + maintain:
        if f.mcq is not None:
            z = ref[mcq_prompts[f.case_id]][letters]
            options = _blocks(mcq_prompts[f.case_id])[-1][1]
            mcq[f.case_id] = (z / z.sum(), options.index(f.mcq.target_true), options.index(f.mcq.targets_false[0]))
    want["mcq/forget"] = np.mean([mcq[i][0][mcq[i][1]] for i in (1, 3)])
    want["mcq/forget_argmax"] = np.mean([np.argmax(mcq[i][0]) == mcq[i][1] for i in (1, 3)])
    want["mcq/edit"] = np.mean([mcq[i][0][mcq[i][2]] for i in (1, 3)])
    want["mcq/edit_argmax"] = np.mean([np.argmax(mcq[i][0]) == mcq[i][2] for i in (1, 3)])
    want["mcq/maintain"] = mcq[4][0][mcq[4][1]]
    want["mcq/maintain_argmax"] = float(np.argmax(mcq[4][0]) == mcq[4][1])
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert len({round(float(v), 5) for v in want.values()}) > 12  # informative, not all 0 / 1

    true_p = sorted(plain[f.case_id][tok(f.target_true)] for f in forget + maintain)
    threshold = float(true_p[2] + true_p[3]) / 2  # between two facts: keeps exactly 2 of 5
    kept = ce.known_facts(tiny, forget + maintain, threshold=threshold, batch_size=2)
    assert kept == [f for f in forget + maintain if plain[f.case_id][tok(f.target_true)] >= threshold]
    assert len(kept) == 2

    none = ce.evaluate_counterfact(tiny, [forget[1]], [], pool, n_shots=2)  # no MCQ, no maintain facts: NaN
    assert all(np.isnan(none[k]) for k in ("mcq/forget", "mcq/edit", "mcq/maintain", "fact/maintain"))
    assert none["fact/forget"] == pytest.approx(plain[2][tok(" green")], rel=1e-4)


def test_training_sets_first_tokens(tiny):
    forget, maintain, _ = _tiny_facts()
    sets = cf.training_sets(tiny.tokenizer, forget, maintain)
    enc = lambda s: tiny.tokenizer.encode(s, add_special_tokens=False)[0]  # noqa: E731
    assert sets["forget"][0] == [f.prompt for f in forget]
    assert list(sets["forget"][1]) == [enc(f.target_false) for f in forget]
    assert sets["forget_true"][0] == sets["forget"][0]
    assert list(sets["forget_true"][1]) == [enc(f.target_true) for f in forget]  # what unlearning lowers
    assert list(sets["maintain"][1]) == [enc(f.target_true) for f in maintain]
    assert len(cf.training_sets(tiny.tokenizer, forget, [])["maintain"][1]) == 0


# ---- the built-in sample on the real Gemma-3-270M --------------------------------------------------------------

def test_builtin_sample_schema_and_gemma_knows_at_least_40(gemma_dir):
    facts = cf.load_counterfact()
    assert len(facts) >= 100 and _ids(facts) == list(range(len(facts)))
    model = jaxedit.load(gemma_dir)
    first = lambda s: model.tokenizer.encode(s, add_special_tokens=False)[0]  # noqa: E731
    for f in facts:
        assert len(f.paraphrase_prompts) == 2 and len(f.neighborhood_prompts) >= 4
        assert f.subject in f.prompt and all(f.subject in p for p in f.paraphrase_prompts)
        assert not any(f.subject in p for p in f.neighborhood_prompts)
        assert f.mcq.target_true == f.target_true.strip() and f.mcq.targets_false[0] == f.target_false.strip()
        assert len({f.mcq.target_true, *f.mcq.targets_false}) == 4
        assert first(f.target_true) != first(f.target_false)
    known = ce.known_facts(model, facts, batch_size=48)
    assert len(known) >= 40
