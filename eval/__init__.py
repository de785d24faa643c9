"""The eval stage: suites as data plus a scorer, item banks, judges, reports."""
