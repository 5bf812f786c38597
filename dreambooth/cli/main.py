"""`dreambooth` command line: thin wrappers over the library API.

The command names and exit codes are a stable contract that scripts rely on."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from dreambooth.errors import DreamboothError

EXIT_BAD_INPUT = 2
MAX_IMAGES = 1000  # generate --num: images per prompt
EXIT_STOPPED = 130  # 128 + SIGINT, what shells report for Ctrl-C; SIGTERM gives 143


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args) or 0
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
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("token", help="suggest rare single-token identifiers")
    t.add_argument("--count", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_token)

    pr = sub.add_parser("priors", help="generate (or reuse) class images for prior preservation")
    pr.add_argument("--model", required=True)
    pr.add_argument("--class-noun", required=True)
    pr.add_argument("--num", type=int, default=200)
    pr.add_argument("--cache", default=None, help="cache folder (default ~/.cache/dreambooth/class-images)")
    pr.add_argument("--prompt", default="a photo of a {class}")
    pr.add_argument("--resolution", type=int, default=None)
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="prior.key=value")
    pr.set_defaults(func=cmd_priors)

    tr = sub.add_parser("train", help="fine-tune with DreamBooth")
    tr.add_argument("--images", required=True)
    tr.add_argument("--identifier", default="sks")
    tr.add_argument("--class-noun", required=True)
    tr.add_argument("--model", default=None, help="overrides the preset's model.name")
    tr.add_argument("--output", required=True)
    tr.add_argument("--preset", default="sd15-full")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="delete an existing run in --output first")
    tr.add_argument("--eval-every", type=int, default=None, help="score the model every N steps")
    tr.add_argument("--select", choices=["last", "best"], default=None,
                    help="best: keep the scored checkpoint with the best fidelity/prompt/drift trade-off")
    tr.add_argument("--export", default="", metavar="FORMATS",
                    help="comma-separated formats to write to RUN_DIR/export/ at the end, e.g. single-file,lora-kohya")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="group.key=value")
    tr.add_argument("--help-config", action=_HelpConfig, help="list every group.key with its default, help and "
                    "allowed range, then exit")
    tr.set_defaults(func=cmd_train)

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
    g.add_argument("--sampler", default="dpmpp", choices=["dpmpp", "ddim", "pndm", "euler"])
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--output", required=True)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="train on the built-in toy world and write a gallery")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--model", default=None, help="default: toy (or tiny-random if toy is not installed)")
    d.add_argument("--steps", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub) -> None:
    """export, evaluate and ui live in their own modules; each registers its own options."""
    from dreambooth.cli import commands, plan

    commands.register(sub)
    plan.register(sub)


class _HelpConfig(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from dreambooth.config import describe_config

        print(describe_config())
        parser.exit()


def check_flags(checks: list[tuple[tuple, object, str]]) -> None:
    """Check command-line numbers, (bounds, value, flag) each; `bounds_of` gives the bounds of the
    config field a flag feeds, so the CLI and the config accept the same values."""
    from dreambooth.config_ranges import value_problems
    from dreambooth.errors import ConfigError

    problems = [p for bounds, value, flag in checks if value is not None for p in value_problems(flag, value, bounds)]
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the options", problems)


def cmd_check(args) -> int:
    from dreambooth.config import DataConfig
    from dreambooth.config_ranges import bounds_of
    from dreambooth.data.images import check_images

    check_flags([(bounds_of(DataConfig, "resolution"), args.resolution, "--resolution")])
    report = check_images(args.images, args.resolution)
    print(report.summary())
    if args.identifier:
        from dreambooth.identifier import check_identifier
        from dreambooth.models.builtin import TOKENIZER_DIR
        from transformers import CLIPTokenizer

        problems = check_identifier(CLIPTokenizer.from_pretrained(TOKENIZER_DIR), args.identifier,
                                    args.class_noun or "")
        for problem in problems:
            print(f"  - {problem}")
        if any(p.severity == "error" for p in problems):
            return EXIT_BAD_INPUT
    return 0


def cmd_token(args) -> int:
    from transformers import CLIPTokenizer

    from dreambooth.identifier import suggest_identifiers
    from dreambooth.models.builtin import TOKENIZER_DIR

    for word in suggest_identifiers(CLIPTokenizer.from_pretrained(TOKENIZER_DIR), args.count, seed=args.seed):
        print(word)
    return 0


def cmd_priors(args) -> int:
    import dataclasses

    from dreambooth.config import load_config
    from dreambooth.models import load_components
    from dreambooth.sampling import default_device, make_pipeline
    from dreambooth.priors import ensure_class_images
    from dreambooth.priors import class_image_key

    overrides = {"model": {"name": args.model}, "prior": {"num_images": args.num},
                 "data": {"class_noun": args.class_noun, "class_prompt": args.prompt,
                          "resolution": 512 if args.resolution is None else args.resolution}}
    if args.cache:
        overrides["prior"]["cache"] = args.cache
    config = load_config(None, overrides, args.overrides)  # validated before any weights load
    components = load_components(config.model.name)
    if args.resolution is None:  # the model's native size
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=components.resolution))
    bar = _bar("class images", args.num)
    paths = ensure_class_images(
        class_image_key(components.folder, config), args.num,
        lambda: make_pipeline(components.to(default_device()), config.prior.sampler),
        cache_dir=config.prior.cache or None, batch_size=config.prior.batch_size,
        progress=lambda done, total: _advance(bar, done),
    )
    bar.close()
    print(f"{len(paths)} class images in {paths[0].parent}")
    return 0


def cmd_train(args) -> int:
    from dreambooth.config import load_config
    from dreambooth.training import train_events
    from dreambooth.training.loop import stop_on_signals

    overrides = {"data": {"images": args.images, "identifier": args.identifier, "class_noun": args.class_noun}}
    if args.model:
        overrides["model"] = {"name": args.model}
    if args.steps is not None:
        overrides["train"] = {"steps": args.steps}
    overrides["eval"] = {k: v for k, v in (("every", args.eval_every), ("select", args.select)) if v is not None}
    config = load_config(args.preset, overrides, args.overrides)
    formats = [f.strip() for f in args.export.split(",") if f.strip()]
    if formats:
        from dreambooth.formats.exporters import check_formats

        check_formats(formats, config.train.mode)  # a typo fails now, not after an hour of training
    stop = threading.Event()
    with stop_on_signals(stop) as caught:
        last = render_training(train_events(config, args.output, resume=args.resume,
                                            overwrite=args.overwrite, stop=stop))
    from dreambooth.training import events as ev

    if isinstance(last, ev.Stopped):  # a distinct status, so scripts do not take it for a finished run
        return 128 + caught[0] if caught else EXIT_STOPPED
    if formats and isinstance(last, ev.Finished):
        from dreambooth.formats.exporters import export_after_training

        for path in export_after_training(args.output, formats):
            print(f"exported {path}")
    return 0 if last is not None else 1


def render_training(events):
    """Print notices, show progress bars for class images and steps; return the last event."""
    from dreambooth.training import events as ev

    bars, last = {}, None
    for last in events:
        if isinstance(last, ev.Notice):
            print(last.message, file=sys.stderr)
        elif isinstance(last, ev.ClassImagesProgress):
            bar = bars.setdefault("class", _bar("class images", last.total))
            _advance(bar, last.done)
        elif isinstance(last, ev.Started):
            if "class" in bars:
                bars.pop("class").close()
            print(f"training {last.trainable_params:,} parameters on {last.device} "
                  f"(mixed precision: {last.mixed_precision}), steps {last.start_step}->{last.total_steps}")
            bars["steps"] = _bar("steps", last.total_steps, initial=last.start_step)
        elif isinstance(last, ev.StepDone):
            bar = bars["steps"]
            bar.set_postfix(loss=f"{last.loss:.4f}", prior=f"{last.prior_loss:.4f}", lr=f"{last.lr:.2e}")
            _advance(bar, last.step)
        elif isinstance(last, (ev.SampleWritten, ev.CheckpointSaved)):
            bars["steps"].write(f"step {last.step}: wrote {last.path}")
        elif isinstance(last, ev.Evaluated):
            scores = ", ".join(f"{k} {last.scores.get(k)}" for k in ("fidelity", "prompt_fidelity", "drift"))
            bars["steps"].write(f"step {last.step}: {scores}")
        elif isinstance(last, ev.Selected):
            bars["steps"].write(f"kept step {last.step}: {last.reason}")
        elif isinstance(last, ev.Stopped):
            bar = bars.get("steps") or bars.get("class")  # stopped during class images: no steps bar yet
            bar.write(f"stopped at step {last.step}; resume with --resume (checkpoint {last.checkpoint})")
        elif isinstance(last, ev.Finished):
            bars.pop("steps").close()
            print(f"done in {last.seconds:.1f} s: {last.final}")
    for bar in bars.values():
        bar.close()
    return last


def cmd_generate(args) -> int:
    from dreambooth.config import DataConfig, PriorConfig, TrainConfig
    from dreambooth.config_ranges import bounds_of
    from dreambooth.generate import GenerationSettings, generate, read_prompts

    check_flags([((1, MAX_IMAGES, False, None), args.num, "--num"),
                 (bounds_of(DataConfig, "resolution"), args.resolution, "--resolution"),
                 (bounds_of(PriorConfig, "steps"), args.steps, "--steps"),
                 (bounds_of(PriorConfig, "guidance"), args.guidance, "--guidance"),
                 (bounds_of(TrainConfig, "seed"), args.seed, "--seed"), (None, args.lora_scale, "--lora-scale")])
    settings = GenerationSettings(steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt,
                                  sampler=args.sampler, resolution=args.resolution, lora_scale=args.lora_scale)
    paths = generate(args.model, read_prompts(args.prompt, args.prompt_file), args.output, num=args.num,
                     seed=args.seed, settings=settings, lora=args.lora)
    print(f"wrote {len(paths)} images and a grid to {args.output}")
    return 0


def cmd_demo(args) -> int:
    from dreambooth.demo import run_demo

    run_demo(args.output, model=args.model, steps=args.steps, render=render_training)
    return 0


def _bar(desc: str, total: int, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                disable=os.environ.get("DREAMBOOTH_NO_PROGRESS") == "1")


def _advance(bar, done: int) -> None:
    bar.update(done - bar.n)


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
    import warnings

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
