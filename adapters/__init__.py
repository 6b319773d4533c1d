"""Everything about adapters: the PEFT format, the DoRA math, compiling, storing and merging.

Nothing in here speaks HTTP; the gateway depends on this package, never the other way round.
"""
