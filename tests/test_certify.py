"""Certification: exact binomial bounds, fixed-sequence testing, the counts export and `calibrate
--certify` record, and the certified policies a server applies."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from branchserve.repo.binomial import binomial_cdf, lower_bound, upper_bound
from branchserve.repo.certify import (
    DEFAULT_TARGETS,
    NotCertified,
    certified,
    cheapest_certified,
    is_full_depth,
    risk_bound,
    sequence,
)
from branchserve.repo.loading import load_version
from branchserve.repo.manifest import Candidate, Certification
from branchserve.repo.points import Policy, choose

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "fmnist-resnet" / "3"


def test_binomial_cdf_is_the_sum_of_the_pmf() -> None:
    for n, p in ((1, 0.3), (17, 0.05), (60, 0.5), (200, 0.9)):
        for k in range(-1, n + 1, max(1, n // 7)):
            direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
            assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)


def test_clopper_pearson_bounds_invert_the_tail() -> None:
    delta = 0.05
    for n in (1, 10, 1000, 5000):
        assert upper_bound(0, n, delta) == pytest.approx(1 - delta ** (1 / n), rel=1e-9)  # closed forms
        assert lower_bound(n, n, delta) == pytest.approx(delta ** (1 / n), rel=1e-9)
        for k in sorted({1, n // 3, n - 1} - {0, n}):
            up, low = upper_bound(k, n, delta), lower_bound(k, n, delta)
            assert low < k / n < up
            assert binomial_cdf(k, n, up) == pytest.approx(delta, rel=1e-6)  # P(X ≤ k; upper) = δ
            assert 1 - binomial_cdf(k - 1, n, low) == pytest.approx(delta, rel=1e-6)  # P(X ≥ k; lower) = δ
    with pytest.raises(ValueError, match="0 ≤ k ≤ n"):
        upper_bound(5, 4, delta)


def test_clopper_pearson_covers_at_its_level() -> None:
    rng, delta, n, p = np.random.default_rng(0), 0.1, 400, 0.03
    draws = rng.binomial(n, p, size=3000)
    misses = {k: upper_bound(int(k), n, delta) < p for k in np.unique(draws)}
    miss_rate = np.mean([misses[k] for k in draws])
    assert miss_rate <= delta + 3 * math.sqrt(delta * (1 - delta) / len(draws))


def candidate(proposal: float, disagreements: int, point: str | None = None, full: bool = False) -> Candidate:
    early = 2.0 if full else 0.5
    return Candidate(
        thresholds=[early, early, 0.0],
        point=point,
        proposal_disagreement=proposal,
        proposal_accuracy_drop=proposal / 2,
        disagreements=disagreements,
        lost=disagreements // 2,
        gained=disagreements // 4,
    )


def test_fixed_sequence_certifies_the_prefix_before_the_first_failure() -> None:
    n, epsilon, delta = 2000, 0.05, 0.05
    cert = Certification(
        method="test",
        sample="test",
        n=n,
        candidates=[
            candidate(0.0, 0, "final", full=True),
            candidate(0.03, 70, "b"),  # passes; tested third (order is by proposal risk)
            candidate(0.01, 20, "a"),  # passes; tested second
            candidate(0.04, 120, "c"),  # 6 % on B: fails, and testing stops
            candidate(0.045, 10, "d"),  # would pass alone, but comes after a failure
        ],
    )
    passed = [c.point for c, _ in certified(cert, "disagreement", epsilon, delta)]
    assert passed == ["final", "a", "b"]
    assert all(b <= epsilon for _, b in certified(cert, "disagreement", epsilon, delta))
    assert risk_bound(cert.candidates[0], "disagreement", n, delta) == 0.0 and is_full_depth([2.0, 2.0, 0.0])
    lost, gained = cert.candidates[1].lost, cert.candidates[1].gained
    expected = upper_bound(lost, n, delta / 2) - lower_bound(gained, n, delta / 2)
    assert risk_bound(cert.candidates[1], "accuracy_drop", n, delta) == pytest.approx(expected)
    assert [c.point for c, _ in certified(cert, "disagreement", 1e-9, delta)] == ["final"]  # full depth: exactly 0
    worse = cert.model_copy(update={"candidates": [candidate(-0.02, 400, "e"), *cert.candidates]})
    assert sequence(worse, "accuracy_drop")[0].point == "e"  # better than full depth on half A: tested first
    assert [c.point for c, _ in certified(worse, "accuracy_drop", epsilon, delta)] == ["final"]  # fails; final stays


def test_fixed_sequence_keeps_the_family_wise_error_at_delta() -> None:
    """Many candidates, half of them over ε: a certified set holding any of those is a failure, and
    failures happen in at most δ of the samples (plus Monte Carlo slack)."""
    rng, n, epsilon, delta, trials = np.random.default_rng(1), 1000, 0.05, 0.1, 400
    true_risk = np.linspace(0.0, 0.1, 40)  # the sequence's order on half A follows the true risk
    failures = 0
    for _ in range(trials):
        counts = rng.binomial(n, true_risk)
        cert = Certification(
            method="test",
            sample="test",
            n=n,
            candidates=[
                candidate(float(r), int(c), f"p{i}") for i, (r, c) in enumerate(zip(true_risk, counts, strict=True))
            ],
        )
        passed = {c.point for c, _ in certified(cert, "disagreement", epsilon, delta)}
        failures += any(true_risk[int(p[1:])] > epsilon for p in passed if p)
    assert failures / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


def test_export_records_certification_and_policies_apply_it(tiny_version: Path) -> None:
    m = load_version(tiny_version)
    cert = m.certification
    assert cert is not None and cert.n == 1000  # half of the fixture's 2,000 validation images
    assert cert.candidates[0].point == "final" and is_full_depth(cert.candidates[0].thresholds)
    assert {c.point for c in cert.candidates} >= {p.name for p in m.frontier}  # every point is a candidate
    assert [(c.risk, c.epsilon, c.delta) for c in cert.certificates] == list(DEFAULT_TARGETS)
    targets = [(r, e, d) for r in ("disagreement", "accuracy_drop") for e in (0.01, 0.1, 0.3) for d in (0.05, 0.2)]
    for risk, epsilon, delta in targets:
        point, guarantee = cheapest_certified(m, risk, epsilon, delta)
        names = {c.point for c, _ in certified(cert, risk, epsilon, delta)}
        assert point.name in names and guarantee.bound <= epsilon and guarantee.n == cert.n
        assert all(p.expected_macs >= point.expected_macs for p in m.frontier if p.name in names)
        field = "max_disagreement" if risk == "disagreement" else "max_accuracy_drop"
        choice = choose(m, Policy.model_validate({field: epsilon, "risk": delta}), [])
        assert choice.name == point.name and choice.guarantee == guarantee
    looser = cheapest_certified(m, "disagreement", 0.3, 0.05)[0]
    assert looser.expected_macs < cheapest_certified(m, "disagreement", 0.01, 0.05)[0].expected_macs
    assert choose(m, Policy(point="final"), []).guarantee.epsilon == 0.0  # full depth: exact
    assert choose(m, Policy(), []).guarantee is None  # the default point makes no certified claim


def test_certified_policies_are_checked() -> None:
    with pytest.raises(ValidationError, match="max_disagreement needs risk"):
        Policy(max_disagreement=0.01)
    with pytest.raises(ValidationError, match=r"risk \(δ\) goes with"):
        Policy(risk=0.05)
    with pytest.raises(ValidationError, match="at most one of"):
        Policy(max_disagreement=0.01, max_accuracy_drop=0.01, risk=0.05)
    assert Policy(max_accuracy_drop=0.005).risk is None  # the uncertified form is still accepted


def test_an_uncertified_version_refuses_certified_targets(tiny_version: Path, tmp_path: Path) -> None:
    m = load_version(tiny_version).model_copy(update={"certification": None})
    with pytest.raises(NotCertified, match="calibrate <version> --certify"):
        choose(m, Policy(max_disagreement=0.05, risk=0.05), [])


def test_calibrate_certify_reproduces_the_shipped_certification(tmp_path: Path) -> None:
    """`branchserve calibrate --certify` on the shipped model without its certification records the
    same counts (the same halves and proposals as the export's search)."""
    version = tmp_path / "fmnist-resnet" / "3"
    shutil.copytree(SHIPPED, version)
    manifest = json.loads((version / "manifest.json").read_text())
    shipped = Certification.model_validate(manifest.pop("certification"))
    (version / "manifest.json").write_text(json.dumps(manifest))
    assert load_version(version).certification is None  # loads as before
    cmd = [sys.executable, "-m", "branchserve", "calibrate", str(version), "--certify", "--keep-latency"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "cheapest certified point" in done.stdout
    again = load_version(version).certification
    assert again is not None and again.candidates == shipped.candidates and again.certificates == shipped.certificates
    refused = subprocess.run([*cmd, "--fmnist-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "dataset-fashion-mnist" in refused.stderr  # no dataset there: one line
