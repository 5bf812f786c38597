"""The commands on the way to a trained model: check, token, priors, train, generate and demo.

Each is a thin wrapper over the library: it checks the numbers the command line feeds the config
against the same bounds the config uses, calls the library and prints progress. Their options are
in `cli.main`, which imports this module only for the command that runs.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading

from tqdm import tqdm
from transformers import CLIPTokenizer

from dreambooth.cli.launch import check_processes, run_launched
from dreambooth.cli.main import EXIT_BAD_INPUT, EXIT_STOPPED
from dreambooth.cli.plan import format_plan
from dreambooth.config import DataConfig, PriorConfig, TrainConfig, load_config
from dreambooth.config_ranges import bounds_of, value_problems
from dreambooth.data.images import check_images
from dreambooth.demo import resolve_subject, run_demo
from dreambooth.errors import ConfigError, Problem
from dreambooth.formats.exporters import check_formats, export_after_training
from dreambooth.generate import GenerationSettings, generate, read_prompts
from dreambooth.identifier import check_identifier, suggest_identifiers
from dreambooth.models import load_components
from dreambooth.models.builtin import TOKENIZER_DIR
from dreambooth.planning import pick_preset
from dreambooth.priors import class_image_key, ensure_class_images
from dreambooth.ranks import launched_rank
from dreambooth.sampling import make_pipeline, pick_device
from dreambooth.training import events as ev
from dreambooth.training import train_events
from dreambooth.training.loop import stop_on_signals
from dreambooth.training.memory import memory_table

MAX_IMAGES = 1000  # generate --num: images per prompt


def check_flags(checks: list[tuple[tuple, object, str]]) -> None:
    """Check command-line numbers, (bounds, value, flag) each; `bounds_of` gives the bounds of the
    config field a flag feeds, so the CLI and the config accept the same values."""
    problems = [p for bounds, value, flag in checks if value is not None for p in value_problems(flag, value, bounds)]
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the options", problems)


def cmd_check(args) -> int:
    check_flags([(bounds_of(DataConfig, "resolution"), args.resolution, "--resolution")])
    report = check_images(args.images, args.resolution)
    print(report.summary())
    if args.identifier:
        problems = check_identifier(CLIPTokenizer.from_pretrained(TOKENIZER_DIR), args.identifier,
                                    args.class_noun or "")
        for problem in problems:
            print(f"  - {problem}")
        if any(p.severity == "error" for p in problems):
            return EXIT_BAD_INPUT
    return 0


def cmd_token(args) -> int:
    for word in suggest_identifiers(CLIPTokenizer.from_pretrained(TOKENIZER_DIR), args.count, seed=args.seed):
        print(word)
    return 0


def cmd_priors(args) -> int:
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
        lambda: make_pipeline(components.to(pick_device(config.train.device)), config.prior.sampler),
        cache_dir=config.prior.cache or None, batch_size=config.prior.batch_size,
        progress=lambda done, total: _advance(bar, done), previews=args.num,  # asked for: every PNG
    )
    bar.close()
    print(f"{len(paths)} class images in {paths[0].parent}")
    return 0


def cmd_train(args) -> int:
    overrides = {"data": {"images": args.images, "identifier": args.identifier, "class_noun": args.class_noun}}
    if args.model:
        overrides["model"] = {"name": args.model}
    if args.steps is not None:
        overrides["train"] = {"steps": args.steps}
    overrides["eval"] = {k: v for k, v in (("every", args.eval_every), ("select", args.select)) if v is not None}
    config = load_config(_preset(args), overrides, args.overrides)
    formats = [f.strip() for f in args.export.split(",") if f.strip()]
    if formats:
        check_formats(formats, config.train.mode)  # a typo fails now, not after an hour of training
    if args.gpus is not None:
        check_processes(args.gpus, config.train.device)
        if args.gpus > 1:
            return run_launched(args.gpus, args.argv)
    main = launched_rank() == 0  # one process of several prints nothing but errors, and exports nothing
    stop = threading.Event()
    with stop_on_signals(stop) as caught:
        events = train_events(config, args.output, resume=args.resume, overwrite=args.overwrite, stop=stop)
        last = render_training(events) if main else _last(events)
    if isinstance(last, ev.Stopped):  # a distinct status, so scripts do not take it for a finished run
        return 128 + caught[0] if caught else EXIT_STOPPED
    if formats and isinstance(last, ev.Finished) and main:
        for path in export_after_training(args.output, formats):
            print(f"exported {path}")
    return 0 if last is not None else 1


def _preset(args) -> str:
    """The --preset given, or for `auto` the tier preset the plan picks for --model on this card."""
    if args.preset != "auto":
        return args.preset
    if not args.model:
        raise ConfigError("--preset auto needs --model", [
            Problem("--model", "name the base model (hub id, folder or file), e.g. --model "
                    "stabilityai/stable-diffusion-2-1: the preset is chosen for its family")])
    result, found = pick_preset(args.model)
    print(format_plan(result, args.model, found), file=sys.stderr)
    return result.best


def _last(events):
    """Run the events through, rendering none; return the last."""
    last = None
    for last in events:
        pass
    return last


def render_training(events):
    """Print notices, show progress bars for class images and steps; return the last event."""
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
            if last.memory:
                print(memory_table(last.memory))
    for bar in bars.values():
        bar.close()
    return last


def cmd_generate(args) -> int:
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
    from dreambooth.toyworld.identities import describe_look, named_identity

    subject = resolve_subject(args.subject)
    picked = "" if args.subject else " (picked at random from the held-out identities; --subject repeats it)"
    print(f"subject: {subject}, {describe_look(named_identity(subject))}{picked}", flush=True)
    figures = run_demo(args.output, model=args.model, steps=args.steps, subject=subject, render=render_training)
    after = figures.get("after", {})
    if after:
        print("after training: " + ", ".join(f"{k} {after[k]:.2f}" for k in
                                              ("subject_fidelity", "prompt_fidelity", "language_drift")
                                              if isinstance(after.get(k), float)), flush=True)
    return 0


def _bar(desc: str, total: int, initial: int = 0):
    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                disable=os.environ.get("DREAMBOOTH_NO_PROGRESS") == "1")


def _advance(bar, done: int) -> None:
    bar.update(done - bar.n)
