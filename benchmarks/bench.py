#!/usr/bin/env python
"""Speed and memory benchmark: loraswitch vs one merged adapter, the base model and PEFT.

    python benchmarks/bench.py                      # SmolLM2-135M + random Llama 1024x16, CPU
    python benchmarks/bench.py --quick              # SmolLM2 only, batch 16, about 3 minutes on 2 cores
    python benchmarks/bench.py --device cuda        # the same on a GPU
    python benchmarks/bench.py --profile            # + torch-profiler breakdown of the decode paths

Same as `loraswitch bench`; the logic lives in `loraswitch.bench`. Results go to
benchmarks/results/bench_<device>.json, .md and _scaling.png.
"""

import typer

from loraswitch.bench import bench_command

if __name__ == "__main__":
    typer.run(bench_command)
