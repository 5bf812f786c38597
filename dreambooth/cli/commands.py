"""Subcommands that wrap larger modules: export, evaluate, ui."""
from __future__ import annotations


def register(sub) -> None:
    e = sub.add_parser("export", help="write the trained model in another format")
    e.add_argument("run_dir")
    e.add_argument("--format", required=True, choices=["diffusers", "single-file", "lora", "lora-kohya", "lora-peft"],
                   help="lora = lora-kohya, which A1111, Forge, ComfyUI and diffusers all load; lora-peft is "
                   "read by diffusers only (its alpha needs diffusers >= 0.34)")
    e.add_argument("--output", required=True)
    e.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"],
                   help="weight precision (default fp16, as A1111/ComfyUI share them); a diffusers folder "
                   "keeps fp32 weights and adds this as a variant (variant=\"fp16\")")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("evaluate", help="score a run with the DreamBooth benchmark metrics")
    v.add_argument("--model", required=True, help="run directory or MODEL")
    v.add_argument("--images", required=True, help="the real subject photos")
    v.add_argument("--identifier", required=True)
    v.add_argument("--class-noun", required=True)
    v.add_argument("--output", required=True, help="folder for metrics.json, grids/, report.html")
    v.add_argument("--prompts", default=None, help="prompt file, one per line with {identifier} and "
                   "{class} (default: the paper's 25 prompts for the class)")
    v.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (paper: 4)")
    v.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    v.add_argument("--steps", type=int, default=25, help="sampler steps")
    v.add_argument("--dino", default=None, help="DINO folder or hub id (default facebook/dino-vits16)")
    v.add_argument("--clip", default=None, help="CLIP folder or hub id (default openai/clip-vit-base-patch32)")
    v.add_argument("--standin", action="store_true", help="score subject fidelity with the offline "
                   "EfficientNet-Lite0 stand-in instead of DINO (labelled *_standin; CLIP optional)")
    v.add_argument("--oracle", action="store_true", help="toy-world runs: score with the oracle")
    v.add_argument("--subject", default=None, help="toy subject for --oracle (default: the class noun)")
    v.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("ui", help="start the local web app")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--workspace", default=None,
                   help="where jobs, uploads and runs are kept (default: ~/.cache/dreambooth/ui)")
    u.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this host name (e.g. the machine's name on the LAN); repeatable")
    u.set_defaults(func=cmd_ui)


def cmd_export(args) -> int:
    """Errors (existing output, LoRA format of a full run, ...) are DreamboothErrors: cli.main reports them."""
    from dreambooth.formats.exporters import export

    path = export(args.run_dir, args.format, args.output, dtype=args.dtype)
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args) -> int:
    """Generate the benchmark images, score them, print the overall scores and the report path."""
    from functools import partial

    from dreambooth.evaluation.oracle_scoring import load_toy_oracle
    from dreambooth.evaluation.run import evaluate_run
    from dreambooth.evaluation.scorers import load_extractors

    # Loaders, not models: evaluate_run checks the photos and prompts before loading anything.
    oracle = load_toy_oracle if args.oracle else None
    extractors = partial(load_extractors, args.dino, args.clip, standin=args.standin)
    result = evaluate_run(args.model, args.images, args.identifier, args.class_noun, args.output,
                          prompts=args.prompts, num_per_prompt=args.num_per_prompt, seed=args.seed,
                          steps=args.steps, extractors=extractors, oracle=oracle, subject=args.subject)
    for name, value in result.overall.items():
        print(f"{name:>40}: {'not measured' if value is None else f'{value:.4f}'}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {args.output}/report.html")
    return 0


def cmd_ui(args) -> int:
    from dreambooth.ui import serve

    return serve(args.host, args.port, args.workspace, allow_hosts=tuple(args.allow_host))
