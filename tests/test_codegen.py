"""The contract: committed stubs equal a fresh generation, and the proto explains itself."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from clients import codegen


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    stale = [name for name, path in zip(codegen.GENERATED, fresh, strict=True)
             if path.read_bytes() != (codegen.OUT_ROOT / name).read_bytes()]
    assert not stale, (f"{stale} differ from protos/: run `python -m clients.codegen` and commit "
                       "(or check the pinned grpcio-tools / mypy-protobuf versions)")


def test_every_service_rpc_message_field_and_enum_value_is_commented(tmp_path: Path) -> None:
    # the proto is what callers in other languages read: nothing in it goes unexplained
    from grpc_tools import protoc

    out = tmp_path / "rerank.desc"
    assert protoc.main(["protoc", f"-I{codegen.PROTO_ROOT}", "--include_source_info",
                        f"--descriptor_set_out={out}", *codegen.PROTOS]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    commented = {tuple(loc.path) for loc in file.source_code_info.location
                 if (loc.leading_comments + loc.trailing_comments).strip()}
    missing = [name for path, name in _elements(file) if path not in commented]
    assert not missing, f"uncommented in rerank.proto: {missing}"


def _elements(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[tuple[int, ...], str]]:
    # SourceCodeInfo paths: 4 = message_type, 2 = field; 5 = enum_type, 2 = value;
    # 6 = service, 2 = method
    found: list[tuple[tuple[int, ...], str]] = []
    for i, message in enumerate(file.message_type):
        found.append(((4, i), message.name))
        found += [((4, i, 2, j), f"{message.name}.{f.name}") for j, f in enumerate(message.field)]
    for i, enum in enumerate(file.enum_type):
        found.append(((5, i), enum.name))
        found += [((5, i, 2, j), f"{enum.name}.{v.name}") for j, v in enumerate(enum.value)]
    for i, service in enumerate(file.service):
        found.append(((6, i), service.name))
        found += [((6, i, 2, j), f"{service.name}.{m.name}") for j, m in enumerate(service.method)]
    return found
