"""Tasks: what differs between experiments (facts, prompts, metrics), behind one interface (`base.Task`).

`TASKS` maps each task name to its class. Adding a task is one module with a class implementing
`base.Task` (a `NAMES` tuple, `build`, the methods) and one entry in `_CLASSES` below.
"""

from __future__ import annotations

from jaxedit.errors import JaxeditError
from jaxedit.tasks.base import DataSettings, EvalSettings, Task
from jaxedit.tasks.counterfact import CounterFactTask
from jaxedit.tasks.sports import SportsTask

_CLASSES = (SportsTask, CounterFactTask)
TASKS: dict[str, type] = {name: cls for cls in _CLASSES for name in cls.NAMES}


def task_class(name: str) -> type:
    """The class of task `name` (its report columns are a class attribute)."""
    if name not in TASKS:
        raise JaxeditError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]


def make_task(name: str, data: DataSettings = DataSettings(), evaluation: EvalSettings = EvalSettings()) -> Task:
    """Task `name` with the facts of `data` loaded."""
    return task_class(name).build(name, data, evaluation)


__all__ = ["TASKS", "DataSettings", "EvalSettings", "Task", "make_task", "task_class"]
