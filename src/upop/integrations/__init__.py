"""upop inside other libraries' training loops."""
