"""Certified operating points: a risk bound for every threshold setting, and a choice that keeps it.

The claim, for a target (risk, ε, δ): with probability at least 1 − δ over the calibration sample,
the point chosen has risk ≤ ε on data drawn like it. Risks are the disagreement rate with the
final exit (no labels needed) and the accuracy drop against full depth.

How (Learn-then-Test with fixed-sequence testing, in the "Pareto testing" form of Laufer-Goldshtein
et al. 2023): validation is cut into the same seeded halves the frontier search uses. Half A
proposes the candidates (the thresholds Pareto-optimal there for accuracy against cost, as the
frontier search proposes, and also for agreement with the final exit against cost) and orders
them, safest first, by their risk on half A.
Half B, which neither proposed nor ordered anything, tests them in that order: candidate j passes
when its (1 − δ) upper confidence bound on B is ≤ ε, and testing stops at the first that fails.
Every candidate before the first failure is certified, together: a family-wise error of δ however
many candidates there are, since a wrong certification needs the first candidate with risk > ε to
pass its own level-δ test. Any certified candidate may then be chosen, here the cheapest in
expected MACs. Candidates not on the frontier are kept as certification's own operating points
(the frontier keeps the best accuracy for the cost; a point that agrees more with the final exit
for the cost is the cheaper answer to a disagreement target).
The full-depth point has both risks identically zero: it is certified without a test, and never
stops the sequence.

Bounds are exact binomial (Clopper–Pearson): disagreement is a count of n Bernoulli trials. The
accuracy drop is lost − gained answers (wrong where the final exit is right, and the reverse),
bounded by the upper bound on the lost rate minus the lower bound on the gained rate, δ/2 each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from branchserve.repo.binomial import lower_bound, upper_bound
from branchserve.repo.frontier import (
    NEVER,
    ExitScores,
    SearchKind,
    SearchSettings,
    exits_taken,
    full_thresholds,
    halves,
    operating_points,
    propose,
)
from branchserve.repo.manifest import (
    Candidate,
    Certificate,
    Certification,
    Guarantee,
    Manifest,
    OperatingPoint,
    RiskKind,
    StageLatency,
)
from branchserve.repo.tensors import Float64Array

METHOD = (
    "Learn-then-Test fixed-sequence testing: candidates proposed and ordered by risk on validation half A, "
    "tested in that order on half B with one-sided Clopper-Pearson bounds at delta, stopping at the first "
    "failure; accuracy drop bounded by the upper bound of the lost rate minus the lower bound of the "
    "gained rate, delta/2 each"
)
SHORT_METHOD = "LTT fixed-sequence, Clopper-Pearson"
RISKS: tuple[RiskKind, ...] = ("disagreement", "accuracy_drop")
Target = tuple[RiskKind, float, float]
"""(risk, ε, δ)."""
DEFAULT_TARGETS: tuple[Target, ...] = (("disagreement", 0.01, 0.05), ("accuracy_drop", 0.01, 0.05))
"""Recorded in a manifest when it is certified; a policy may ask for any other target."""


FULL_DEPTH = Guarantee(
    risk="disagreement", epsilon=0.0, delta=0.0, method="full depth: every answer is the final exit's", n=0, bound=0.0
)


class NotCertified(ValueError):
    """A certified target that a model cannot serve (no certification recorded); safe to show a client."""


def is_full_depth(thresholds: Sequence[float]) -> bool:
    return all(t >= NEVER for t in thresholds[:-1])


def risk_bound(c: Candidate, risk: RiskKind, n: int, delta: float) -> float:
    """The candidate's (1 − δ) upper confidence bound on `risk` from its half-B counts."""
    if is_full_depth(c.thresholds):
        return 0.0
    if risk == "disagreement":
        return upper_bound(c.disagreements, n, delta)
    return max(0.0, upper_bound(c.lost, n, delta / 2) - lower_bound(c.gained, n, delta / 2))


def sequence(cert: Certification, risk: RiskKind) -> list[Candidate]:
    """The fixed order of testing: by risk on half A, safest first (ties: the stored order, costliest first)."""
    key = {"disagreement": lambda c: c.proposal_disagreement, "accuracy_drop": lambda c: c.proposal_accuracy_drop}
    return sorted(cert.candidates, key=key[risk])  # sorted() is stable


def certified(cert: Certification, risk: RiskKind, epsilon: float, delta: float) -> list[tuple[Candidate, float]]:
    """Full depth (risk exactly 0, nothing to test), then fixed-sequence testing of the rest: every
    candidate before the first whose bound exceeds ε, with its bound."""
    passed = [(c, 0.0) for c in cert.candidates if is_full_depth(c.thresholds)]
    for c in sequence(cert, risk):
        if is_full_depth(c.thresholds):
            continue
        bound = risk_bound(c, risk, cert.n, delta)
        if bound > epsilon:
            break
        passed.append((c, bound))
    return passed


def _cheapest(
    cert: Certification, macs: dict[str, float], risk: RiskKind, epsilon: float, delta: float
) -> tuple[str, float]:
    """The cheapest certified candidate (its point's name and bound); full depth is always certified."""
    passed = [(c.point, b) for c, b in certified(cert, risk, epsilon, delta)]
    if not passed:  # only a hand-made certification without the full-depth point
        raise NotCertified(f"no candidate is certified for {risk} ≤ {epsilon} at risk {delta}")
    return min(passed, key=lambda pb: (macs[pb[0]], pb[1]))


def cheapest_certified(
    manifest: Manifest, risk: RiskKind, epsilon: float, delta: float
) -> tuple[OperatingPoint, Guarantee]:
    """The cheapest point (expected MACs) certified for (risk, ε, δ), and the guarantee it carries."""
    cert = manifest.certification
    if cert is None:
        raise NotCertified(
            f"{manifest.name}/{manifest.version} records no certification: run `branchserve calibrate <version> --certify`"
        )
    macs = {p.name: p.expected_macs for p in manifest.frontier + cert.points}
    name, bound = _cheapest(cert, macs, risk, epsilon, delta)
    guarantee = Guarantee(risk=risk, epsilon=epsilon, delta=delta, method=SHORT_METHOD, n=cert.n, bound=bound)
    return manifest.operating_point(name), guarantee


def _counts(scores: ExitScores, rows: Float64Array) -> npt.NDArray[np.int64]:
    """(rows, 3): disagreements, lost and gained answers of each threshold row on `scores`."""
    assert scores.agrees is not None, "certification needs each exit's agreement with the final exit"
    n = len(scores)
    taken, samples = exits_taken(scores.confidence, rows), np.arange(n)
    served_right, final_right = scores.correct[taken, samples], scores.correct[-1][None, :]
    return np.stack(
        [
            (~scores.agrees[taken, samples]).sum(axis=1),
            (final_right & ~served_right).sum(axis=1),
            (served_right & ~final_right).sum(axis=1),
        ],
        axis=1,
    )


SAME_THRESHOLDS = 1e-5
"""Proposals this close to a frontier point are that point: re-computed logits differ from export's in
the last float32 bits (another CPU's kernels), which moves quantile thresholds by ~1e-7."""


def _snap(rows: Float64Array, frontier: Sequence[OperatingPoint]) -> tuple[Float64Array, list[str | None]]:
    """Each row replaced by the frontier point with the same thresholds, if there is one, and that point's name."""
    rows, names = rows.copy(), []
    for i, row in enumerate(rows):
        same = [p for p in frontier if np.abs(np.asarray(p.thresholds) - row).max() <= SAME_THRESHOLDS]
        names.append(same[0].name if same else None)
        if same:
            rows[i] = same[0].thresholds
    return rows, names


def certify(
    val: ExitScores,
    test: ExitScores,
    stage_macs: Sequence[float],
    settings: SearchSettings,
    frontier: Sequence[OperatingPoint],
    batch1: StageLatency,
    targets: Sequence[Target] = DEFAULT_TARGETS,
) -> Certification:
    """Count every half-A proposal on half B (the same halves as the frontier search), make the proposals
    that are not frontier points into certification's own points, and certify `targets` for the record."""
    half_a, half_b = halves(len(val), settings.holdout_seed)
    a, b = val.take(half_a), val.take(half_b)
    proposed, kinds = propose(a, stage_macs, settings, agreeing=True)
    rows, names = _snap(np.vstack([full_thresholds(val.confidence.shape[0]), proposed[::-1]]), frontier)
    own = [i for i, name in enumerate(names) if name is None]
    kind_of: list[SearchKind] = ["full", *kinds[::-1]]
    labels = [(f"certified-{rank:02d}", kind_of[i]) for rank, i in enumerate(reversed(own))]  # cheapest first
    points = operating_points(labels, rows[own[::-1]], val, test, stage_macs, batch1, b)
    for (label, _), i in zip(labels, reversed(own), strict=True):
        names[i] = label
    on_a, on_b = _counts(a, rows), _counts(b, rows)
    cert = Certification(
        method=METHOD,
        sample=f"validation half B ({len(b)} images, seed {settings.holdout_seed}); half A proposed and ordered",
        n=len(b),
        candidates=[
            Candidate(
                thresholds=[float(t) for t in row],
                point=str(name),
                proposal_disagreement=float(ca[0] / len(a)),
                proposal_accuracy_drop=float((ca[1] - ca[2]) / len(a)),
                disagreements=int(cb[0]),
                lost=int(cb[1]),
                gained=int(cb[2]),
            )
            for row, name, ca, cb in zip(rows, names, on_a, on_b, strict=True)
        ],
        points=points,
    )
    return cert.model_copy(update={"certificates": certificates(cert, frontier, targets)})


def certificates(
    cert: Certification, frontier: Sequence[OperatingPoint], targets: Sequence[Target]
) -> list[Certificate]:
    """The cheapest certified point of each target (risk, ε, δ)."""
    macs = {p.name: p.expected_macs for p in [*frontier, *cert.points]}
    out = []
    for risk, epsilon, delta in targets:
        point, bound = _cheapest(cert, macs, risk, epsilon, delta)
        out.append(
            Certificate(
                risk=risk, epsilon=epsilon, delta=delta, method=SHORT_METHOD, n=cert.n, bound=bound, point=point
            )
        )
    return out
