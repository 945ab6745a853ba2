"""The public HTTP API: authenticated, tenant-scoped, producing to Kafka and reading state."""
