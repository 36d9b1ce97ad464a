"""The reliability suite (issue 9): faults, corruption and bad input, end to end through the CLI.

A package so that its conftest.py is `faults.conftest` and does not take the place of tests/conftest.py
as the module `conftest` (which tests/test_data.py imports from)."""
