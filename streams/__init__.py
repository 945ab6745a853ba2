"""The Faust worker: agents, tables and timers. Pure rules live in `streams.rules`."""
