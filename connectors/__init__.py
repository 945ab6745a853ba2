"""Channel bridges and clients of outside services."""
