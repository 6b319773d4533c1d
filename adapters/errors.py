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


class SourceError(DoraGatewayError):
    """Files that could not be fetched from where they live (object storage, the Hub).

    `where` is the URL asked for; `kind` says whose side the fault is on, so the gateway can
    answer 400 for what the request named wrong and 502 for a store that failed it:
    "not_found", "invalid" (not a PEFT adapter, a malformed URL), "too_large" (request side);
    "denied" (the gateway's credentials), "unavailable" (down, timed out), "corrupt" (bytes
    that do not match their hash) (store side).
    """

    CLIENT_KINDS = ("not_found", "invalid", "too_large")
    STORE_KINDS = ("denied", "unavailable", "corrupt")

    def __init__(self, kind: str, where: str, detail: str) -> None:
        if kind not in self.CLIENT_KINDS + self.STORE_KINDS:
            raise ValueError(f"unknown source error kind {kind!r}")
        self.kind = kind
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {detail}")
