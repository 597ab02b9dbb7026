"""Check pytest JUnit XML files: fail on failures, errors, no tests, or a skip.

scripts/gpu_check.sh runs it on the JUnit files of its CUDA pytest runs, so
that the GPU check cannot pass by skipping: a CUDA test skipped because no GPU
is visible, because the extension was built without CUDA, or because Triton or
memory is missing, is a failure of the check. The one kind of skip allowed is
an explicit multi-GPU requirement ("needs two GPUs"), which a one-GPU machine
cannot meet (``--allow-skip`` changes the pattern).

    python scripts/check_junit.py [--allow-skip REGEX] [--min-tests N] FILE.xml...

Prints one line a file (counts) and one line for each refused skip, failure
or error; exits 0 when every file passes, 1 otherwise, 2 when a file is
missing or not JUnit XML.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

#: Skips allowed by default: an explicit requirement of more GPUs than one.
#: Lines shown of each kind (failed, error, skipped) a file.
SHOWN = 20

MULTI_GPU_SKIP = r"\bneeds? (two|2|three|3|four|4|multiple|several|more than one|at least (two|2)) (CUDA )?GPUs\b"


@dataclass
class Report:
    path: str
    tests: int = 0
    passed: int = 0
    failed: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    allowed_skips: List[str] = field(default_factory=list)
    refused_skips: List[str] = field(default_factory=list)
    problem: Optional[str] = None

    def ok(self, min_tests: int) -> bool:
        return (
            self.problem is None
            and not self.failed
            and not self.errors
            and not self.refused_skips
            and self.passed >= max(1, min_tests)
        )


def _name(case: ET.Element) -> str:
    cls, name = case.get("classname", ""), case.get("name", "?")
    return f"{cls}::{name}" if cls else name


def _message(node: ET.Element) -> str:
    text = node.get("message") or (node.text or "").strip()
    return " ".join(text.split())[:300]


def check_file(path: str, allow_skip: str) -> Report:
    report = Report(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        report.problem = "no such file (did pytest run to its end?)"
        return report
    except ET.ParseError as exc:
        report.problem = f"not XML: {exc}"
        return report
    if root.tag not in ("testsuites", "testsuite"):
        report.problem = f"not JUnit XML (root element <{root.tag}>)"
        return report
    allowed = re.compile(allow_skip, re.IGNORECASE)
    for case in root.iter("testcase"):
        report.tests += 1
        if case.get("name") is None:
            # pytest writes the test it was running when interrupted (SIGINT,
            # as gpu_check.sh's timeout sends) as a bare <testcase/>: no pass.
            report.errors.append("a test case with no name: the run was interrupted inside a test")
            continue
        name = _name(case)
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            report.failed.append(f"{name}: {_message(failure)}")
        elif error is not None:
            report.errors.append(f"{name}: {_message(error)}")
        elif skipped is not None:
            reason = _message(skipped)
            (report.allowed_skips if allowed.search(reason) else report.refused_skips).append(f"{name}: {reason}")
        else:
            report.passed += 1
    # Errors outside any test case (collection errors) are counted on the suite.
    for suite in root.iter("testsuite"):
        listed = sum(1 for _ in suite.iter("testcase"))
        declared_errors = int(suite.get("errors", "0") or 0)
        counted = sum(1 for case in suite.iter("testcase") if case.find("error") is not None)
        if declared_errors > counted:
            report.errors.append(f"suite {suite.get('name', '?')}: {declared_errors - counted} error(s) outside test cases")
        if listed == 0 and int(suite.get("tests", "0") or 0) > 0:
            report.problem = "the suite declares tests but lists none"
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.xml")
    p.add_argument("--allow-skip", default=MULTI_GPU_SKIP, metavar="REGEX",
                   help="skip reasons allowed (default: an explicit multi-GPU requirement)")
    p.add_argument("--min-tests", type=int, default=1, metavar="N", help="at least N tests must pass (default 1)")
    args = p.parse_args(argv)
    status = 0
    for path in args.files:
        r = check_file(path, args.allow_skip)
        if r.problem is not None:
            print(f"check_junit: {path}: FAILED: {r.problem}")
            status = max(status, 2)
            continue
        verdict = "ok" if r.ok(args.min_tests) else "FAILED"
        print(
            f"check_junit: {path}: {verdict}: {r.tests} tests, {r.passed} passed, {len(r.failed)} failed, "
            f"{len(r.errors)} errors, {len(r.refused_skips)} skipped (refused), "
            f"{len(r.allowed_skips)} skipped (allowed: multi-GPU)"
        )
        for label, lines in (
            ("failed", r.failed),
            ("error", r.errors),
            ("skipped, not allowed", r.refused_skips),
            ("skipped, allowed", r.allowed_skips),
        ):
            for line in lines[:SHOWN]:
                print(f"  {label}: {line}")
            if len(lines) > SHOWN:
                print(f"  {label}: ... and {len(lines) - SHOWN} more")
        if r.passed < max(1, args.min_tests):
            print(f"  fewer than {max(1, args.min_tests)} tests passed")
        if verdict != "ok":
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
