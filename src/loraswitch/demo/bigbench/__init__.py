"""The BIG-bench task suite (../shared/spec/real-tasks.md): fetching the task files from the
`bigbench` sdist into the cache (`fetch`), the ten tasks, their rendering and splits (`tasks`),
BIG-bench's metrics in generative form (`metrics`) and MeteoRA's composite prompts
(`composites`). No BIG-bench text is stored in the repository."""
