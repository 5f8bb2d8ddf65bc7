"""The HTTP/JSON shapes of the API: what a request may contain, and what comes back.

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
from dataclasses import asdict
from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from service.calls import (
    ID_PATTERN,
    MAX_DOCUMENT_TOKENS,
    MAX_ID_CHARS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    PRIORITY_RULE,
    Limits,
    PromptOptions,
    QueryOutcome,
    RerankCall,
    RerankQuery,
    RerankReply,
    Truncation,
)
from service.errors import Code, ServiceError


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 3.0; strict pydantic's does not. Accept what the schema says."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _iso_date(value: Any) -> Any:
    """Only YYYY-MM-DD, as ``format: date`` says (pydantic alone would read "0" as 1970-01-01)."""
    if isinstance(value, str) and not (len(value) == 10 and value[4] == value[7] == "-"):
        raise ValueError("expected a date as YYYY-MM-DD")
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]
# Any value parses; ``_priority`` refuses a non-integer with 400 naming the field (issue 11),
# where a type error elsewhere in the body is pydantic's 422. The schema says what is accepted.
PriorityValue = Annotated[Any, WithJsonSchema({"type": "integer", "minimum": MIN_PRIORITY,
                                               "maximum": MAX_PRIORITY})]
IsoDate = Annotated[date, BeforeValidator(_iso_date)]
SEARCH_UNIT_DOCUMENTS = 100  # Cohere's unit: one query with up to 100 documents
# "Not blank" as the core means it (``str.strip``), in a regex any JSON Schema tool reads:
# one character outside Python's whitespace set (which differs from ECMA's ``\s``).
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class DocumentObject(BaseModel):
    """A document as Cohere v1, Jina and vLLM send it: ``text`` and, for rank_fields, more keys."""

    model_config = ConfigDict(strict=True, extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)
    text: str

    def fields(self) -> dict[str, str]:
        return {"text": self.text, **(self.__pydantic_extra__ or {})}


Document = str | DocumentObject


class RerankRequest(BaseModel):
    """Every field of Cohere's v1 and v2 rerank requests, plus ours; ``null`` is "not set"
    for every field. What each does is in docs/HTTP_API.md, "Request fields"."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="The model to use; absent or empty: the served model. "
                              "Another name is 404.")
    query: str = Field(description="The search query; not blank.")
    documents: list[Document] = Field(description="Candidate documents, at least one: strings, or objects "
                                      "whose `text` (or rank_fields) is ranked. Every document is billed.")
    top_n: JsonInt | None = Field(None, description="Return only the best top_n results; absent or 0: all. "
                              "Every document is still scored and billed.")
    return_documents: bool | None = Field(None, description="Echo each result's document in result.document "
                                          "(the object as sent, for object documents).")
    instruction: str | None = Field(None, description="The task instruction, in English; absent: "
                                    "'Given a web search query, retrieve relevant passages that answer "
                                    "the query'.")
    truncation: Literal["end", "none"] | None = Field(
        None, description="A document longer than its chunks hold (max_chunks_per_doc pairs of the model's "
        "max_length): 'end' (the default) drops the document's tail (the query is never cut; result.truncated "
        "says so), 'none' refuses the request with 400.")
    max_tokens_per_doc: JsonInt | None = Field(
        None, description="Cohere v2: cut each document to this many of its own tokens (Qwen3 tokens) before "
        "scoring, whatever truncation says; at least 1.")
    rank_fields: list[str] | None = Field(
        None, description="Cohere v1: the keys of object documents to rank on, in order, as 'key: value' "
        "lines; absent: the `text` key.")
    max_chunks_per_doc: JsonInt | None = Field(
        None, description="Cohere v1 (accepted on v2 too): a document longer than the model's max_length is "
        "scored as up to this many chunks (the template, the query and the next window of its tokens each), "
        "and its score is the best chunk's; result.chunks and result.best_chunk say how. 1: no chunking. "
        "Absent: the server's default (GET /v1/models: limits.max_chunks_per_doc); more is clamped to it, "
        "with a meta.warnings entry. At least 1.")
    priority: PriorityValue | None = Field(
        None, description=f"Scheduling priority, {MIN_PRIORITY} (first) to {MAX_PRIORITY}, as Cohere v2: better "
        "work runs first, worse work still gets a bounded share. Absent: the API key's default (0 without "
        "keys); a key may be limited to a best priority, and a better one asked for is clamped to it "
        "(meta.warnings says so). Outside the range or not an integer: 400.")

    def to_call(self, api_key: str | None, idempotency_key: str | None) -> RerankCall:
        query = RerankQuery(query=self.query, documents=self.texts(), instruction=self.instruction,
                            top_n=self.top_n, return_documents=bool(self.return_documents),
                            options=PromptOptions(Truncation(self.truncation or "end"), self.max_tokens_per_doc,
                                                  self.max_chunks_per_doc))
        return RerankCall([query], api_key=api_key, model=self.model or None,
                          idempotency_key=idempotency_key,  # "" is refused by the core
                          priority=_priority(self.priority))  # its range too

    def texts(self) -> list[str]:
        """What the model ranks: strings as sent, objects by ``rank_fields`` (absent: ``text``)."""
        return [d if isinstance(d, str) else _object_text(d.fields(), self.rank_fields) for d in self.documents]

    def warnings(self) -> list[str]:
        notes = []
        missing = [i for i, d in enumerate(self.documents)
                   if self.rank_fields and not isinstance(d, str) and not set(self.rank_fields) & set(d.fields())]
        if missing:
            notes.append(f"documents {missing[:10]} have none of the rank_fields: ranked on their text")
        return notes

    def response(self, reply: RerankReply, api_version: Version) -> RerankResponse:
        echo = self.documents if self.return_documents else None
        return RerankResponse.from_reply(reply, api_version, echo, self.warnings())


def _object_text(fields: dict[str, str], rank_fields: list[str] | None) -> str:
    """Cohere's rule: the named keys in order, one ``key: value`` line each; none named or
    none present: the ``text`` key."""
    present = [f"{key}: {fields[key]}" for key in rank_fields or () if key in fields]
    return "\n".join(present) if present else fields["text"]


def _priority(value: Any) -> int | None:
    value = _integral(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ServiceError(Code.INVALID_ARGUMENT, f"{PRIORITY_RULE}, got {type(value).__name__}")


class ResultDocument(BaseModel):
    """The document as sent: ``text`` for a string, every key of an object."""

    model_config = ConfigDict(extra="allow")
    text: str | None = None


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request's documents.")
    relevance_score: float = Field(description="P(yes) in [0, 1]: sigmoid(logit).")
    logit: float = Field(description="Raw log-odds logit(yes) - logit(no); keeps the resolution that "
                         "relevance_score loses near 0 and 1.")
    truncated: bool = Field(description="Tokens of the document went unscored: past its last chunk (see "
                            "max_chunks_per_doc), or cut by max_tokens_per_doc.")
    document: ResultDocument | None = Field(None, description="Only with return_documents.")
    chunks: int = Field(1, description="The chunks the document was scored as: 1 unless it is longer than the "
                        "model's max_length. Billing counts it as one document.")
    best_chunk: int = Field(0, description="The chunk that gave relevance_score (0-based, the first of equals).")


def result_document(sent: Document) -> ResultDocument:
    return ResultDocument(text=sent) if isinstance(sent, str) else ResultDocument(**sent.fields())


class Version(StrEnum):
    """The API version a rerank path answers as (``meta.api_version.version``)."""

    V1 = "1"
    V2 = "2"


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
    warnings: list[str] | None = Field(None, description="What the call asked for and did not get (absent: "
                                       "nothing).")


class Usage(BaseModel):
    """The size of the call, whether or not this response billed it (see meta.billed_units)."""

    documents: int
    prompt_tokens: int = Field(description="Tokens of all prompts, as a pair-at-a-time loop computes them.")
    total_tokens: int = Field(description="The same as prompt_tokens, under Jina's and vLLM's name.")
    computed_tokens: int = Field(description="Tokens the model ran (the shared query prefix once).")


class RerankResponse(BaseModel):
    id: str = Field(description="The call's request id.")
    model: str
    results: list[RerankResult] = Field(description="Best first (ties keep input order), cut to top_n.")
    meta: Meta
    usage: Usage
    timings_ms: dict[str, float] = Field(description="Server-side timing of the original call.")

    @classmethod
    def from_reply(cls, reply: RerankReply, api_version: Version, sent: list[Document] | None = None,
                   warnings: list[str] | None = None) -> RerankResponse:
        """``sent``: the documents as sent, to echo (objects whole); None echoes none."""
        docs = reply.billed_documents
        billed = 0 if reply.replayed else docs
        results = [RerankResult(index=r.index, relevance_score=r.score, logit=r.logit, truncated=r.truncated,
                                document=None if sent is None else result_document(sent[r.index]),
                                chunks=r.chunks, best_chunk=r.best_chunk)
                   for r in only_outcome(reply).results]
        notes = [*reply.warnings, *(warnings or [])]
        return cls(
            id=reply.request_id, model=reply.model, results=results,
            meta=Meta(api_version=ApiVersion(version=api_version.value),
                      billed_units=BilledUnits(documents=billed,
                                               search_units=math.ceil(billed / SEARCH_UNIT_DOCUMENTS)),
                      tokens=TokenCounts(input_tokens=reply.prompt_tokens, output_tokens=0),
                      replayed=reply.replayed, warnings=notes or None),
            usage=Usage(documents=docs, prompt_tokens=reply.prompt_tokens, total_tokens=reply.prompt_tokens,
                        computed_tokens=reply.computed_tokens),
            timings_ms=asdict(reply.timings_ms))


def only_outcome(reply: RerankReply) -> QueryOutcome:
    if len(reply.outcomes) != 1:
        raise AssertionError(f"an HTTP call came back with {len(reply.outcomes)} outcomes: this is a bug")
    return reply.outcomes[0]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and, where it can, what to change.")


class ModelLimits(BaseModel):  # service.calls.Limits but max_queries (one query a call here)
    max_documents: int
    max_query_chars: int
    max_instruction_chars: int
    max_document_chars: int
    max_request_bytes: int
    max_chunks_per_doc: int = Field(description="Chunks a long document is scored as when a call names no "
                                    "max_chunks_per_doc, and the most it may ask for.")


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


class UsageTotal(BaseModel):  # service.seams.UsageTotals on the wire (tests/test_facts_once.py)
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
    schemas = openapi["components"]["schemas"]
    for name, documents in (("RerankRequest", "documents"), ("TeiRequest", "texts"), ("VoyageRequest", "documents")):
        if name in schemas:
            _limit_request(schemas[name]["properties"], documents, limits, models)
    if "DocumentObject" in schemas:
        obj = schemas["DocumentObject"]
        for text in (obj["properties"]["text"], obj["additionalProperties"]):
            _set(text, maxLength=limits.max_document_chars)
    for path in openapi["paths"].values():
        for operation in path.values():
            for param in operation.get("parameters", []):
                if param["name"] == "Idempotency-Key":
                    _set(param["schema"], maxLength=MAX_ID_CHARS, pattern=f"^{ID_PATTERN.pattern}$")
    return openapi


def _limit_request(props: dict[str, Any], documents: str, limits: Limits, models: list[str]) -> None:
    _set(props["query"], maxLength=limits.max_query_chars, pattern=NOT_BLANK)
    _set(props[documents], minItems=1, maxItems=limits.max_documents)
    items = props[documents]["items"]
    _set(items.get("anyOf", [items])[0], maxLength=limits.max_document_chars)  # the string branch
    for key, constraints in (("top_n", {"minimum": 0}), ("top_k", {"minimum": 0}),
                             ("max_tokens_per_doc", {"minimum": 1, "maximum": MAX_DOCUMENT_TOKENS}),
                             ("max_chunks_per_doc", {"minimum": 1}),
                             ("model", {"enum": ["", *models]}),
                             ("instruction", {"maxLength": limits.max_instruction_chars})):
        if key in props:
            _set(props[key], **constraints)


def _set(schema: dict[str, Any], **constraints: Any) -> None:
    """Constrain the non-null branch of ``X | None`` (or the schema itself)."""
    branches = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    for branch in branches:
        branch.update(constraints)
