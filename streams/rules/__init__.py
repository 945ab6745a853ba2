"""Pure rules: no Kafka, no database, no web framework; `now` is always an argument."""
