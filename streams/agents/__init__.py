"""Thin Faust agents: decode, apply a pure rule, update a table or produce; nothing else."""
