"""The commands around a trained model: export, evaluate and the web app (`ui`).

Their options are in `cli.main`, which imports this module only for the command that runs.
"""
from __future__ import annotations

from functools import partial

from dreambooth.evaluation.command import evaluate_run
from dreambooth.evaluation.results import format_score
from dreambooth.evaluation.scorers import load_extractors, load_toy_oracle
from dreambooth.formats.exporters import export
from dreambooth.ui import serve


def cmd_export(args) -> int:
    """Errors (existing output, LoRA format of a full run, ...) are DreamboothErrors: cli.main reports them."""
    path = export(args.run_dir, args.format, args.output, dtype=args.dtype)
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args) -> int:
    """Generate the benchmark images, score them, print the overall scores and the report path."""
    # Loaders, not models: evaluate_run checks the photos and prompts before loading anything.
    oracle = load_toy_oracle if args.oracle else None
    extractors = partial(load_extractors, args.dino, args.clip, standin=args.standin)
    result = evaluate_run(args.model, args.images, args.identifier, args.class_noun, args.output,
                          prompts=args.prompts, num_per_prompt=args.num_per_prompt, seed=args.seed,
                          steps=args.steps, extractors=extractors, oracle=oracle, subject=args.subject)
    for name, value in result.overall.items():
        print(f"{name:>40}: {format_score(value, 4)}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {args.output}/report.html")
    return 0


def cmd_ui(args) -> int:
    return serve(args.host, args.port, args.workspace, allow_hosts=tuple(args.allow_host))
