"""The terminal summary table (summary.py) and the naming rule it shares with the report
(measures.py). Pure functions: fed with stand-ins for pytest's reports, no pytest run.
The same table printed by a real ``pytest --gpuconform`` run is checked in test_report.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from pytest_gpuconform.collection import plan
from pytest_gpuconform.reporting import measures
from pytest_gpuconform.reporting.summary import (
    CaseOutcome,
    outcomes_from_reports,
    summary_lines,
    summary_lines_from_stats,
)


def report(nodeid, when, outcome, **props):
    return SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome, user_properties=list(props.items()))


def test_context_keys_match_the_properties_the_plugin_attaches():
    assert measures.CONTEXT_KEYS == set(plan.CONTEXT_PROPERTIES)


def test_naming_rule_pairs_bounds_and_picks_ratios():
    found = {
        m.name: m
        for m in measures.measures(
            [
                ("feature", "amp"),
                ("world_size", 2),  # context, never measurements
                ("out_rel_l2", "0.02"),
                ("out_rel_l2_bound", "0.016"),  # upper bound, exceeded
                ("busbw_GBps", 150.0),
                ("busbw_GBps_min", 200.0),  # floor, missed
                ("activation_ratio", 0.3),  # ratio without bound
                ("max_abs_err", 0.0),
                ("max_abs_err_tol", 1e-5),  # exact zero within
                ("loss_rel", "nan"),
                ("loss_rel_max", 1e-3),  # NaN is never within
                ("time_us", 12.5),
                ("torch_version", "2.13.0"),  # plain number; text
            ]
        )
    }
    assert set(found) == {"out_rel_l2", "busbw_GBps", "activation_ratio", "max_abs_err", "loss_rel", "time_us"}
    assert found["out_rel_l2"].within is False and found["out_rel_l2"].describe() == "out_rel_l2=0.02>0.016!"
    assert found["busbw_GBps"].kind == "lower" and found["busbw_GBps"].describe() == "busbw_GBps=150<200!"
    assert found["activation_ratio"].is_key and found["activation_ratio"].within is None
    assert found["max_abs_err"].within is True and found["max_abs_err"].describe() == "max_abs_err=0<=1e-05"
    assert math.isnan(found["loss_rel"].value) and found["loss_rel"].within is False
    assert not found["time_us"].is_key
    assert [m.name for m in measures.key_measures([("time_us", 1.0), ("x_ratio", 0.5)])] == ["x_ratio"]


def test_naming_rule_loose_bounds_cover_measures_that_contain_their_words():
    found = {
        m.name: m
        for m in measures.measures(
            [
                ("output_rel_l2", 1e-4),
                ("max_grad_rel_l2", 7e-4),
                ("rel_l2_bound", 5e-3),  # as test_amp records
                ("max_rel_l2_vs_single_process", 0.03),
                ("bound_rel_l2", 0.02),  # as test_ddp records
                ("max_abs_diff", 1e-8),
                ("bound_rtol", 1.3e-6),  # no measure named *rtol*: bound only
                ("err_max", 3.0),  # _max pairs exactly only: a measurement
                ("relative", 1.0),  # 'rel' is not the word 'rel_l2'
            ]
        )
    }
    assert set(found) == {
        "output_rel_l2",
        "max_grad_rel_l2",
        "max_rel_l2_vs_single_process",
        "max_abs_diff",
        "err_max",
        "relative",
    }
    assert found["output_rel_l2"].bound == found["max_grad_rel_l2"].bound == 5e-3
    # A measure takes the first loose bound it matches, in recording order.
    assert found["max_rel_l2_vs_single_process"].bound == 5e-3
    assert found["max_abs_diff"].bound is found["err_max"].bound is found["relative"].bound is None


def test_phases_fold_into_one_outcome_per_test():
    tests = outcomes_from_reports(
        [
            report("t.py::a", "setup", "passed"),
            report("t.py::a", "call", "passed"),
            report("t.py::a", "teardown", "failed"),  # teardown error wins
            report("t.py::b", "setup", "passed"),
            report("t.py::b", "call", "failed"),
            report("t.py::c", "setup", "skipped"),
            report("t.py::d", "setup", "passed"),
            report("t.py::d", "call", "passed"),
            SimpleNamespace(message="a warning"),  # not a test report
        ]
    )
    assert {t.nodeid: t.outcome for t in tests} == {
        "t.py::a": "error",
        "t.py::b": "failed",
        "t.py::c": "skipped",
        "t.py::d": "passed",
    }


def test_table_rows_counts_and_worst_key_numbers():
    amp = dict(feature="amp", device="cpu", dtype="bf16")
    tests = [
        CaseOutcome(
            "test_amp.py::x[cpu-bf16]", "passed", list(dict(amp, out_rel_l2=0.004, out_rel_l2_bound=0.016).items())
        ),
        CaseOutcome(
            "test_amp.py::y[cpu-bf16]", "failed", list(dict(amp, out_rel_l2=0.03, out_rel_l2_bound=0.016).items())
        ),
        CaseOutcome("test_amp.py::z[cpu-bf16]", "skipped", list(amp.items())),
        CaseOutcome(
            "test_ddp.py::w[ws2-cpu]",
            "passed",
            [("feature", "ddp"), ("device", "cpu"), ("world_size", 2), ("grad_ratio", 1.0)],
        ),
        CaseOutcome("tests/test_mine.py::v", "error", []),  # no properties at all
    ]
    lines = summary_lines(tests, "reports/junit.xml")
    header, *rows, junit = [line for line in lines if not line.startswith(("failures sharing", "  ", "      "))]
    assert header.split() == ["area", "device", "dtype", "ws", "pass", "fail", "error", "skip", "key", "numbers"]
    assert [row.split()[:8] for row in rows] == [
        ["amp", "cpu", "bf16", "1", "1", "1", "0", "1"],
        ["ddp", "cpu", "-", "2", "1", "0", "0", "0"],
        ["mine", "-", "-", "1", "0", "0", "1", "0"],
    ]
    assert rows[0].endswith("out_rel_l2=0.03>0.016!")  # the worst of the row, marked
    assert rows[1].endswith("grad_ratio=1")
    assert junit.startswith("JUnit XML: /") and junit.endswith("reports/junit.xml")


def test_key_numbers_are_the_worst_first_as_many_as_fit_120_columns():
    props = [("feature", "amp")] + [(f"e{i}", i / 10) for i in range(5)] + [(f"e{i}_bound", 1.0) for i in range(5)]
    (row,) = summary_lines([CaseOutcome("t.py::a", "passed", props)], None)[1:-1]
    assert row.endswith("e4=0.4<=1, e3=0.3<=1, e2=0.2<=1, e1=0.1<=1, e0=0<=1")
    long = [("feature", "amp")] + [(f"error_number_{i}_of_many", i / 10) for i in range(5)]
    long += [(f"error_number_{i}_of_many_bound", 1.0) for i in range(5)] + [("z_tflops", 3.0)]
    (row,) = summary_lines([CaseOutcome("t.py::a", "passed", long)], None)[1:-1]
    assert len(row) <= 120 and row.endswith("error_number_3_of_many=0.3<=1, +4 more")


def test_shorten_cuts_at_a_word_boundary():
    from pytest_gpuconform.reporting.summary import shorten

    assert shorten("needs 2 GPU(s), node has no GPU (no NVIDIA driver)", 30) == "needs 2 GPU(s), node has no…"
    assert shorten("short", 30) == "short"
    assert len(shorten("x" * 100, 10)) == 10


def test_empty_run_and_missing_junit_path_are_said_plainly():
    assert summary_lines_from_stats({}, None, None) == [
        "no tests ran",
        "JUnit XML: not written (add --junitxml=PATH to keep the measured numbers)",
    ]
    lines = summary_lines_from_stats(
        {"passed": [report("t.py::a", "call", "passed")]}, "j.xml", "reports/junit-cluster.xml"
    )
    assert lines[-1].startswith("merged cluster JUnit XML: /") and lines[-1].endswith("junit-cluster.xml")


def test_rows_that_only_skipped_fold_per_area_and_device_with_their_reason():
    def skipped(nodeid, reason, **props):
        rep = report(nodeid, "setup", "skipped", **props)
        rep.longrepr = ("conformance/test_amp.py", 10, f"Skipped: {reason}")
        return rep

    reports = [
        skipped(f"test_amp.py::t[cuda-{d}]", "needs a GPU; no NVIDIA driver", feature="amp", device="cuda", dtype=d)
        for d in ("fp16", "bf16")
    ]
    reports += [skipped("test_amp.py::u[cuda-bf16]", "needs bf16", feature="amp", device="cuda", dtype="bf16")]
    reports += [report("test_amp.py::t[cpu-bf16]", "call", "passed", feature="amp", device="cpu", dtype="bf16")]
    header, ran, folded, *_ = summary_lines_from_stats({"skipped": reports[:3], "passed": reports[3:]}, None)
    assert ran.split()[:8] == ["amp", "cpu", "bf16", "1", "1", "0", "0", "0"]
    assert folded.split()[:8] == ["amp", "cuda", "*", "*", "0", "0", "0", "3"]
    assert folded.endswith("skipped: needs a GPU; no NVIDIA driver (+1 other reasons)")


def test_representative_skip_reason_is_the_commonest_then_alphabetical():
    """The same run reads the same every time: no dependence on which skip came first."""
    reasons = ["b: needs 4 ranks", "a: needs a GPU", "b: needs 4 ranks", "a: needs a GPU", "c: other"]
    for order in (reasons, list(reversed(reasons))):
        tests = [CaseOutcome(f"test_x.py::t{i}[cuda]", "skipped", [("device", "cuda")], r) for i, r in enumerate(order)]
        (row,) = summary_lines(tests, None)[1:-1]
        assert row.endswith("skipped: a: needs a GPU (+2 other reasons)"), row
