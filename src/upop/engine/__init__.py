"""A UPop run: the run object, its phases on the one step loop, the UPop part of a step, the run state and resume."""
