"""A pytest plugin for `kvos lab grade`: each test's outcome and points, as JSON, into $KVOS_LAB_REPORT.

Loaded with `-p tests.labs.report` by the grader's subprocess. Tests without points (the checks
that the system still boots) are reported with 0; a test scored on a scale passes with the
fraction of its points it records (record_property("fraction", x)).
"""
from __future__ import annotations

import json
import os

_results: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): what a graded test is worth")


def pytest_collection_modifyitems(items):
    for item in items:
        mark = item.get_closest_marker("points")
        _results[item.nodeid] = {"name": item.nodeid, "points": mark.args[0] if mark else 0, "score": 0,
                                 "outcome": "not run", "message": ""}


def pytest_runtest_logreport(report):
    entry = _results.get(report.nodeid)
    if entry is None:
        return
    if report.failed:
        entry["outcome"] = "error" if report.when != "call" else "failed"
        entry["message"] = _first_line(report)
        entry["score"] = 0
    elif report.when == "call" and report.passed and entry["outcome"] == "not run":
        # A test scored like malloc lab passes with a fraction of its points (record_property("fraction", x)).
        fraction = dict(report.user_properties).get("fraction", 1.0)
        entry["outcome"], entry["score"] = "passed", round(entry["points"] * fraction, 2)
        if fraction < 1.0:
            entry["message"] = dict(report.user_properties).get("detail", f"{fraction:.0%} of its points")
    elif report.skipped:
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session):
    path = os.environ.get("KVOS_LAB_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(list(_results.values()), f)


def _first_line(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else ""
