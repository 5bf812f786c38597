"""`dreambooth plan`: which tier preset fits this GPU for MODEL, with measured peaks where there are any."""
from __future__ import annotations

from dreambooth.model_family import ModelFamily, model_family
from dreambooth.planning import FAMILIES, Plan, plan, read_card

EXIT_NONE_FITS = 1  # the plan was made, but no preset fits: scripts should not go on to train
NOT_MEASURED = "not measured"


def cmd_plan(args) -> int:
    card = read_card(args.gpu_memory)
    found = ModelFamily(args.family, None, "--family") if args.family else model_family(args.model)
    result = plan(found.family, card)
    print(format_plan(result, args.model, found))
    return 0 if result.best else EXIT_NONE_FITS


def format_plan(result: Plan, model: str, found: ModelFamily) -> str:
    """The card, the model, one table row per preset of the family, notes, and the pick."""
    card = result.card
    if card.is_gpu:
        capability = (f"compute capability {card.capability[0]}.{card.capability[1]}" if card.capability
                      else "compute capability unknown")
        lines = [f"card: {card.name}, {card.memory_gb:.1f} GB ({card.usable_gb:.1f} GB usable), {capability}"]
    else:
        lines = ["card: none (CPU)"]
    size = f", {found.resolution} px" if found.resolution else ""
    lines.append(f"model: {model}: {FAMILIES.get(found.family, found.family)}{size} ({found.how})")
    table = [("preset", "trains", "px", "card", "fits", "precision", "measured peak", "steps/s", "measured on", "why")]
    for row in result.rows:
        t = row.tier
        table.append((t.preset, t.trains, str(t.resolution), f"{t.card_gb:g} GB" if t.needs_gpu else "any",
                      "yes" if row.fits else "no", row.precision,
                      NOT_MEASURED if t.measured_peak_gb is None else f"{t.measured_peak_gb:g} GB",
                      NOT_MEASURED if t.measured_steps_per_s is None else f"{t.measured_steps_per_s:g}",
                      t.measured_on or "-", row.why))
    if result.rows:
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += [""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table] + [""]
    notes = list(result.notes)
    best = next((r.tier for r in result.rows if r.tier.preset == result.best), None)
    if best and found.resolution and found.resolution != best.resolution:
        notes.append(f"{model} is native {found.resolution} px and {best.preset} trains at {best.resolution} px: "
                     f"add --set data.resolution={found.resolution}")
    lines += [f"note: {n}" for n in notes]
    lines.append(f"best preset: {result.best or 'none'}")
    if best:
        lines.append(f"train with: dreambooth train --preset {best.preset} --model {model} --images PHOTOS "
                     "--class-noun NOUN --output RUN")
    return "\n".join(lines)
