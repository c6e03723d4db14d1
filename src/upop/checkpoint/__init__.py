"""Compressed checkpoints: the folder format (save/load), reading folders without running their code, the allow-list, and the files that make a folder loadable from the Hub."""
