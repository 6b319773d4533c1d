"""What `POST /v1/responses` may ask of the gateway, beyond what every completion route checks.

The gateway stores no responses: each request may land on a different vLLM replica, and a
replica keeps what it stores in its own memory only. So everything that refers to stored
state (`previous_response_id`, `conversation`, a stored `prompt`, `background` runs, which are
fetched later by id) is refused up front, with OpenAI's error, instead of failing later or
being ignored; and `store` is pinned to false upstream, so no replica keeps anything either.
"""

from __future__ import annotations

from gateway.errors import InvalidRequest

STATEFUL_FIELDS = {
    "previous_response_id": "Responses are not stored here, so they cannot be continued; "
                            "send the whole conversation in 'input' instead",
    "conversation": "Conversations are not stored here; send the whole conversation in "
                    "'input' instead",
    "prompt": "Stored prompts are not available here; send the instructions and 'input' "
              "instead",
}  # fmt: skip
PINNED_FIELDS = (("store", False),)


def check_responses_body(body: dict) -> None:
    """Refuse the stateful parts of the Responses API (see the module's docstring)."""
    for field, reason in STATEFUL_FIELDS.items():
        if body.get(field) is not None:
            raise InvalidRequest(reason, param=field, code="unsupported_parameter")
    if body.get("background") not in (None, False):
        raise InvalidRequest("Background responses are not supported here; stream instead",
                             param="background", code="unsupported_parameter")
    if body.get("store") not in (None, False):
        raise InvalidRequest("Responses are not stored here; send 'store': false or leave it "
                             "out", param="store", code="unsupported_parameter")
