"""Each fact is declared once: the request limits in ``service.calls.Limits`` and the usage
totals in ``service.seams.UsageTotals``. Every other type that carries them (the proto, the
client, the HTTP schema, the serve flags) must match, field for field: a limit added in
one place only fails here, not in a user's hands."""

from __future__ import annotations

import dataclasses

from rerank.v1 import rerank_pb2 as pb

from clients import client
from service.calls import Limits
from service.config import ServeConfig
from service.grpc import wire
from service.http import schema as gateway_schema
from service.seams import ModelInfo, UsageTotals
from worker.types import Device, DType

LIMITS = [f.name for f in dataclasses.fields(Limits)]


def test_every_carrier_of_the_limits_has_exactly_its_fields() -> None:
    assert [f.name for f in pb.Limits.DESCRIPTOR.fields] == LIMITS
    assert [f.name for f in dataclasses.fields(client.Limits)] == LIMITS
    # the HTTP API takes one query a call, so it publishes every limit but the query count
    assert list(gateway_schema.ModelLimits.model_fields) == [n for n in LIMITS if n != "max_queries"]


def test_each_limit_is_a_serve_knob_with_the_same_default() -> None:
    knobs = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    assert {n: knobs.get(n) for n in LIMITS} == dataclasses.asdict(Limits())
    chosen = Limits(*range(1, len(LIMITS) + 1))
    assert ServeConfig(**dataclasses.asdict(chosen)).limits() == chosen


def test_limits_cross_the_wire_unchanged() -> None:
    chosen = Limits(*range(1, len(LIMITS) + 1))
    message = wire.model_info_message(ModelInfo("m", 512, DType.BFLOAT16, Device.CUDA), chosen)
    seen = client._model_info(pb.ModelInfo.FromString(message.SerializeToString()))
    assert dataclasses.asdict(seen.limits) == dataclasses.asdict(chosen)
    assert (seen.model, seen.max_length, seen.dtype, seen.device) == ("m", 512, "bfloat16", "cuda")


def test_usage_totals_have_one_shape_on_every_side() -> None:
    totals = [f.name for f in dataclasses.fields(UsageTotals)]
    assert list(gateway_schema.UsageTotal.model_fields) == totals
    assert list(gateway_schema.UsageDay.model_fields) == [*totals, "date"]
