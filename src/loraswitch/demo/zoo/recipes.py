"""Per-library adapter recipes and training data for `loraswitch zoo build`.

demo: recipes differ per task on purpose: the easy classification task gets a rank-4 adapter on
the attention projections only, addition and sorting (the hardest two) get rank 16 everywhere.
That keeps the committed library small and exercises mixed ranks and target modules.

bigbench: the whole library has to train in about 70 minutes on two CPU cores shared with other
jobs. Measured there: ~280 tokens/s with one torch thread, but 17-30 tokens/s with two threads
while other processes held the cores (oversubscribed threads spin-wait), so it is trained with
LORASWITCH_THREADS=1. Every adapter is rank 8 on the last 10 of the base's 30 layers (backward
stops there), lr 2e-3, batch 4, and its steps come from a fixed budget of 10k training tokens:
short-prompt tasks get more steps, long-prompt tasks the 15-step floor (60 examples: enough to
learn the answer format, little of the task). The first two adapters got larger budgets
(strategyqa 64k tokens, object_counting 20k, both batch 8); throughput then fell to 45-130
tokens/s under the machine's load, which forced the cuts for the other eight (about 100k tokens
for all eight).
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

BIGBENCH_TOKEN_BUDGET = 10_000  # training tokens per adapter
BIGBENCH_BATCH = 4
BIGBENCH_STEPS = (15, 150)
# mean training-row length in tokens (prompt + answer), measured with the base tokenizer on the
# train splits; rows over `max_tokens` are skipped
BIGBENCH_MEAN_TOKENS = {
    "logical_deduction": 197, "question_selection": 298, "abstract_narrative_understanding": 196,
    "goal_step_wikihow": 103, "winowhy": 102, "strategyqa": 53, "disfl_qa": 228, "linguistics_puzzles": 315,
    "object_counting": 63, "epistemic_reasoning": 128,
}


def _bigbench_recipe(mean_tokens: int) -> Recipe:
    lo, hi = BIGBENCH_STEPS
    steps = max(lo, min(hi, BIGBENCH_TOKEN_BUDGET // (BIGBENCH_BATCH * mean_tokens)))
    return Recipe(rank=8, alpha=16, steps=steps, batch_size=BIGBENCH_BATCH, lr=2e-3, warmup=3, top_layers=10,
                  max_tokens=384)


BIGBENCH_RECIPES: dict[str, Recipe] = {t: _bigbench_recipe(n) for t, n in BIGBENCH_MEAN_TOKENS.items()}
# the first two were trained with the earlier, larger budgets, before throughput under the machine's load
# forced the cuts: strategyqa with 64k tokens (batch 8, lr 1e-3), object_counting with 20k (batch 8)
BIGBENCH_RECIPES["strategyqa"] = Recipe(rank=8, alpha=16, steps=150, batch_size=8, lr=1e-3, warmup=5,
                                        top_layers=10, max_tokens=384)
BIGBENCH_RECIPES["object_counting"] = Recipe(rank=8, alpha=16, steps=39, batch_size=8, lr=2e-3, warmup=3,
                                             top_layers=10, max_tokens=384)


def zoo_recipes(library: str) -> dict[str, Recipe]:
    if library == "demo":
        return DEMO_RECIPES
    if library == "bigbench":
        return BIGBENCH_RECIPES
    raise ValueError(f"no adapter recipes for library {library!r}")


def zoo_tasks(library: str) -> tuple[str, ...]:
    return tuple(zoo_recipes(library))


def training_pairs(library: str, task: str, recipe: Recipe) -> list[tuple[str, str]]:
    """(prompt, answer) training examples of `task` from its library's train split."""
    if library == "demo":
        from loraswitch.demo.tasks import examples

        return [(e.prompt, e.answer) for e in examples(task, "train", recipe.n_train, recipe.seed)]
    from loraswitch.demo.bigbench.tasks import examples as bb_examples

    return [(e.prompt, e.answer) for e in bb_examples(task, "train")]
