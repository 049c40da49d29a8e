"""The gRPC API (`embedserve --grpc`): TEI's `tei.v1` services over the same InferenceService as
the HTTP routes, plus grpc.health.v1 and server reflection. Needs the `grpc` extra."""
