"""Summarise a pytest JUnit file as docs/testing.md shows it: the totals, seconds per test file, the N slowest tests.

    PYTEST_ADDOPTS="--junitxml=junit.xml" CI=true bash .ci/run
    python bench/junit_table.py junit.xml 30

A test's seconds are JUnit's: its setup (the fixtures it is the first to need), call and teardown. Under
pytest-xdist the sum of the tests' seconds exceeds the suite's wall time: two tests run at once.
"""

import argparse
import collections
import xml.etree.ElementTree as ET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", help="JUnit XML file written by pytest --junitxml")
    parser.add_argument("slowest", nargs="?", type=int, default=30, help="how many of the slowest tests to list")
    args = parser.parse_args()
    root = ET.parse(args.junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                 else "skipped" if case.find("skipped") is not None else "passed")
        name = case.get("classname").removeprefix("tests.") + "::" + case.get("name")
        cases.append((float(case.get("time", 0)), name, state))
    total = float(suite.get("time"))
    states = collections.Counter(state for *_, state in cases)
    print(f"tests: {len(cases)}, passed {states['passed']}, failed {states['failed']}, skipped {states['skipped']}; "
          f"suite {total:.0f} s ({total / 60:.1f} min); sum of test times {sum(t for t, *_ in cases):.0f} s")
    per_file = collections.Counter()
    for seconds, name, _ in cases:
        per_file[name.split("::")[0]] += seconds
    print("\n| file | seconds |\n|---|---:|")
    for file, seconds in per_file.most_common():
        print(f"| {file} | {seconds:.0f} |")
    print("\n| # | test | seconds |\n|---:|---|---:|")
    for i, (seconds, name, _) in enumerate(sorted(cases, reverse=True)[:args.slowest], 1):
        print(f"| {i} | {name} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
