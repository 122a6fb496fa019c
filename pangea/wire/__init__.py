"""The wire: Pangea's message types, Cap'n Proto bytes, chunks of flat vectors, compression.

Pure: no NATS, no torch (Tensor.torch() imports it only when asked)."""
