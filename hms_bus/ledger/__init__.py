"""The ledger: a hash chain of facts per run, and what reads it.

Pure parts: `chain` (entry format, chain rule, stable order), `verify`, `timeline`.
I/O: `store` (batched direct reads, optimistic appends), `writer` (the actor's
batching appender), `reader` (timelines and verification for the CLI and SDK),
`replay` (a recorded run against another workflow version).
"""
