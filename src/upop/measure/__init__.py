"""What upop measures: parameters and FLOPs, paired latency, and the per-unit latency table of ``cost="latency"``."""
