"""Unit masks, physical pruning and the pruning plan (METHOD §1 and §3)."""
