"""The toy world: a procedural renderer, its oracle classifier and the built-in base model ``toy``.

No pretrained Stable Diffusion weights can be fetched offline, so DreamBooth is demonstrated on a
small SD-architecture model pretrained from scratch on this world (see MODEL_CARD.md).
"""

from pathlib import Path

from dreambooth.toyworld.render import (
                     CLASSES,
                     CONTEXTS,
                     SCENES,
                     SUBJECTS,
                     Spec,
                     caption,
                     identity_of,
                     random_spec,
                     render,
                     render_subject,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["CLASSES", "CONTEXTS", "SCENES", "SUBJECTS", "Spec", "caption", "identity_of", "random_spec",
           "render", "render_subject", "WEIGHTS_DIR"]
