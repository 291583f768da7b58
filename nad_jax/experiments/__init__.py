"""Runners: experiments built from the stages and the defenses, with their outputs.

table1: the paper's comparison (attacks x {no defense, FT, FP, MCR, NAD}) and its
tables and figures. The NAD pipeline's runner is `nad_jax.pipeline.run`.
"""
