"""Per-library adapter recipes and training data for `loraswitch zoo build`.

demo: recipes differ per task on purpose: the easy classification task gets a rank-4 adapter on
the attention projections only, addition and sorting (the hardest two) get rank 16 everywhere.
That keeps the committed library small and exercises mixed ranks and target modules.

bigbench: every adapter is rank 8 on all 30 layers and all projections, batch 16, lr 1e-3, for
three epochs of its train split (at most 600 steps), with six checks on the validation split
(`train.answer_exact_rate`) of which the best is kept: a 135M base overfits small real tasks
within a few epochs. That is ~9M training tokens for the library: minutes on one GPU
(`LORASWITCH_DEVICE=cuda loraswitch zoo build --library bigbench`), ~9 hours at this machine's
~280 tokens/s on CPU, so on CPU pass `--steps-scale 0.25` to stay near 2.5 hours (the manifest
records the steps each adapter had). The earlier CPU library (rank 8 on the last 10 layers,
10k-64k tokens each) reached only 12-48%: see docs/real-tasks.md.
"""

from __future__ import annotations

from loraswitch.demo.zoo.train import Recipe

DEMO_RECIPES: dict[str, Recipe] = {
    "iso_date": Recipe(steps=100),
    "to_json": Recipe(steps=90),
    "reverse_words": Recipe(steps=130),
    "sort_numbers": Recipe(rank=16, alpha=32, steps=320),
    "num_to_english": Recipe(steps=160),
    "num_to_french": Recipe(steps=160),
    "add": Recipe(rank=16, alpha=32, steps=250),
    "sentiment": Recipe(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], steps=60),
}

BIGBENCH_EPOCHS, BIGBENCH_MAX_ROWS = 3, 9_600  # rows seen per adapter: three epochs, at most 9,600
# rows of each task's train split (loraswitch.demo.bigbench.tasks; prompts over 1,500 characters are
# dropped before splitting), which set the steps of its recipe
BIGBENCH_TRAIN_ROWS = {
    "logical_deduction": 1200, "question_selection": 956, "abstract_narrative_understanding": 700,
    "goal_step_wikihow": 1950, "winowhy": 2559, "strategyqa": 1989, "disfl_qa": 7187, "linguistics_puzzles": 1700,
    "object_counting": 700, "epistemic_reasoning": 1700,
}
# the first five were trained at batch 16 (under bf16 autocast, since replaced by fp32 after
# strategyqa's loss went NaN with it); the other five at batch 32, the same rows in half the steps,
# to fit the GPU lease (a step there costs the same at either batch: it is bound by launch overhead)
BIGBENCH_BATCH = {t: 16 for t in list(BIGBENCH_TRAIN_ROWS)[:5]} | {t: 32 for t in list(BIGBENCH_TRAIN_ROWS)[5:]}


def _bigbench_recipe(train_rows: int, batch: int) -> Recipe:
    steps = -(-min(BIGBENCH_MAX_ROWS, BIGBENCH_EPOCHS * train_rows) // batch)
    return Recipe(rank=8, alpha=16, steps=steps, batch_size=batch, lr=1e-3, warmup=20, max_tokens=512, checks=6)


BIGBENCH_RECIPES: dict[str, Recipe] = {t: _bigbench_recipe(n, BIGBENCH_BATCH[t]) for t, n in BIGBENCH_TRAIN_ROWS.items()}


def zoo_recipes(library: str) -> dict[str, Recipe]:
    if library == "demo":
        return DEMO_RECIPES
    if library == "bigbench":
        return BIGBENCH_RECIPES
    raise ValueError(f"no adapter recipes for library {library!r}")


def zoo_tasks(library: str) -> tuple[str, ...]:
    return tuple(zoo_recipes(library))


def training_pairs(library: str, task: str, recipe: Recipe, split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) examples of `task` from its library's `split` ("train" or "val")."""
    if library == "demo":
        from loraswitch.demo.tasks import examples

        return [(e.prompt, e.answer) for e in examples(task, split, recipe.n_train, recipe.seed)]
    from loraswitch.demo.bigbench.tasks import examples as bb_examples

    return [(e.prompt, e.answer) for e in bb_examples(task, split)]
