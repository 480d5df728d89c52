"""The coordinator: Flower ServerApp, gRPC services, storage."""
