"""Issue 24 item 3: validation returns a typed record; validation.json is its JSON view, key for key."""

from __future__ import annotations

from mka_edge.validate.checks import Thresholds, evaluate
from mka_edge.validate.result import Check, ValidationResult

KEYS = [
    "mka_edge", "format", "artifact", "reference", "runtime", "host", "accuracy", "latency",
    "profile", "thresholds", "checks", "passed",
]  # fmt: skip


def _result(checks) -> ValidationResult:
    return ValidationResult(
        "0.0", "gguf", {"path": "a.gguf"}, {"model": "m"}, {"name": "llama.cpp"}, {"label": "host"},
        {"kl": 0.25}, {"gen_tps": {"median": 12.5}}, "pi", {"max_kld": 0.2}, checks,
    )  # fmt: skip


def test_checks_are_records_and_the_result_passes_only_when_every_check_does():
    th = Thresholds(max_kld=0.2, min_tokens_per_s=10)
    checks = evaluate(th, 0.25, 12.5)
    assert [type(c) for c in checks] == [Check, Check] and [c.passed for c in checks] == [False, True]
    assert evaluate(Thresholds(), 0.25, 12.5) == ()  # no threshold, no check
    r = _result(checks)
    assert not r.passed and r.kl == 0.25 and r.gen_tps == 12.5
    assert r.failures() == "mean KL <= max_kld: 0.25 vs 0.2"
    assert _result(checks[1:]).passed and _result(checks[1:]).failures() == ""


def test_validation_json_keeps_its_keys_and_reads_by_key():
    r = _result(evaluate(Thresholds(max_kld=0.3), 0.25, 12.5))
    j = r.to_json()
    assert list(j) == KEYS and j["passed"] is True and j["mka_edge"] == "0.0"
    assert j["checks"] == [{"check": "mean KL <= max_kld", "value": 0.25, "limit": 0.3, "passed": True}]
    assert r["accuracy"]["kl"] == 0.25 and r["passed"] is True  # scripts written against the file's keys
    assert "out" not in j
