"""Runners: experiments built from the stages and the defenses, with their outputs.

nad: the NAD pipeline (backdoored model -> teacher -> NAD) and its results.json.
table1: the paper's comparison (attacks x {no defense, FT, FP, MCR, NAD}) and its
tables and figures.
"""
