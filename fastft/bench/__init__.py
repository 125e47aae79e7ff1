"""The bench harness used by benches/*.py and ``fastft bench``."""

from .harness import Case, markdown, measure, run_suite, suites

__all__ = ["Case", "markdown", "measure", "run_suite", "suites"]
