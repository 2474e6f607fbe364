"""The demo task suite (../shared/spec/demo-tasks.md): generators, splits, scorers, composites."""

from loraswitch.demo.tasks.suite import (
    TASK_NAMES,
    TASKS,
    Composite,
    Example,
    Task,
    composite_prompt,
    composites,
    examples,
    out_of_suite,
    parse_numbered,
    score,
)

__all__ = [
    "TASK_NAMES",
    "TASKS",
    "Composite",
    "Example",
    "Task",
    "composite_prompt",
    "composites",
    "examples",
    "out_of_suite",
    "parse_numbered",
    "score",
]
