"""router/grpc/tei.proto is TEI's wire contract: package, services, methods (and which side
streams), messages, field names and numbers. A TEI client built from TEI's proto/tei.proto must
work unchanged, so any drift here is a break, whatever our own tests say."""

from __future__ import annotations

from router.grpc.protos import pb

# (method, input, output, client streams, server streams), from TEI's proto/tei.proto.
SERVICES = {
    "Info": [("Info", "InfoRequest", "InfoResponse", False, False)],
    "Embed": [
        ("Embed", "EmbedRequest", "EmbedResponse", False, False),
        ("EmbedStream", "EmbedRequest", "EmbedResponse", True, True),
        ("EmbedSparse", "EmbedSparseRequest", "EmbedSparseResponse", False, False),
        ("EmbedSparseStream", "EmbedSparseRequest", "EmbedSparseResponse", True, True),
        ("EmbedAll", "EmbedAllRequest", "EmbedAllResponse", False, False),
        ("EmbedAllStream", "EmbedAllRequest", "EmbedAllResponse", True, True),
    ],
    "Predict": [
        ("Predict", "PredictRequest", "PredictResponse", False, False),
        ("PredictPair", "PredictPairRequest", "PredictResponse", False, False),
        ("PredictStream", "PredictRequest", "PredictResponse", True, True),
        ("PredictPairStream", "PredictPairRequest", "PredictResponse", True, True),
    ],
    "Rerank": [
        ("Rerank", "RerankRequest", "RerankResponse", False, False),
        ("RerankStream", "RerankStreamRequest", "RerankResponse", True, False),
    ],
    "Tokenize": [
        ("Tokenize", "EncodeRequest", "EncodeResponse", False, False),
        ("TokenizeStream", "EncodeRequest", "EncodeResponse", True, True),
        ("Decode", "DecodeRequest", "DecodeResponse", False, False),
        ("DecodeStream", "DecodeRequest", "DecodeResponse", True, True),
    ],
}

_DIRECTION = ("truncation_direction", "TruncationDirection")
# message -> [(field, number, type name or scalar, repeated)]
MESSAGES = {
    "InfoRequest": [],
    "InfoResponse": [
        ("version", 1, "string"), ("sha", 2, "string"), ("docker_label", 3, "string"),
        ("model_id", 4, "string"), ("model_sha", 5, "string"), ("model_dtype", 6, "string"),
        ("model_type", 7, "ModelType"), ("max_concurrent_requests", 8, "uint32"),
        ("max_input_length", 9, "uint32"), ("max_batch_tokens", 10, "uint32"),
        ("max_batch_requests", 11, "uint32"), ("max_client_batch_size", 12, "uint32"),
        ("tokenization_workers", 13, "uint32")],
    "Metadata": [
        ("compute_chars", 1, "uint32"), ("compute_tokens", 2, "uint32"),
        ("total_time_ns", 3, "uint64"), ("tokenization_time_ns", 4, "uint64"),
        ("queue_time_ns", 5, "uint64"), ("inference_time_ns", 6, "uint64")],
    "EmbedRequest": [("inputs", 1, "string"), ("truncate", 2, "bool"), ("normalize", 3, "bool"),
                     (_DIRECTION[0], 4, _DIRECTION[1]), ("prompt_name", 5, "string")],
    "EmbedResponse": [("embeddings", 1, "float[]"), ("metadata", 2, "Metadata")],
    "EmbedSparseRequest": [("inputs", 1, "string"), ("truncate", 2, "bool"),
                           (_DIRECTION[0], 3, _DIRECTION[1]), ("prompt_name", 4, "string")],
    "SparseValue": [("index", 1, "uint32"), ("value", 2, "float")],
    "EmbedSparseResponse": [("sparse_embeddings", 1, "SparseValue[]"),
                            ("metadata", 2, "Metadata")],
    "EmbedAllRequest": [("inputs", 1, "string"), ("truncate", 2, "bool"),
                        (_DIRECTION[0], 3, _DIRECTION[1]), ("prompt_name", 4, "string")],
    "TokenEmbedding": [("embeddings", 1, "float[]")],
    "EmbedAllResponse": [("token_embeddings", 1, "TokenEmbedding[]"),
                         ("metadata", 2, "Metadata")],
    "PredictRequest": [("inputs", 1, "string"), ("truncate", 2, "bool"),
                       ("raw_scores", 3, "bool"), (_DIRECTION[0], 4, _DIRECTION[1])],
    "PredictPairRequest": [("inputs", 1, "string[]"), ("truncate", 2, "bool"),
                           ("raw_scores", 3, "bool"), (_DIRECTION[0], 4, _DIRECTION[1])],
    "Prediction": [("score", 1, "float"), ("label", 2, "string")],
    "PredictResponse": [("predictions", 1, "Prediction[]"), ("metadata", 2, "Metadata")],
    "RerankRequest": [("query", 1, "string"), ("texts", 2, "string[]"), ("truncate", 3, "bool"),
                      ("raw_scores", 4, "bool"), ("return_text", 5, "bool"),
                      (_DIRECTION[0], 6, _DIRECTION[1])],
    "RerankStreamRequest": [("query", 1, "string"), ("text", 2, "string"),
                            ("truncate", 3, "bool"), ("raw_scores", 4, "bool"),
                            ("return_text", 5, "bool"), (_DIRECTION[0], 6, _DIRECTION[1])],
    "Rank": [("index", 1, "uint32"), ("text", 2, "string"), ("score", 3, "float")],
    "RerankResponse": [("ranks", 1, "Rank[]"), ("metadata", 2, "Metadata")],
    "EncodeRequest": [("inputs", 1, "string"), ("add_special_tokens", 2, "bool"),
                      ("prompt_name", 3, "string")],
    "SimpleToken": [("id", 1, "uint32"), ("text", 2, "string"), ("special", 3, "bool"),
                    ("start", 4, "uint32"), ("stop", 5, "uint32")],
    "EncodeResponse": [("tokens", 1, "SimpleToken[]")],
    "DecodeRequest": [("ids", 1, "uint32[]"), ("skip_special_tokens", 2, "bool")],
    "DecodeResponse": [("text", 1, "string")],
}
# Fields declared `optional` in TEI's proto (presence is part of the contract).
OPTIONAL = {("InfoResponse", "sha"), ("InfoResponse", "docker_label"),
            ("InfoResponse", "model_sha"), ("InfoResponse", "max_batch_requests"),
            ("EmbedRequest", "prompt_name"), ("EmbedSparseRequest", "prompt_name"),
            ("EmbedAllRequest", "prompt_name"), ("Rank", "text"),
            ("EncodeRequest", "prompt_name"), ("SimpleToken", "start"), ("SimpleToken", "stop")}
ENUMS = {
    "ModelType": {"MODEL_TYPE_EMBEDDING": 0, "MODEL_TYPE_CLASSIFIER": 1,
                  "MODEL_TYPE_RERANKER": 2},
    "TruncationDirection": {"TRUNCATION_DIRECTION_RIGHT": 0, "TRUNCATION_DIRECTION_LEFT": 1},
}
_SCALARS = {9: "string", 8: "bool", 13: "uint32", 4: "uint64", 2: "float"}  # FieldDescriptor


def _type_name(field) -> str:
    if field.message_type is not None:
        name = field.message_type.name
    elif field.enum_type is not None:
        name = field.enum_type.name
    else:
        name = _SCALARS[field.type]
    repeated = getattr(field, "is_repeated", None)
    repeated = repeated if repeated is not None else field.label == field.LABEL_REPEATED
    return f"{name}[]" if repeated else name


def test_package_and_services() -> None:
    assert pb.DESCRIPTOR.package == "tei.v1"
    got = {
        name: [(m.name, m.input_type.name, m.output_type.name, m.client_streaming,
                m.server_streaming) for m in service.methods]
        for name, service in pb.DESCRIPTOR.services_by_name.items()
    }
    assert got == SERVICES


def test_messages_fields_and_numbers() -> None:
    got = {
        name: [(f.name, f.number, _type_name(f)) for f in message.fields]
        for name, message in pb.DESCRIPTOR.message_types_by_name.items()
    }
    assert got == MESSAGES
    optional = {(name, f.name) for name, message in pb.DESCRIPTOR.message_types_by_name.items()
                for f in message.fields
                if f.containing_oneof is not None and f.containing_oneof.name.startswith("_")}
    assert optional == OPTIONAL


def test_enums() -> None:
    assert {name: {v.name: v.number for v in enum.values}
            for name, enum in pb.DESCRIPTOR.enum_types_by_name.items()} == ENUMS


def test_stubs_are_stale_once_protobuf_or_grpcio_tools_changes(monkeypatch) -> None:
    # Stubs made by a newer grpcio-tools than the protobuf runtime refuse to import: a protobuf
    # downgraded after generation must regenerate them, not fail at the next start.
    import importlib.metadata

    from router.grpc import protos

    assert protos.stubs_fresh()
    real = importlib.metadata.version
    for changed in ("protobuf", "grpcio-tools"):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name, changed=changed: "0.0.1" if name == changed
                            else real(name))
        assert not protos.stubs_fresh(), changed
    monkeypatch.setattr(importlib.metadata, "version", real)
    assert protos.stubs_fresh()


def test_stubs_are_stale_once_a_generated_file_is_missing(monkeypatch) -> None:
    from router.grpc import protos

    monkeypatch.setattr(protos, "GENERATED", (*protos.GENERATED, "tei_pb2_missing.py"))
    assert not protos.stubs_fresh()


def test_fresh_stubs_are_imported_as_they_are(monkeypatch) -> None:
    # Not regenerated at each start: the package directory may be read-only there.
    from router.grpc import protos

    def generate() -> None:
        raise AssertionError("fresh stubs regenerated")

    monkeypatch.setattr(protos, "generate", generate)
    protos.ensure_stubs()


def test_a_read_only_package_directory_says_how_to_generate_the_stubs(monkeypatch) -> None:
    import pytest

    from router.grpc import protos

    def generate() -> None:
        raise PermissionError("denied")

    monkeypatch.setattr(protos, "stubs_fresh", lambda: False)
    monkeypatch.setattr(protos, "generate", generate)
    with pytest.raises(ImportError) as info:
        protos.ensure_stubs()
    assert str(info.value).endswith(" (denied): run `python -m router.grpc.protos` once as the "
                                    "user that installed embedserve")


def test_generate_makes_the_stubs_and_their_stamp_last(monkeypatch, tmp_path) -> None:
    import shutil

    import pytest

    from router.grpc import protos

    shutil.copy(protos.PROTO, tmp_path / "tei.proto")
    monkeypatch.setattr(protos, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(protos, "PROTO", tmp_path / "tei.proto")
    monkeypatch.setattr(protos, "STAMP", tmp_path / "tei_pb2.sha256")
    assert not protos.stubs_fresh()
    protos.generate()
    assert protos.stubs_fresh()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["tei.proto", "tei_pb2.sha256", *protos.GENERATED])  # no scratch directory left
    lines = (tmp_path / "tei_pb2_grpc.py").read_text().splitlines()
    assert protos.PACKAGE_IMPORT in lines and protos.FLAT_IMPORT not in lines
    # A .proto protoc refuses: its words, and no stamp vouching for stale files.
    (tmp_path / "tei.proto").write_text('syntax = "proto3";\nmessage {\n')
    with pytest.raises(RuntimeError) as info:
        protos.generate()
    assert str(info.value).startswith(f"protoc failed on {tmp_path / 'tei.proto'}:\n")
    assert "tei.proto:" in str(info.value).split("\n", 1)[1]
    assert not protos.stubs_fresh()
