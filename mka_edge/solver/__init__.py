"""Choosing a plan: memory model, quality model, speed model, and the search over (K, quant type).

The solver's output is a plan: plain data that can be printed, diffed and executed later.
"""
