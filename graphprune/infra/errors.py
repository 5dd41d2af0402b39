"""The exceptions the pass infrastructure raises."""

from ..ir.errors import GraphpruneError


class PassError(GraphpruneError):
    """A pass failed while running (its configuration was valid)."""


class PipelineError(GraphpruneError):
    """A pipeline step failed; names the step and the steps that ran before it."""

    def __init__(self, message: str, *, step: int, name: str, previous: list[str]):
        super().__init__(message)
        self.step = step
        self.name = name
        self.previous = previous
