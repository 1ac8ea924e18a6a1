"""`python -m tests.weaktr_test_cli ...`: the weaktr CLI with the tests' registry entries
(`micro`, `smoke`), for tests that run weaktr in a child process."""

from __future__ import annotations

from tests._registry_entries import register_test_entries
from weaktr_cli.commands.app import main

if __name__ == "__main__":
    register_test_entries()
    main()
