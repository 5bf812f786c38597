"""`dreambooth` command line: the parser of every command, and `main`, which runs one.

The commands themselves live in `cli.train` (check, token, priors, train, generate, demo) and
`cli.commands` (export, evaluate, ui). They import torch and diffusers, so `main` imports the module
of the one command that runs, after parsing: `dreambooth --help` and a mistyped option answer at once.
The command names and exit codes are a stable contract that scripts rely on.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from dreambooth.config import SAMPLERS, describe_config
from dreambooth.errors import DreamboothError

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130  # 128 + SIGINT, what shells report for Ctrl-C; SIGTERM gives 143


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --gpus` hands the launcher
    _quiet_libraries()
    module, name = args.run.split(".")
    command = getattr(importlib.import_module(f"dreambooth.cli.{module}"), name)
    try:
        return command(args) or 0
    except DreamboothError as e:
        print(f"error: {e.report()}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreambooth", description="Personalize Stable Diffusion with DreamBooth.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a folder of subject photos (nothing is loaded or trained)")
    c.add_argument("images")
    c.add_argument("--identifier", default=None)
    c.add_argument("--class-noun", default=None)
    c.add_argument("--resolution", type=int, default=512)
    c.set_defaults(run="train.cmd_check")

    t = sub.add_parser("token", help="suggest rare single-token identifiers")
    t.add_argument("--count", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run="train.cmd_token")

    pr = sub.add_parser("priors", help="generate (or reuse) class images for prior preservation")
    pr.add_argument("--model", required=True)
    pr.add_argument("--class-noun", required=True)
    pr.add_argument("--num", type=int, default=200)
    pr.add_argument("--cache", default=None, help="cache folder (default ~/.cache/dreambooth/class-images)")
    pr.add_argument("--prompt", default="a photo of a {class}")
    pr.add_argument("--resolution", type=int, default=None)
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="prior.key=value")
    pr.set_defaults(run="train.cmd_priors")

    tr = sub.add_parser("train", help="fine-tune with DreamBooth")
    tr.add_argument("--images", required=True)
    tr.add_argument("--identifier", default="sks")
    tr.add_argument("--class-noun", required=True)
    tr.add_argument("--model", default=None, help="overrides the preset's model.name")
    tr.add_argument("--output", required=True)
    tr.add_argument("--preset", default="sd15-full",
                    help="a preset name or YAML file; auto: the tier preset that fits this GPU for --model "
                         "(what `dreambooth plan` prints)")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="delete an existing run in --output first")
    tr.add_argument("--eval-every", type=int, default=None, help="score the model every N steps")
    tr.add_argument("--select", choices=["last", "best"], default=None,
                    help="best: keep the scored checkpoint with the best fidelity/prompt/drift trade-off")
    tr.add_argument("--export", default="", metavar="FORMATS",
                    help="comma-separated formats to write to RUN_DIR/export/ at the end, e.g. single-file,lora-kohya")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="group.key=value")
    tr.add_argument("--gpus", type=int, default=None, metavar="N",
                    help="train data-parallel on N GPUs: starts N processes through accelerate's launcher "
                         "(with --set train.device=cpu: N CPU processes); train.batch_size is the global batch")
    tr.add_argument("--help-config", action=_HelpConfig, help="list every group.key with its default, help and "
                    "allowed range, then exit")
    tr.set_defaults(run="train.cmd_train")

    g = sub.add_parser("generate", help="render images from a run directory or a model")
    g.add_argument("--model", required=True, help="run directory or MODEL")
    g.add_argument("--lora", default=None)
    g.add_argument("--prompt", action="append", default=[])
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--num", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--sampler", default="dpmpp", choices=SAMPLERS)
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--output", required=True)
    g.set_defaults(run="train.cmd_generate")

    d = sub.add_parser("demo", help="train on the built-in toy world and write a gallery")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--model", default=None, help="default: toy (or tiny-random if toy is not installed)")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--subject", default=None, help="a built-in toy subject (dog, cat, teapot, backpack) or "
                   "id:<seed>; default: an identity picked at random from the held-out pool")
    d.set_defaults(run="train.cmd_demo")

    e = sub.add_parser("export", help="write the trained model in another format")
    e.add_argument("run_dir")
    e.add_argument("--format", required=True, choices=_Exporters("formats"), metavar="FORMAT",
                   help="one of %(choices)s; lora = lora-kohya, which A1111, Forge, ComfyUI and diffusers all "
                   "load; lora-peft is read by diffusers only (its alpha needs diffusers >= 0.34)")
    e.add_argument("--output", required=True)
    e.add_argument("--dtype", default="fp16", choices=_Exporters("dtypes"), metavar="DTYPE",
                   help="weight precision, one of %(choices)s (default fp16, as A1111/ComfyUI share them); a "
                   "diffusers folder keeps fp32 weights and adds this as a variant (variant=\"fp16\")")
    e.set_defaults(run="commands.cmd_export")

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
    v.add_argument("--oracle", action="store_true", help="toy-world runs: score with the toy oracle and "
                   "identity embedding (any toy subject, built-in or known only from --images)")
    v.add_argument("--subject", default=None, help="built-in toy subject for --oracle (default: the class "
                   "noun); photos that show another subject are scored from the photos alone")
    v.set_defaults(run="commands.cmd_evaluate")

    u = sub.add_parser("ui", help="start the local web app")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--workspace", default=None,
                   help="where jobs, uploads and runs are kept (default: ~/.cache/dreambooth/ui)")
    u.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this host name (e.g. the machine's name on the LAN); repeatable")
    u.set_defaults(run="commands.cmd_ui")

    pl = sub.add_parser("plan", help="read the GPU, list the tier presets for MODEL that fit it, pick the best")
    pl.add_argument("--model", required=True, help="MODEL: hub id, diffusers folder, single file, or a built-in")
    pl.add_argument("--gpu-memory", default=None, metavar="SIZE",
                    help="plan for this much GPU memory (e.g. 16GB) instead of the card's own, or without a GPU")
    pl.add_argument("--family", default=None, choices=["sd15", "sd21", "sdxl", "tiny", "tiny-xl", "toy"],
                    help="the model's family when it cannot be told offline (e.g. an uncached hub id)")
    pl.set_defaults(run="plan.cmd_plan")

    b = sub.add_parser("batch", help="train many subjects from a manifest, one run directory each (Ray or local GPUs)")
    b.add_argument("manifest", help="YAML file listing the subjects (see the README's 'Many subjects')")
    b.add_argument("--output", default=None, help="the batch folder (default: the manifest's output:, or a folder "
                   "named after the manifest beside it)")
    b.add_argument("--backend", default="auto", choices=["auto", "ray", "local"],
                   help="ray: Ray tasks with one GPU each; local: one worker process per visible GPU (or one on "
                   "the CPU); auto: ray when installed")
    b.add_argument("--ray-address", default=None, help="the Ray cluster to join, e.g. auto (default: RAY_ADDRESS, "
                   "else a Ray started for this batch)")
    b.add_argument("--workers", type=int, default=None, help="local backend: worker processes (default: one per GPU)")
    b.set_defaults(run="batch.cmd_batch")
    return p


class _HelpConfig(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(describe_config())
        parser.exit()


class _Exporters(Sequence):
    """The export formats (with their aliases) or dtypes, as `formats.exporters` defines them.

    That module imports torch, so it is read only when argparse checks a value or prints the export
    command's help (hence the explicit metavars: argparse would otherwise list choices while building).
    """

    def __init__(self, which: str):
        self.which = which

    def _names(self) -> tuple[str, ...]:
        from dreambooth.formats import exporters  # torch-heavy; see the class docstring

        return (*exporters.FORMATS, *exporters.ALIASES) if self.which == "formats" else tuple(exporters.DTYPES)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


# Start-up messages of optional libraries that do not apply to us: diffusers imports torchao (when
# installed) for its quantizers, and torchao then reports each prebuilt kernel this torch build cannot
# load and registers enums that torch now deprecates. Dropped by exact text, so other warnings surface.
HARMLESS_LOGS = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def _quiet_libraries() -> None:
    """Library progress bars, advice and known-harmless start-up noise would bury ours; errors still
    surface. Done here, at the command-line boundary: the library itself changes no global logging."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name, fragments in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
