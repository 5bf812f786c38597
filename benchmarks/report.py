"""The results table of gpu_vs_reference.py: one row per measure, ratio to the reference, target."""
from __future__ import annotations


def _latest(results: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in results:
        if not r.get("skipped"):
            out[r["part"]] = r
    return out


def _fmt(x, unit: str = "", digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def _ratio(ours, ref) -> float | None:
    return ours / ref if ours and ref else None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def speed_rows(p: dict) -> list[list[str]]:
    get = lambda part, key: p.get(part, {}).get(key)  # noqa: E731
    rows = []
    for label, ref, ours, target in [("full UNet fine-tune, steps/s", "ref_full", "ours_full", 10),
                                     ("full UNet, torch.compile, steps/s", "ref_full", "ours_full_compile", 10),
                                     ("full UNet, contiguous layout, steps/s", "ref_full", "ours_full_nocl", 10),
                                     ("full UNet, our plain path, steps/s", "ref_full", "plain_full", None),
                                     ("LoRA r4, steps/s", "ref_lora", "ours_lora", 8),
                                     ("LoRA r4, torch.compile, steps/s", "ref_lora", "ours_lora_compile", 8)]:
        r, o = get(ref, "steps_per_s"), get(ours, "steps_per_s")
        x = _ratio(o, r)
        rows.append([label, _fmt(r), _fmt(o), _fmt(x, "x", 1), f">= {target}x" if target else "-",
                     _verdict(None if x is None or not target else x >= target)])
    ref_cls = get("ref_full", "class_images_per_s")
    for label, ours, target in [("class images/s, PNDM 50 (same UNet evals)", "ours_cls_pndm50", 4),
                                ("class images/s, PNDM 50, compiled UNet", "ours_cls_pndm50_compile", 4),
                                ("class images/s, our default DPM++ 25", "ours_cls_dpmpp25", None)]:
        o = get(ours, "images_per_s")
        x = _ratio(o, ref_cls)
        rows.append([label, _fmt(ref_cls), _fmt(o), _fmt(x, "x", 1), f">= {target}x" if target else "(end-to-end gain)",
                     _verdict(None if x is None or not target else x >= target)])
    return rows


def memory_rows(p: dict) -> list[list[str]]:
    get = lambda part, key: p.get(part, {}).get(key)  # noqa: E731
    rows = []
    for label, part, limit in [("reference full UNet", "ref_full", None), ("ours fast full UNet", "ours_full", None),
                               ("reference full + TE + grad. ckpt", "ref_full_te", None),
                               ("reference LoRA", "ref_lora", None), ("ours fast LoRA", "ours_lora", None),
                               ("ours fast full UNet, torch.compile", "ours_full_compile", None),
                               ("ours fast LoRA, torch.compile", "ours_lora_compile", None),
                               ("ours fast full UNet, torch.compile, FP8 AdamW", "ours_full_compile_fp8", None),
                               ("ours lean full UNet", "lean_full", 10),
                               ("ours lean full UNet, contiguous layout", "lean_full_nocl", 10),
                               ("ours lean full UNet, fp32 AdamW states", "lean_full_adamw", 10),
                               ("ours lean full UNet, no grad. checkpointing", "lean_full_nockpt", 10),
                               ("ours lean full UNet, expandable segments", "lean_full_expandable", 10),
                               ("ours lean full UNet, channels-last", "lean_full_cl", 10),
                               ("ours lean full UNet, no CUDA graph", "lean_full_nograph", 10),
                               ("ours lean full UNet, cuDNN workspace <= 256 MB", "lean_full_wscap", 10),
                               ("ours lean full UNet, channels-last, expandable segments", "lean_full_cl_expandable",
                                10),
                               ("ours lean full UNet, FP8 AdamW states", "lean_full_fp8", 10),
                               ("ours lean full UNet, FP8 states, checkpoint_levels=3", "lean_full_fp8_l3", 10),
                               ("ours lean full UNet, our fused FP8 AdamW", "lean_full_ours_fp8", 10),
                               ("ours lean LoRA", "lean_lora", 4),
                               ("ours lean LoRA, checkpoint_levels=1", "lean_lora_l1", 4),
                               ("ours sd15-lora-lean preset", "lean_lora_preset", 4),
                               ("ours lean LoRA, checkpoint_levels=2", "lean_lora_l2", 4),
                               ("ours lean LoRA, torch.compile", "lean_lora_compile", 4),
                               ("ours lean full + TE, 15 GB cap (16 GB card)", "lean_full_te16", 15),
                               ("ours lean full + TE, FP8 AdamW states, 15 GB cap", "lean_full_te16_fp8", 15),
                               ("ours lean full + TE, our fused FP8 AdamW, 15 GB cap", "lean_full_te16_ours_fp8", 15)]:
        alloc, reserved = get(part, "peak_allocated_gb"), get(part, "peak_reserved_gb")
        ran = part in p and not p[part].get("failed") and get(part, "steps_per_s") is not None
        ok = None if limit is None or part not in p else bool(ran and reserved is not None and reserved <= limit)
        rows.append([label, _fmt(alloc, " GB"), _fmt(reserved, " GB"), _fmt(get(part, "steps_per_s")),
                     f"<= {limit} GB" if limit else "-", _verdict(ok)])
    for lean, fast in [("lean_full", "ours_full"), ("lean_full_cl", "ours_full"),
                       ("lean_full_cl_expandable", "ours_full"), ("lean_full", "ours_full_compile"),
                       ("lean_lora", "ours_lora"), ("lean_full_fp8", "ours_full"), ("lean_full_fp8_l3", "ours_full"),
                       ("lean_full_ours_fp8", "ours_full"), ("lean_lora_l1", "ours_lora"),
                       ("lean_lora_preset", "ours_lora"), ("lean_lora_l2", "ours_lora"),
                       ("lean_lora_compile", "ours_lora_compile")]:
        a, b = get(lean, "steps_per_s"), get(fast, "steps_per_s")
        slower = 1 - a / b if a and b else None
        rows.append([f"{lean} vs {fast}: slower by", "", "", _fmt(slower and 100 * slower, " %", 0), "<= 25 %",
                     _verdict(None if slower is None else slower <= 0.25)])
    return rows


def e2e_rows(p: dict) -> list[list[str]]:
    ours = p.get("ours_e2e", {})
    ref = p.get("ref_full", {})
    total = ours.get("process_s") if ours.get("finished") else None
    estimate = None
    if ref.get("steps_per_s") and ref.get("class_images_per_s") and ref.get("startup_s"):
        gen = ref.get("generation_s") or 0.0
        estimate = (ref["startup_s"] - gen) + 200 / ref["class_images_per_s"] + 800 / ref["steps_per_s"]
    measured = p.get("ref_e2e", {}).get("total_s")
    reference = (_fmt(measured, " s (measured)", 1) if measured
                 else _fmt(estimate, " s (estimate, excl. validation+save)", 0))
    return [["paper recipe end to end (200 class images, 800 steps, 4 val. images, saved)",
             reference, _fmt(total, " s", 1), _fmt(_ratio(measured or estimate, total), "x", 1), "<= 60 s",
             _verdict(None if total is None else total <= 60)]]


def loss_rows(p: dict) -> list[list[str]]:
    a, b = p.get("ours_full", {}).get("losses"), p.get("plain_full", {}).get("losses")
    if not a or not b:
        return [["fast vs plain bf16 loss curve", "", "n/a", "", "bf16 tolerance", "n/a"]]
    n = min(len(a), len(b))
    diffs = [abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a[:n], b[:n])]
    return [[f"fast vs plain bf16 loss, first {n} steps (same seed)", f"max rel. diff {max(diffs):.2e}",
             f"median {sorted(diffs)[n // 2]:.2e}", f"step 1: {a[0]:.5f} vs {b[0]:.5f}", "bf16 (~1e-2)",
             _verdict(sorted(diffs)[n // 2] < 2e-2)]]


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def make_table(results: list[dict]) -> str:
    p = _latest(results)
    env = next((r["env"] for r in results if r.get("env")), {})
    parts = [" ".join(f"{k}={v}" for k, v in env.items()), "",
             _md(["measure", "reference", "ours", "ratio", "target", ""], speed_rows(p)), "",
             _md(["memory", "peak allocated", "peak reserved", "steps/s", "target", ""], memory_rows(p)), "",
             _md(["end to end", "reference", "ours", "ratio", "target", ""], e2e_rows(p)), "",
             _md(["correctness", "", "", "", "target", ""], loss_rows(p))]
    failed = [f"- {name}: {r.get('error_tail', '')[-300:]}" for name, r in p.items() if r.get("failed")]
    skipped = [f"- {r['part']}: skipped ({r['skipped']})" for r in results if r.get("skipped")]
    return "\n".join(parts + ([""] + failed if failed else []) + skipped) + "\n"
