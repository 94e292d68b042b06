"""Runs integration tests (names given, or every test_*.py found) and ends
with one line: "N passed, N failed, N skipped". Each skip is listed with its
reason. Exit status 1 on any failure or error, and, under CI=true (or
CS_NO_SKIP=1), on any skip too: a skipped test is a test that did not run.

    python3 runner.py                      every suite (discovery)
    python3 runner.py test_contract        one suite
    python3 runner.py test_contract.ContractTests.test_x   one test
"""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


class CountingResult(unittest.TextTestResult):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main(argv):
    sys.path.insert(0, HERE)
    os.chdir(HERE)
    loader = unittest.TestLoader()
    if argv:
        suite = loader.loadTestsFromNames(argv)
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    runner = unittest.TextTestRunner(verbosity=2, resultclass=CountingResult, stream=sys.stdout)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    for test, reason in result.skipped:
        print("SKIPPED %s: %s" % (test.id(), reason))
    strict = os.environ.get("CI") == "true" or os.environ.get("CS_NO_SKIP") == "1"
    print("%d passed, %d failed, %d skipped" % (result.passed, failed, skipped))
    if skipped and strict:
        print("FAIL: %d test(s) skipped under %s: a skipped test did not run (install what the reason names)"
              % (skipped, "CI=true" if os.environ.get("CI") == "true" else "CS_NO_SKIP=1"))
        return 1
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
