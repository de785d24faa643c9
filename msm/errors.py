"""One exception type for bad input, so the CLI can print it as a single line and exit non-zero."""


class MsmError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
