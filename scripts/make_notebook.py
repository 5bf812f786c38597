"""Write examples/dreambooth.ipynb, the free-notebook-GPU walkthrough, from the cells below.

The notebook is generated so it stays reproducible and reviewable as Python. Usage:

    python scripts/make_notebook.py            # rewrites examples/dreambooth.ipynb

The cell tagged "parameters" holds every switch; tests/test_notebook.py replaces it with the tiny
settings (built-in tiny model, a few steps, no install, no download) and executes the notebook.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "dreambooth.ipynb"

INTRO = """\
# DreamBooth on a free notebook GPU

Fine-tune Stable Diffusion on 3-10 photos of your subject, then render it in new scenes. Made for a
free Colab or Kaggle T4 (16 GB, fp16 only): `dreambooth plan` reads the card and picks the tier preset
that fits it, e.g. `sd21-16gb` (SD 2.1 at 768 px, full UNet with prior preservation) on a T4.

Run the cells in order. Colab: *Runtime > Change runtime type > T4 GPU* first."""

PARAMETERS = """\
MODEL = "stabilityai/stable-diffusion-2-1"  # or "stable-diffusion-v1-5/stable-diffusion-v1-5"
IDENTIFIER = "sks"         # a rare word that will mean your subject
CLASS_NOUN = "dog"         # what your subject is
WORK = "dreambooth-work"   # photos, the run and the images go here
INSTALL = True             # pip install the package first (off where it is installed already)
PACKAGE = "./dreambooth"     # a checkout of this repository uploaded or cloned next to the notebook
TINY = False               # smoke test: the built-in tiny model, toy photos, a few steps, nothing downloaded
STEPS = None               # None: the preset's number of steps
SETTINGS = []              # extra --set group.key=value overrides for training
GENERATE_STEPS = 25        # sampler steps of the final images
NUM_IMAGES = 2             # images per prompt in the grid"""

TINY_SWITCH = """\
if TINY:  # everything small and local: what CI runs on a CPU
    MODEL, STEPS, GENERATE_STEPS, NUM_IMAGES = "tiny-random", 2, 2, 1"""

INSTALL_CELL = """\
import subprocess
import sys

if INSTALL:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PACKAGE], check=True)"""

HELPER = """\
import codecs
import re
from pathlib import Path


def dreambooth(*args, check=True):
    \"\"\"Run `dreambooth ARGS`, streaming its output here; return the output.\"\"\"
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decoder, text = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        text.append(decoder.decode(chunk))
        sys.stdout.write(text[-1])
        sys.stdout.flush()
    if proc.wait() and check:
        raise RuntimeError(f"dreambooth {args[0]} failed (exit code {proc.returncode}); see its output above")
    return "".join(text)"""

UPLOAD_MD = """\
## Your photos

3-10 photos of one subject, different backgrounds and angles. On Colab the cell opens a file
picker; on Kaggle, add the photos as a dataset and copy them into the folder it prints."""

UPLOAD = """\
PHOTOS = Path(WORK) / "photos"
PHOTOS.mkdir(parents=True, exist_ok=True)
if TINY:  # rendered photos of the toy world's dog stand in for yours
    from dreambooth.demo import write_subject_photos

    write_subject_photos(PHOTOS, "dog")
elif not any(PHOTOS.iterdir()):
    try:
        from google.colab import files
    except ImportError:
        raise SystemExit(f"put 3-10 photos of your subject into {PHOTOS.resolve()} and run this cell again")
    for name, data in files.upload().items():
        (PHOTOS / Path(name).name).write_bytes(data)
dreambooth("check", PHOTOS, "--identifier", IDENTIFIER, "--class-noun", CLASS_NOUN)"""

PLAN_MD = """\
## Which preset fits this GPU

`dreambooth plan` reads the card (name, memory, compute capability: a T4 has no native bf16, so
training runs in fp16) and lists the tier presets of the model's family with their fit."""

PLAN = """\
plan_output = dreambooth("plan", "--model", MODEL, check=False)
PRESET = re.search(r"^best preset: (\\S+)", plan_output, re.MULTILINE).group(1)
if PRESET == "none":
    raise SystemExit("no preset fits this machine: see the notes above")
print("training with preset", PRESET)"""

TRAIN = """\
RUN = Path(WORK) / "run"
args = ["train", "--preset", PRESET, "--model", MODEL, "--images", PHOTOS, "--identifier", IDENTIFIER,
        "--class-noun", CLASS_NOUN, "--output", RUN, "--overwrite"]  # --resume instead continues a stopped run
if STEPS:
    args += ["--steps", STEPS]
for setting in SETTINGS:
    args += ["--set", setting]
dreambooth(*args)"""

GENERATE = """\
from IPython.display import Image, display

OUT = Path(WORK) / "generated"
prompts = [f"a photo of {{identifier}} {{class}} {scene}" for scene in
           ("on the moon", "in a submarine", "flying with a cape")]
dreambooth("generate", "--model", RUN, *[a for p in prompts for a in ("--prompt", p)],
           "--num", NUM_IMAGES, "--steps", GENERATE_STEPS, "--output", OUT)
GRID = max(OUT.glob("grid-*.png"))  # the newest grid: one row per prompt
display(Image(filename=str(GRID)))"""


def build() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    cells = [md(INTRO), code(PARAMETERS, metadata={"tags": ["parameters"]}), code(TINY_SWITCH),
             code(INSTALL_CELL), code(HELPER), md(UPLOAD_MD), code(UPLOAD), md(PLAN_MD), code(PLAN),
             md("## Train"), code(TRAIN), md("## Your subject in new scenes"), code(GENERATE)]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"  # fixed ids: the same source gives the same file
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"gpuType": "T4"}}
    return notebook


def main(path: Path = NOTEBOOK) -> int:
    notebook = build()
    nbformat.validate(notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbformat.writes(notebook) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK))
