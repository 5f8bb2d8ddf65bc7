"""The HTTP/JSON shapes of the gateway: what a request may contain, and what comes back.

Request models check types and shape only (strict: no coercion of ``"5"`` to 5, unknown
fields refused), so pydantic and the OpenAPI document agree on what parses. What a call may
carry (how many documents, how long a text, which model) is the core's to decide, once, for
both fronts; ``document_limits`` copies those numbers into the OpenAPI document so the
published schema still says exactly what is accepted.

The response is the shape rerank clients already parse (Cohere's ``/v1/rerank`` and
``/v2/rerank``): ``id``, ``results[{index, relevance_score, document?}]`` best first, and
``meta`` with ``api_version``, ``billed_units`` and ``tokens``. Ours adds ``model``, raw
``logit`` and ``truncated`` per result, ``billed_units.documents`` (the billed quantity) and
``usage``; the SDK's models allow extra fields, so it parses them unchanged.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.core import ID_PATTERN, MAX_ID_CHARS, Limits, RerankCall, RerankQuery, RerankReply
from worker.types import Truncation


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 3.0; strict pydantic's does not. Accept what the schema says."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _iso_date(value: Any) -> Any:
    """Only YYYY-MM-DD, as ``format: date`` says (pydantic alone would read "0" as 1970-01-01)."""
    if isinstance(value, str) and not (len(value) == 10 and value[4] == value[7] == "-"):
        raise ValueError("expected a date as YYYY-MM-DD")
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]
IsoDate = Annotated[date, BeforeValidator(_iso_date)]
SEARCH_UNIT_DOCUMENTS = 100  # Cohere's unit: one query with up to 100 documents
# "Not blank" as the core means it (``str.strip``), in a regex any JSON Schema tool reads:
# one character outside Python's whitespace set (which differs from ECMA's ``\s``).
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class RerankRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="The model to use; absent or empty: the served model. "
                              "Another name is 404.")
    query: str = Field(description="The search query; not blank.")
    documents: list[str] = Field(description="Candidate documents, at least one; results refer to "
                                 "them by index. Every document is billed.")
    top_n: JsonInt | None = Field(None, description="Return only the best top_n results; absent or 0: all. "
                              "Every document is still scored and billed.")
    return_documents: bool = Field(False, description="Echo each result's text in result.document.text.")
    instruction: str | None = Field(None, description="The task instruction, in English; absent: "
                                    "'Given a web search query, retrieve relevant passages that answer "
                                    "the query'.")
    truncation: Literal["end", "none"] = Field(
        "end", description="A (query, document) pair longer than the model's max_length: 'end' cuts "
        "the document's tail (the query is never cut; result.truncated says so), 'none' refuses the "
        "request with 400.")

    def to_call(self, api_key: str | None, idempotency_key: str | None) -> RerankCall:
        query = RerankQuery(self.query, self.documents, self.instruction, self.top_n,
                            self.return_documents, Truncation(self.truncation))
        return RerankCall([query], api_key=api_key, model=self.model or None,
                          idempotency_key=idempotency_key)  # "" is refused by the core


class ResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request's documents.")
    relevance_score: float = Field(description="P(yes) in [0, 1]: sigmoid(logit).")
    logit: float = Field(description="Raw log-odds logit(yes) - logit(no); keeps the resolution that "
                         "relevance_score loses near 0 and 1.")
    truncated: bool = Field(description="The document was cut to fit the model's max_length.")
    document: ResultDocument | None = Field(None, description="Only with return_documents.")


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    documents: int = Field(description="Documents billed by this response: all sent, not only top_n; "
                           "0 for an idempotent replay.")
    search_units: int = Field(description="Cohere's unit, for SDK users: one per started 100 documents; "
                              "0 for a replay. Informational: the invoice counts documents.")


class TokenCounts(BaseModel):
    input_tokens: int = Field(description="Tokens of all (query, document) prompts.")
    output_tokens: int = Field(description="Always 0: a reranker generates nothing.")


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: TokenCounts
    replayed: bool = Field(description="Served from the stored result of an earlier call with the same "
                           "Idempotency-Key, and not billed again.")


class Usage(BaseModel):
    """The size of the call, whether or not this response billed it (see meta.billed_units)."""

    documents: int
    prompt_tokens: int = Field(description="Tokens of all prompts, as a pair-at-a-time loop computes them.")
    computed_tokens: int = Field(description="Tokens the model ran (the shared query prefix once).")


class RerankResponse(BaseModel):
    id: str = Field(description="The call's request id.")
    model: str
    results: list[RerankResult] = Field(description="Best first (ties keep input order), cut to top_n.")
    meta: Meta
    usage: Usage
    timings_ms: dict[str, float] = Field(description="Server-side timing of the original call.")

    @classmethod
    def from_reply(cls, reply: RerankReply, api_version: str) -> RerankResponse:
        if len(reply.outcomes) != 1:
            raise AssertionError(f"an HTTP call came back with {len(reply.outcomes)} outcomes: this is a bug")
        docs = reply.billed_documents
        billed = 0 if reply.replayed else docs
        results = [RerankResult(index=r.index, relevance_score=r.score, logit=r.logit, truncated=r.truncated,
                                document=None if r.document is None else ResultDocument(text=r.document))
                   for r in reply.outcomes[0].results]
        return cls(
            id=reply.request_id, model=reply.model, results=results,
            meta=Meta(api_version=ApiVersion(version=api_version),
                      billed_units=BilledUnits(documents=billed,
                                               search_units=math.ceil(billed / SEARCH_UNIT_DOCUMENTS)),
                      tokens=TokenCounts(input_tokens=reply.prompt_tokens, output_tokens=0),
                      replayed=reply.replayed),
            usage=Usage(documents=docs, prompt_tokens=reply.prompt_tokens,
                        computed_tokens=reply.computed_tokens),
            timings_ms=reply.timings_ms)


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and, where it can, what to change.")


class ModelLimits(BaseModel):  # service.core.Limits but max_queries (one query a call here)
    max_documents: int
    max_query_chars: int
    max_instruction_chars: int
    max_document_chars: int
    max_request_bytes: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    aliases: list[str]
    max_length: int = Field(description="Tokens per (query, document) prompt.")
    dtype: str
    device: str
    limits: ModelLimits


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageTotal(BaseModel):  # service.core.UsageTotals on the wire (tests/test_facts_once.py)
    requests: int
    documents: int = Field(description="Documents billed: what the invoice counts.")
    prompt_tokens: int
    computed_tokens: int


class UsageDay(UsageTotal):
    date: str = Field(description="UTC date, YYYY-MM-DD.")


class UsageResponse(BaseModel):
    key_id: str
    name: str
    days: list[UsageDay]
    total: UsageTotal


class Status(BaseModel):
    status: str


# -- the published schema ---------------------------------------------------------------------
def document_limits(openapi: dict[str, Any], limits: Limits, models: list[str]) -> dict[str, Any]:
    """Write the core's limits into the OpenAPI document (the core enforces them: 400/404)."""
    props = openapi["components"]["schemas"]["RerankRequest"]["properties"]
    _set(props["query"], maxLength=limits.max_query_chars, pattern=NOT_BLANK)
    _set(props["documents"], minItems=1, maxItems=limits.max_documents)
    _set(props["documents"]["items"], maxLength=limits.max_document_chars)
    _set(props["instruction"], maxLength=limits.max_instruction_chars)
    _set(props["top_n"], minimum=0)
    _set(props["model"], enum=["", *models])
    for path in openapi["paths"].values():
        for operation in path.values():
            for param in operation.get("parameters", []):
                if param["name"] == "Idempotency-Key":
                    _set(param["schema"], maxLength=MAX_ID_CHARS, pattern=f"^{ID_PATTERN.pattern}$")
    return openapi


def _set(schema: dict[str, Any], **constraints: Any) -> None:
    """Constrain the non-null branch of ``X | None`` (or the schema itself)."""
    branches = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    for branch in branches:
        branch.update(constraints)
