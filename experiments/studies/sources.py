"""Where each study's claims are made: per study, ``(phrase, source)`` pairs; a check's source
is that of the first phrase its claim contains (:func:`experiments.studies.common.source_of`).

The sources are the papers as summarised in ../shared/PAPERS.md (section numbers there), with
the paper's own section or figure where it is known. "Guard" marks a check that makes another
check meaningful (it is not a claim of the paper); "ours" marks a band or statistic that the
paper does not fix.
"""

from __future__ import annotations

_COHEN_2021 = "Cohen et al. 2021, §3 and Fig. 1 (PAPERS.md §5, full-batch reference)"
_EOSS = "Andreyev & Beneventano 2024, abstract and Definition 3 (PAPERS.md §5)"
_NOISE = "Zhang, Yang & Tu 2026 (PAPERS.md §4)"
_FISHER = "Ahmed, Sarmah & Dutta 2026, abstract (PAPERS.md §1)"
_QUOTIENT = "Dong & Cheng 2026 (PAPERS.md §2)"
_PS_FIG1 = "MacDonald, Valmadre & Lucey 2023, Fig. 1 (PAPERS.md §3, OpenReview reviews)"
_PS_FIG5 = "MacDonald, Valmadre & Lucey 2023, Fig. 5 (PAPERS.md §3, OpenReview reviews)"

SOURCES: dict[str, tuple[tuple[str, str], ...]] = {
    "edge_of_stability": (
        (
            "adaptive edge of stability",
            "Cohen et al. 2022, abstract and Fig. 1 (PAPERS.md, beyond the five papers)",
        ),
        ("progressive sharpening", _COHEN_2021),
        ("edge of stability", _COHEN_2021),
        ("loss keeps falling", _COHEN_2021 + "; final vs at-arrival loss is ours"),
    ),
    "edge_of_stochastic_stability": (
        ("batch sharpness settles", _EOSS),
        ("stays below", "Andreyev & Beneventano 2024, abstract (PAPERS.md §5)"),
        ("plateau grows", "Andreyev & Beneventano 2024, abstract (PAPERS.md §5)"),
        ("full-batch GD", _COHEN_2021),
    ),
    "noise_curvature": (
        ("1 ≤ γ ≤ 2", _NOISE + ": the theoretical bound"),
        ("γ ≈ 1", _NOISE + ": γ ≈ 1 reported for its (softmax) mse"),
        ("nearly commute", _NOISE + ": commutator against a random rotation; the 0.5 is ours"),
        ("C ∝ E_p[h_p²]", _NOISE + ": activity–weight duality, γ_AWD vs γ_emp; band ours"),
        ("γ(CE) > γ(MSE)", _NOISE + ": cross-entropy γ > 1, squared error γ ≈ 1"),
    ),
    "fisher_sharpness": (
        ("adaptive sharpness", "Kwon et al. 2021 (invariance by construction)"),
        ("compute the same function", "guard: the rescaling preserves the function"),
        ("changes under rescaling", "Dinh et al. 2017 (PAPERS.md §1)"),
        ("invariant", _FISHER),
        ("temperature", _FISHER + ": scaling with η/B; the direction is our reading"),
        ("loss gap", _FISHER + "; the rank-correlation comparison is ours"),
    ),
    "quotient_geometry": (
        ("vertical part", "guard: makes the vertical-motion check non-vacuous"),
        ("drift shrinks", "ours: first-order error of the discrete GD step"),
        ("conserved", _QUOTIENT + ": the rescaling symmetry's conserved quantity"),
        ("", _QUOTIENT),
    ),
    "progressive_sharpening": (
        ("Λ-weighted", "the paper's ansatz (PAPERS.md §3); our reading"),
        ("rise", _PS_FIG1),
        ("lowers", _PS_FIG5),
        ("tracks", _PS_FIG5),
    ),
}
