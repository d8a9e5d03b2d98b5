"""The task object of a sweep config (`task` and `data` sections)."""

from __future__ import annotations

from jaxedit.data import sports
from jaxedit.tasks.sports import SportsTask


def make_task(config):
    """SportsTask or CounterFactTask for `config.task`, with the data of `config.data` loaded."""
    d = config.data
    if config.task in ("sports_athletes", "sport_to_golf"):
        return SportsTask(sports.load_sports(d.path), config.task, sport=d.split)
    from jaxedit.tasks.counterfact import CounterFactTask

    return CounterFactTask.from_files(d.path, d.mcq_path, sequential=config.task == "counterfact_sequential",
                                      split=d.split, n_shots=config.eval.n_shots)
