"""Run folders: the one owner of a folder (lock, overwrite policy, atomic writes) and the report written into it."""
