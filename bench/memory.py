"""``python -m lowmem.bench memory``: the memory estimator as a table, one column per optimizer.

Examples::

    python -m lowmem.bench memory                      # the GaLore paper's headline: LLaMA-7B, bf16,
                                                       # 256 tokens, AdamW vs 8-bit GaLore layer-wise
    python -m lowmem.bench memory --model llama-7b --optimizer galore_adamw8bit --layerwise
    python -m lowmem.bench memory --model llama-1b --optimizer adamw,adamw8bit,galore_adamw,apollo_mini \\
        --batch-size 8 --seq-len 1024 --activation checkpoint
    python -m lowmem.bench memory --model llama-70b --optimizer adamw --world-size 8 --activation checkpoint
    python -m lowmem.bench memory --model llama-7b --optimizer galore_adamw8bit,galore_adafactor,adafactor

Nothing is allocated: the models are built on the meta device (``lowmem.memory.estimate``).
Numbers are GiB per device; the table ends with the assumptions each column made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowmem.memory.estimator import ACTIVATION_MODES, MemoryReport, estimate, format_reports
from lowmem.memory.presets import LLAMA_PRESETS
from lowmem.memory.state_bytes import OPTIMIZERS, optimizer_spec

#: The GaLore paper's claim (Zhao et al. 2024, Fig. 1 and Sec. 5): LLaMA-7B pre-training with
#: 8-bit GaLore and per-layer updates fits a 24 GB GPU (bf16, token batch 256, no checkpointing
#: or offload); AdamW, 8-bit Adam and 8-bit GaLore without per-layer updates shown beside it.
HEADLINE = [
    {"optimizer": "adamw"},
    {"optimizer": "adamw8bit"},
    {"optimizer": "galore_adamw8bit"},
    {"optimizer": "galore_adamw8bit", "layerwise": True},
]


def headline_reports() -> list[MemoryReport]:
    """The columns of the paper's claim: LLaMA-7B, bf16, batch 1 x 256 tokens."""
    return [estimate("llama-7b", batch_size=1, seq_len=256, dtype=torch.bfloat16, **row) for row in HEADLINE]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, print the estimates (and write JSON if asked); returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help=f"one of {', '.join(LLAMA_PRESETS)} (default: the headline)"
    )
    parser.add_argument("--optimizer", default="adamw", help=f"comma list of: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--activation", default="none", choices=ACTIVATION_MODES)
    parser.add_argument("--layerwise", action="store_true", help="per-layer updates inside backward")
    parser.add_argument("--rank", type=int, default=None, help="rank of projections (default: GaLore's)")
    parser.add_argument("--update-proj-gap", type=int, default=200, help="recorded; changes no bytes")
    parser.add_argument("--proj-type", default="std")
    parser.add_argument(
        "--offload-optimizer", action="store_true", help="CPUOffloadOptimizer: states in host memory"
    )
    parser.add_argument("--world-size", type=int, default=1, help="FSDP full sharding over this many devices")
    parser.add_argument(
        "--beta1",
        type=float,
        default=None,
        help="Adafactor's first moment (adafactor, galore_adafactor; default: none, as theirs)",
    )
    parser.add_argument("--json", default=None, help="write the reports to this JSON file")
    args = parser.parse_args(argv)
    if args.model is None:
        print("GaLore's headline (Zhao et al. 2024): LLaMA-7B pre-training, bf16, 1 x 256 tokens")
        reports = headline_reports()
    else:
        reports = [
            estimate(
                args.model,
                optimizer=name,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                dtype=getattr(torch, args.dtype),
                activation=args.activation,
                layerwise=args.layerwise,
                rank=args.rank,
                update_proj_gap=args.update_proj_gap,
                proj_type=args.proj_type,
                offload_optimizer=args.offload_optimizer,
                world_size=args.world_size,
                # Adafactor's option; the Adam family always keeps a first moment.
                beta1=args.beta1 if optimizer_spec(name).adafactor else None,
            )
            for name in args.optimizer.split(",")
            if name
        ]
    print(format_reports(reports))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
