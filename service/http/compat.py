"""The other rerank conventions on one HTTP API: Jina and vLLM, TEI, and Voyage.

Every convention runs the same ``RerankCall`` through the same core (auth, limits, idempotent
replay, billing), so the scores for the same (query, document) pairs are the same whichever
shape asked for them. What differs is the JSON around them, and where two conventions share a
path (``POST /rerank``, ``POST /v1/rerank``) the request's own fields decide (``convention``):

1. ``texts`` present: TEI (``{query, texts, raw_scores, return_text, truncate}``), answered
   as TEI answers, a bare list of ``{index, score, text?}`` best first;
2. else a boolean ``truncation``: Voyage (``{query, documents, top_k, truncation: bool}``;
   its SDK always sends ``truncation``), answered ``{object: "list", data, model, usage}``;
3. else Cohere's shape, which is also Jina's and vLLM's (documents as strings or
   ``{"text": ...}``, ``return_documents``; the response carries ``usage.total_tokens``).

Each request model forbids the others' distinguishing fields, so the published schema is a
``oneOf`` that no body matches twice. ``/v2/rerank`` is Cohere's alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from service.calls import PromptOptions, RerankCall, RerankQuery, RerankReply, Truncation
from service.errors import Code, ServiceError
from service.http.schema import JsonInt, RerankRequest, RerankResponse, Version, only_outcome


class _Body(BaseModel):
    """What every convention's body has: strict types, no unknown fields, a query."""

    model_config = ConfigDict(strict=True, extra="forbid")

    query: str = Field(description="The search query; not blank.")


def _truncation(cut: bool | None) -> PromptOptions:
    """TEI's ``truncate`` and Voyage's ``truncation``: cut the document's tail, or refuse."""
    return PromptOptions(Truncation.END if cut else Truncation.NONE)


class TeiRequest(_Body):
    """Text Embeddings Inference's ``POST /rerank``."""

    texts: list[str] = Field(description="Candidate documents, at least one. Every one is billed.")
    raw_scores: bool | None = Field(None, description="score is the raw log-odds (our logit), not P(yes).")
    return_text: bool | None = Field(None, description="Echo each text as result.text.")
    truncate: bool | None = Field(None, description="Cut a pair longer than max_length (the document's tail); "
                                  "absent or false: such a call is 400, as TEI refuses it.")
    truncation_direction: Literal["Right", "Left"] | None = Field(
        None, description="Only 'Right' (the document's end) can be honoured; 'Left' with truncate is 400.")

    def to_call(self, api_key: str | None, idempotency_key: str | None) -> RerankCall:
        if self.truncate and self.truncation_direction == "Left":
            raise ServiceError(Code.INVALID_ARGUMENT, "truncation_direction 'Left' is not supported: a long "
                               "document loses its end ('Right'), never the query")
        query = RerankQuery(query=self.query, documents=self.texts, options=_truncation(self.truncate))
        return RerankCall([query], api_key=api_key, idempotency_key=idempotency_key)

    def response(self, reply: RerankReply, api_version: Version) -> list[TeiResult]:
        return [TeiResult(index=r.index, score=r.logit if self.raw_scores else r.score,
                          text=self.texts[r.index] if self.return_text else None)
                for r in only_outcome(reply).results]


class TeiResult(BaseModel):
    index: int
    score: float = Field(description="P(yes), or with raw_scores the raw log-odds.")
    text: str | None = Field(None, description="Only with return_text.")


class VoyageRequest(_Body):
    """Voyage AI's ``POST /v1/rerank``: ``top_k`` and a boolean ``truncation``."""

    documents: list[str] = Field(description="Candidate documents, at least one. Every one is billed.")
    model: str | None = Field(None, description="As in the Cohere shape.")
    top_k: JsonInt | None = Field(None, description="Return only the best top_k; absent: all.")
    return_documents: bool | None = Field(None, description="Echo each document as result.document.")
    truncation: bool = Field(description="true: cut a pair longer than max_length (the document's tail); "
                             "false: such a call is 400.")

    def to_call(self, api_key: str | None, idempotency_key: str | None) -> RerankCall:
        query = RerankQuery(query=self.query, documents=self.documents, top_n=self.top_k,
                            return_documents=bool(self.return_documents), options=_truncation(self.truncation))
        return RerankCall([query], api_key=api_key, model=self.model or None, idempotency_key=idempotency_key)

    def response(self, reply: RerankReply, api_version: Version) -> VoyageResponse:
        data = [VoyageResult(index=r.index, relevance_score=r.score, document=r.document)
                for r in only_outcome(reply).results]
        return VoyageResponse(data=data, model=reply.model, usage=VoyageUsage(total_tokens=reply.prompt_tokens))


class VoyageResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None


class VoyageUsage(BaseModel):
    total_tokens: int


class VoyageResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoyageResult]
    model: str
    usage: VoyageUsage


def convention(body: Any) -> str:
    """Which shape a body is, by its own fields (the module's docstring has the rule)."""
    if isinstance(body, dict):
        if "texts" in body:
            return "tei"
        if isinstance(body.get("truncation"), bool):
            return "voyage"
    return "cohere"


AnyRerankRequest = Annotated[
    Annotated[RerankRequest, Tag("cohere")] | Annotated[TeiRequest, Tag("tei")]
    | Annotated[VoyageRequest, Tag("voyage")],
    Discriminator(convention)]
AnyRerankResponse = RerankResponse | list[TeiResult] | VoyageResponse



class RerankBody(Protocol):
    """What a rerank route needs of a parsed body, whatever its convention."""

    def to_call(self, api_key: str | None, idempotency_key: str | None) -> RerankCall: ...
    def response(self, reply: RerankReply, api_version: Version) -> Any: ...
