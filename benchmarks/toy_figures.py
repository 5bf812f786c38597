"""The toy world's DreamBooth figures: the demo for every named subject, and the ablation without
prior preservation, each scored by the oracle (issue 4's targets).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_figures.py --out toy-figures/

Writes toy-figures/figures.json and prints a markdown table for benchmarks/RESULTS-toy.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

# (subject, prior preservation, extra --set): the ablation keeps the last step, like the run it is
# compared with would without selection; with select=best it would dodge the drift by stopping early.
RUNS = [("dog", True, []), ("dog", False, ["eval.select=last"]), ("dog", False, []), ("cat", True, []),
        ("teapot", True, []), ("backpack", True, [])]
COLUMNS = ("subject_fidelity", "prompt_fidelity", "language_drift", "class_accuracy_class_prompt")


def main() -> None:
    from dreambooth.demo import run_demo

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", default=None, help="run names, e.g. dog-noprior-last")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for subject, prior, extra in RUNS:
        name = f"{subject}-{'prior' if prior else 'noprior'}" + ("-last" if extra else "")
        if args.only and name not in args.only:
            continue
        began = time.perf_counter()
        figures = run_demo(args.out / name, subject=subject, prior=prior, extra=extra)
        figures["wall_seconds"] = round(time.perf_counter() - began, 1)
        rows.append({"run": name, **figures})
        (args.out / f"figures{'-' + '-'.join(args.only) if args.only else ''}.json").write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
             "2 cores, CPU fp32", "runs": rows}, indent=1))
        print(table(rows), flush=True)


def table(rows: list[dict]) -> str:
    head = "| run | selected step | " + " | ".join(f"{c} before -> after" for c in COLUMNS) + " | wall s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        cells = [f"{_f(r.get('before', {}).get(c))} -> {_f(r.get('after', {}).get(c))}" for c in COLUMNS]
        lines.append(f"| {r['run']} | {r.get('selected_step', '-')} | " + " | ".join(cells)
                     + f" | {r['wall_seconds']} |")
    return "\n".join(lines)


def _f(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
