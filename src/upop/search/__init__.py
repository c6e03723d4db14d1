"""The UPop search (METHOD §2): its settings, the unit scores, and the selection of the prune set."""
