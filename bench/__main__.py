"""Command line of the benchmark harness: ``python -m lowmem.bench SUBCOMMAND [options]``.

Each subcommand is a module with ``main(argv: list[str] | None) -> int``, imported only when
chosen, so ``micro`` never pays for transformers and ``train`` never for the kernel suites.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("lowmem.bench.train", "train a small LLaMA on the stdlib source and compare optimizers"),
    "micro": ("lowmem.bench.micro", "micro-benchmarks of single kernels, with bytes and FLOPs models"),
    "step": ("lowmem.bench.step", "one optimizer step (steady and refresh) vs galore-torch and AdamW"),
    "step8bit": ("lowmem.bench.step8bit", "8-bit AdamW step on CPU vs torch fused AdamW and bitsandbytes"),
    "memory": ("lowmem.bench.memory", "memory per device (weights, grads, states, activations)"),
    "layers": ("lowmem.bench.layers", "SLTrain / low-rank linears fwd+bwd vs nn.Linear, saved bytes"),
    "lowp": ("lowmem.bench.lowp_linear", "int8 / fp8 training linear vs nn.Linear (fwd+bwd, TOPS vs peak)"),
    "offload": ("lowmem.bench.offload", "activation offload and offloaded checkpointing: bytes kept, time"),
    "offload-optim": ("lowmem.bench.offload_optim", "CPUOffloadOptimizer's host step vs torch fused AdamW"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand's ``main`` with the remaining arguments; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench", description="The lowmem benchmark harness."
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        # add_help=False: "train --help" must reach the subcommand's own parser.
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(argv[1:] + rest))


if __name__ == "__main__":
    raise SystemExit(main())
