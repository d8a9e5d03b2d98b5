"""The sports tasks (method.md §1.1–1.2): Sports-Athlete-Editing and Full-Sports-Editing (sport → golf).

`SportsTask` gives the experiment (`jaxedit.experiment`) what differs between tasks: the known-fact
split, the localization inputs, the training and relearning sets, and every evaluation.
- 'sports_athletes': forget = the first n_forget team athletes the model knows, each injected with
  its pre-sampled sport (`inject_without_golf`); maintain = the other known athletes, 80/20.
- 'sport_to_golf': forget = the known athletes of one sport (`data.split`, e.g. 'basketball'),
  relabelled golf; training uses the first half, forget/edit metrics the held-out second half
  (§1.1); maintain = the other sports' known athletes, 80/20.
"First" is in `data.fact_order`: the file's order (the paper's, e.g. a CSV in its `sports.csv`
schema with `data.known_threshold=0` gives its first 16 rows, unfiltered), or a permutation by the
seed, which draws the forget set from the known athletes and shuffles maintain and the halves.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxedit.data import sports
from jaxedit.data.batching import first_tokens
from jaxedit.errors import JaxeditError
from jaxedit.readout import candidate_probs, known
from jaxedit.eval.latent import POSITIONS, latent_knowledge
from jaxedit.eval.sports_eval import evaluate_sports
from jaxedit.localize.pipeline import LocalizationInputs
from jaxedit.tasks.base import DataSettings, EvalSettings
from jaxedit.tasks.split import Split, cap_maintain, known_prefix, ordered

RELEARN_FORMATS = ("fact", "mcq_fact")  # §5.8: templates 1 and 5, no system prompt
COLUMNS = {  # §6.1 column -> metric key
    "forget": "after/fact/forget", "maintain": "after/fact/maintain", "edit": "after/qa/edit",
    "forget_qa": "after/qa/forget", "mcq_forget": "after/mcq/forget", "mcq_edit": "after/mcq/edit",
    "mcq_maintain": "after/mcq/maintain",
}
SELECTION = ("fact/forget", "fact/maintain", "qa/edit")
EVAL_FORMATS = ("fact", "qa", "mcq")  # §5.2–5.3: training template, system-prompt QA and MCQ  # §4.4 score: forget (train fmt), maintain, edit (sys-QA)


class SportsTask:
    """One of the sports tasks of the module doc on a list of `SportsFact`s (a `tasks.base.Task`)."""

    columns = COLUMNS
    selection = SELECTION
    NAMES = ("sports_athletes", "sport_to_golf")

    def __init__(self, facts: list, name: str = "sports_athletes", sport: str | None = None):
        if name == "sport_to_golf" and sport not in sports.TEAM_SPORTS:
            raise JaxeditError(f"sport_to_golf needs data.split set to one of {', '.join(sports.TEAM_SPORTS)}, "
                               f"got {sport!r}")
        self.facts, self.name, self.sport = facts, name, sport
        self.inject_field = "inject_with_golf" if name == "sport_to_golf" else "inject_without_golf"

    @classmethod
    def build(cls, name: str, data: DataSettings, evaluation: EvalSettings) -> SportsTask:
        return cls(sports.load_sports(data.path), name, sport=data.split)

    def split(self, model, data: DataSettings, seed: int) -> Split:
        """Filter the team athletes (in `data.fact_order`) by P(true sport) ≥ data.known_threshold; split them."""
        n_forget, threshold, max_maintain = data.n_forget, data.known_threshold, data.max_maintain
        team = ordered(sports.team_facts(self.facts), data.fact_order, seed)
        if self.name == "sport_to_golf":
            need = len(team)
        else:
            need = n_forget + (len(team) if max_maintain is None else max_maintain)
        kept, checked = known_prefix(team, need, lambda rows: self._known(model, rows, threshold))
        if self.name == "sport_to_golf":
            target = [dataclasses.replace(f, inject_with_golf="golf") for f in kept if f.sport == self.sport]
            half = len(target) // 2
            forget, test, rest = target[:half], target[half:], [f for f in kept if f.sport != self.sport]
        else:
            forget = test = kept[:n_forget]
            rest = kept[n_forget:]
        if len(forget) < 2 or len(rest) < 5:
            raise JaxeditError(f"the model knows {len(kept)} of {checked} team-sport athletes: too few for "
                               f"{self.name} (≥ 2 forget and ≥ 5 maintain facts); pass more facts, lower "
                               f"data.n_forget or data.known_threshold")
        train, held = cap_maintain(rest, max_maintain)
        return Split(forget, test, train, held, n_known=len(kept), n_candidates=checked)

    @staticmethod
    def _known(model, facts: list, threshold: float) -> np.ndarray:
        probs = candidate_probs(model, [sports.prompt(f.athlete) for f in facts], list(sports.answers("fact")))
        return known(probs, np.array([sports.SPORTS.index(f.sport) for f in facts]), threshold)

    def localization_inputs(self, model, facts: list) -> LocalizationInputs:
        """Answer ids [N], the two other team sports' ids [N,2], labels: the team sport's index; setting 'sports'."""
        ids = first_tokens(model.tokenizer, list(sports.answers("fact")[:3]))
        labels = np.array([sports.TEAM_SPORTS.index(f.sport) for f in facts])
        others = np.array([[ids[j] for j in range(3) if j != y] for y in labels])
        return LocalizationInputs([sports.prompt(f.athlete) for f in facts], [f.athlete for f in facts], ids[labels],
                                  others, labels, setting="sports")

    def _sets(self, tokenizer, named: dict) -> dict:
        ids = first_tokens(tokenizer, list(sports.answers("fact")))
        return {key: ([sports.prompt(f.athlete) for f in facts],
                      np.array([ids[sports.SPORTS.index(getattr(f, field))] for f in facts], np.int32))
                for key, (facts, field) in named.items()}

    def train_sets(self, tokenizer, split: Split) -> dict:
        """{'forget': prompts → injected sport, 'forget_true': the same prompts → true sport (what `train.unlearn`
        lowers), 'maintain': prompts → true sport} (training template)."""
        return self._sets(tokenizer, {"forget": (split.forget, self.inject_field),
                                      "forget_true": (split.forget, "sport"),
                                      "maintain": (split.maintain_train, "sport")})

    def relearn_sets(self, tokenizer, facts: list, maintain: list) -> dict:
        """The relearning attack's data: `facts` with their TRUE sport, plus maintain facts."""
        return self._sets(tokenizer, {"forget": (facts, "sport"), "maintain": (maintain, "sport")})

    def evaluate(self, model, forget: list, maintain: list, params=None) -> dict:
        return evaluate_sports(model, forget, maintain, params=params, formats=EVAL_FORMATS,
                               inject_field=self.inject_field)

    def relearn_evaluate(self, model, forget: list, maintain: list, params) -> dict:
        return evaluate_sports(model, forget, maintain, params=params, formats=RELEARN_FORMATS,
                               inject_field=self.inject_field)

    def latent(self, model, split: Split, params, steps: int, seed: int) -> dict:
        """§5.6 probes (team-sport injections only; whole-sport → golf has none to probe): 'probe_*' keys at
        the last prompt token (the paper's), 'probe_subject_*' at the subject's last token (`latent.POSITIONS`)."""
        if self.name == "sport_to_golf":
            return {}
        results = latent_knowledge(model, split.forget, split.maintain_train, params=params, seed=seed,
                                   inject_field=self.inject_field, steps=steps)
        return {k: v for position, result in results.items() for k, v in result.row(POSITIONS[position]).items()}

    def soft_prompt_data(self, facts: list) -> tuple[list[str], list[str]]:
        """(prompts, true answer strings) the adversary is trained on (training template)."""
        return [sports.prompt(f.athlete) for f in facts], [sports.answer(f.sport) for f in facts]

    def soft_prompt_metrics(self, model, params, adversary, held_out: list, maintain: list) -> dict:
        """Per restart [R]: P(true) / P(injected) on the held-out forget facts, P(true) on maintain (4 candidates)."""
        from jaxedit.attacks.soft_prompt import attacked_candidate_probs

        facts = held_out + maintain
        probs = attacked_candidate_probs(model, params, adversary, [sports.prompt(f.athlete) for f in facts],
                                         list(sports.answers("fact")))  # [R,N,4]
        label = lambda rows, field: np.array([sports.SPORTS.index(getattr(f, field)) for f in rows])  # noqa: E731
        n = len(held_out)
        pick = lambda rows, labels: probs[:, rows, labels].mean(-1)  # noqa: E731
        return {"forget": pick(np.arange(n), label(held_out, "sport")),
                "edit": pick(np.arange(n), label(held_out, self.inject_field)),
                "maintain": pick(n + np.arange(len(maintain)), label(maintain, "sport"))}
