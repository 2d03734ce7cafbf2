"""Lowering TaskGraphs to Plans, and the executors that follow them."""
