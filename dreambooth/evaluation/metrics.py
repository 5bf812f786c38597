"""The DreamBooth metrics as pure functions on embedding tensors.

Ruiz et al. (CVPR 2023), sec. 4.1 and 4.3:
- DINO: mean pairwise cosine similarity between ViT-S/16 DINO CLS embeddings of generated and real
  subject images (subject fidelity; preferred over CLIP-I because it tells apart subjects of the
  same class).
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine between the CLIP text embedding of the prompt and the CLIP image embedding
  (prompt fidelity).
- PRES: DINO similarity between images of the plain class prompt ("a dog") from the fine-tuned
  model and the real subject images; high PRES means the class collapsed onto the subject
  (language drift).
- DIV: diversity among images of the same prompt. The paper uses LPIPS; see `within_set_diversity`
  for what we use instead.

Embeddings are (N, D) tensors; they are L2-normalised here again, so any extractor output works.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Short definitions for reports and --help, keyed like the metrics dict.
METRIC_DEFINITIONS: dict[str, str] = {
    "dino": "Subject fidelity: mean cosine of DINO ViT-S/16 CLS embeddings, generated vs real "
            "subject images (Ruiz et al. 2023). Higher is better.",
    "clip_i": "Subject fidelity: mean cosine of CLIP image embeddings, generated vs real subject "
              "images. Higher is better.",
    "clip_t": "Prompt fidelity: mean cosine of CLIP text embedding of the prompt (identifier "
              "replaced by the class noun) and CLIP image embedding. Higher is better.",
    "pres": "Prior preservation: DINO similarity of plain class-prompt images ('a dog') from the "
            "fine-tuned model to the real subject images. Lower means less language drift.",
    "div": "Diversity: 1 - mean pairwise cosine of DINO embeddings among images of the same prompt. "
           "NOT the paper's LPIPS (no LPIPS weights here); compare only with itself.",
    "dino_real_images": "DINO similarity among distinct real subject images: the paper's "
                        "'Real Images' reference row for DINO.",
    "clip_i_real_images": "CLIP-I similarity among distinct real subject images: the paper's "
                          "'Real Images' reference row for CLIP-I.",
    "subject_similarity_standin": "Stand-in for DINO: the same formula on EfficientNet-Lite0 "
                                  "ImageNet features. Not comparable with published DINO numbers.",
    "pres_standin": "Stand-in for PRES: computed with EfficientNet-Lite0 features instead of DINO.",
    "div_standin": "Stand-in for DIV: 1 - mean pairwise cosine of EfficientNet-Lite0 features "
                   "among images of the same prompt (neither LPIPS nor DINO).",
    "subject_similarity_standin_real_images": "Stand-in similarity among distinct real subject "
                                              "images (reference for the stand-in fidelity).",
    "subject_fidelity": "Toy world, open set: mean cosine of identity-embedding vectors, generated "
                        "vs real subject images (the paper's DINO score), normalised per subject "
                        "between chance (other identities of the class, 0) and ceiling (other "
                        "renders of the subject, or leave-one-out among its photos, 1). Higher is better.",
    "subject_recognised": "Toy world: share of identifier-prompt images closer (identity embedding) to "
                          "the subject than to each of 64 random identities of its class.",
    "subject_identity_oracle": "Toy world, built-in subjects only: share of identifier-prompt images "
                               "that the oracle's closed-set identity head names as the subject.",
    "prompt_fidelity": "Toy world: share of identifier-prompt images that the oracle sees in the "
                       "context the prompt asks for. Higher is better.",
    "language_drift": "Toy world: share of plain class-prompt images ('a dog') closer (identity "
                      "embedding) to the subject than to each of 64 random identities of the class "
                      "drawn as the base model's training data draws them. Lower is better.",
    "class_accuracy": "Toy world: share of identifier-prompt images that the oracle sees as the "
                      "subject's class.",
    "class_accuracy_class_prompt": "Toy world: share of plain class-prompt images that the oracle "
                                   "sees as the class; a drop means the class prompt broke.",
    "div_oracle": "Toy world diversity: 1 - mean pairwise cosine of the oracle's pooled features "
                  "among images of the same prompt. Compare only with itself.",
    "subject_fidelity_real_images": "Toy world: subject_fidelity of the real photos themselves, "
                                    "leave-one-out (the 'Real Images' reference row); 1 by "
                                    "construction for a subject known only from its photos.",
}


def _normalise(x: Tensor) -> Tensor:
    """(N, D) rows scaled to unit length, in float64 so averages of many pairs stay exact."""
    if x.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got {tuple(x.shape)}")
    return torch.nn.functional.normalize(x.detach().to(torch.float64), dim=-1)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) cosine similarities between the rows of a (N, D) and b (M, D)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding sizes differ: {a.shape[-1]} vs {b.shape[-1]}")
    return _normalise(a) @ _normalise(b).T


def mean_pairwise_cosine(generated: Tensor, reference: Tensor) -> float:
    """Mean cosine over all N*M pairs of generated (N, D) and reference (M, D) embeddings.

    This is DINO and CLIP-I (reference = real subject images), PRES (generated = class-prompt
    images) and CLIP-T (reference = the (1, D) text embedding of the prompt), per Ruiz et al. 4.1.
    """
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one embedding on each side")
    return float(cosine_matrix(generated, reference).mean())


def mean_self_similarity(x: Tensor) -> float:
    """Mean cosine over the N*(N-1)/2 distinct pairs of rows of x (N, D); self-pairs excluded.

    On real subject images this is the paper's 'Real Images' reference (DINO 0.774, CLIP-I 0.885).
    """
    n = len(x)
    if n < 2:
        raise ValueError(f"self-similarity needs at least 2 embeddings, got {n}")
    sims = cosine_matrix(x, x)
    upper = torch.triu_indices(n, n, offset=1)
    return float(sims[upper[0], upper[1]].mean())


def within_set_diversity(x: Tensor) -> float:
    """DIV stand-in: 1 - mean cosine over distinct pairs of embeddings x (N, D) of one prompt.

    Ruiz et al. measure diversity as the mean LPIPS distance between images of the same prompt.
    We have no LPIPS weights offline, so we use the cosine distance of global image embeddings
    (DINO, or the stand-in extractor). It rises with variety in pose and layout like LPIPS does,
    but its scale differs: compare runs with each other, never with the paper's DIV numbers.
    0 means all images have the same embedding.
    """
    return 1.0 - mean_self_similarity(x)


def weighted_mean(values: list[float | None], weights: list[float]) -> float | None:
    """Mean of the values that are not None, weighted; None when nothing is left to average.

    Per-prompt scores are combined with weights equal to each prompt's number of pairs, so the
    overall value equals the pooled mean over all pairs (as if scored in one go).
    """
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    if not pairs or total == 0:
        return None
    return sum(v * w for v, w in pairs) / total
