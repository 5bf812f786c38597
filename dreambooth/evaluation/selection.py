"""Pick a checkpoint from its scores instead of by eye, and say why in words.

Ruiz et al. (CVPR 2023, sec. 4.3-4.4) show the trade-off training moves along: more steps raise
subject fidelity (DINO) but can cost prompt fidelity (CLIP-T, the model ignores the context) and
raise language drift (PRES, "a dog" turns into the subject). We keep the checkpoints that stay
within the user's limits on prompt fidelity and drift, and among those take the most faithful one.
A row per checkpoint comes from `selection_scores`, whichever scorer made the result.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from dreambooth.evaluation.results import (
    DINO_KEYS,
    ORACLE_KEYS,
    STANDIN_KEYS,
    EvaluationResult,
    format_score,
)

Row = Mapping[str, float | int | None]
REQUIRED = ("step", "fidelity", "prompt_fidelity", "drift")


def _check_rows(scores: Sequence[Row]) -> None:
    """Raise one ValueError listing every row that lacks a key or a fidelity value."""
    if not scores:
        raise ValueError("select_checkpoint needs at least one scored checkpoint")
    problems = [f"row {i}: missing {k!r}" for i, row in enumerate(scores) for k in REQUIRED if k not in row]
    problems += [f"row {i}: fidelity is None" for i, row in enumerate(scores)
                 if "fidelity" in row and row["fidelity"] is None]
    if problems:
        raise ValueError("cannot select a checkpoint: " + "; ".join(problems))


def limit_shortfall(row: Row, *, min_prompt_fidelity: float, max_drift: float) -> float:
    """How far a checkpoint is outside the limits: 0 when within both.

    Sum of (min_prompt_fidelity - prompt_fidelity) and (drift - max_drift) where positive. Both
    are cosine similarities, so the two shortfalls share a scale. A None value (metric not
    measured) does not count against the checkpoint.
    """
    pf, drift = row["prompt_fidelity"], row["drift"]
    short = max(0.0, min_prompt_fidelity - pf) if pf is not None else 0.0
    over = max(0.0, drift - max_drift) if drift is not None else 0.0
    return short + over


def select_checkpoint(
    scores: Sequence[Row], *, min_prompt_fidelity: float, max_drift: float
) -> tuple[int, str]:
    """(step, reason): the most subject-faithful checkpoint within the limits.

    scores: one dict per checkpoint with `step`, `fidelity` (DINO or stand-in), `prompt_fidelity`
    (CLIP-T) and `drift` (PRES; lower is better). Within the limits (prompt_fidelity >=
    min_prompt_fidelity and drift <= max_drift) the highest fidelity wins; ties go to the higher
    prompt fidelity, then the lower drift, then the earlier step (less training, less
    overfitting). When no checkpoint is within the limits, the fallback is the one closest to
    them (smallest `limit_shortfall`), then the highest fidelity, and the reason says that no
    checkpoint met the limits.
    """
    _check_rows(scores)
    within = [r for r in scores if limit_shortfall(
        r, min_prompt_fidelity=min_prompt_fidelity, max_drift=max_drift) == 0.0]
    unmeasured = [k for k in ("prompt_fidelity", "drift") if any(r[k] is None for r in scores)]
    caveat = f" ({', '.join(unmeasured)} not measured for some checkpoints: limit not applied there)" \
        if unmeasured else ""
    if within:
        best = max(within, key=lambda r: (r["fidelity"], _or(r["prompt_fidelity"], 0.0), -_or(r["drift"], 0.0),
                                          -r["step"]))
        reason = (f"step {best['step']}: highest subject fidelity {best['fidelity']:.3f} among "
                  f"{len(within)} of {len(scores)} checkpoints with prompt fidelity >= "
                  f"{min_prompt_fidelity} and drift <= {max_drift}{caveat}")
        return int(best["step"]), reason
    best = min(scores, key=lambda r: (limit_shortfall(
        r, min_prompt_fidelity=min_prompt_fidelity, max_drift=max_drift), -r["fidelity"], r["step"]))
    reason = (f"no checkpoint met the limits (prompt fidelity >= {min_prompt_fidelity}, drift <= "
              f"{max_drift}); step {best['step']} comes closest (prompt fidelity "
              f"{format_score(best['prompt_fidelity'])}, drift {format_score(best['drift'])}, subject fidelity "
              f"{best['fidelity']:.3f}){caveat}")
    return int(best["step"]), reason


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def selection_scores(result: EvaluationResult, step: int) -> dict[str, float | int | None]:
    """The row `select_checkpoint` takes: subject fidelity, prompt fidelity, drift.

    DINO (or stand-in) fidelity, CLIP-T and PRES for real models; the oracle's subject fidelity,
    prompt fidelity and language drift for the toy world.
    """
    keys = next((k for k in (ORACLE_KEYS, STANDIN_KEYS) if k.subject in result.overall), DINO_KEYS)
    return {
        "step": step,
        "fidelity": result.overall.get(keys.subject),
        "prompt_fidelity": result.overall.get(keys.prompt),
        "drift": result.overall.get(keys.pres),
    }


def select_and_explain(rows: Sequence[Row], *, min_prompt_fidelity: float,
                       max_drift: float) -> tuple[int, str]:
    """(step, reason): `select_checkpoint`'s choice, with the reason also comparing it with the
    last scored step (the one training ends on), in words for the log and the CLI.

    The most faithful checkpoint is often one that ignores prompts or has turned every "dog" into
    the subject, so the reason shows what the limits bought against simply training to the end.
    """
    step, reason = select_checkpoint(rows, min_prompt_fidelity=min_prompt_fidelity,
                                     max_drift=max_drift)
    last = max(rows, key=lambda r: r["step"])
    if last["step"] == step:
        return step, f"{reason}; this is the last scored step"
    chosen = next(r for r in rows if r["step"] == step)
    return step, (f"{reason}; the last scored step {last['step']} has subject fidelity "
                  f"{format_score(last['fidelity'])}, prompt fidelity {format_score(last['prompt_fidelity'])}, "
                  f"drift {format_score(last['drift'])} (chosen: {format_score(chosen['prompt_fidelity'])} "
                  f"prompt fidelity, {format_score(chosen['drift'])} drift)")
