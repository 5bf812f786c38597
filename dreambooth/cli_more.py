"""Subcommands that wrap larger modules: export, evaluate, ui."""
from __future__ import annotations


def register(sub) -> None:
    e = sub.add_parser("export", help="write the trained model in another format")
    e.add_argument("run_dir")
    e.add_argument("--format", required=True, choices=["diffusers", "single-file", "lora-peft", "lora-kohya"])
    e.add_argument("--output", required=True)
    e.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("evaluate", help="score a run with the DreamBooth benchmark metrics")
    v.add_argument("--model", required=True)
    v.add_argument("--images", required=True)
    v.add_argument("--identifier", required=True)
    v.add_argument("--class-noun", required=True)
    v.add_argument("--output", required=True)
    v.set_defaults(func=cmd_evaluate)

    u = sub.add_parser("ui", help="start the local web app")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.set_defaults(func=cmd_ui)


def _not_ready(what: str) -> int:
    import sys

    print(f"error: '{what}' is not available in this version yet", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    return _not_ready("export")


def cmd_evaluate(args) -> int:
    return _not_ready("evaluate")


def cmd_ui(args) -> int:
    return _not_ready("ui")
