"""One exception tree for every problem a user can cause with an adapter or a model."""


class DoraGatewayError(Exception):
    """Base of every error this project raises on purpose."""


class ProblemsError(DoraGatewayError):
    """Something unusable, with every problem found listed at once.

    Listing all problems in one error saves the user a fix-rerun loop per problem.
    """

    def __init__(self, subject: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{subject} is not usable:\n{lines}")


class AdapterError(ProblemsError):
    """An adapter that cannot be used (`source`: its directory)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        super().__init__(f"adapter {source}", problems)


class BaseModelError(DoraGatewayError):
    """A base model directory that cannot be read or used."""


class ModelPrepareError(DoraGatewayError):
    """The default model could not be fetched or converted."""
