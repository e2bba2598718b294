"""The workflow language (YAML and a Python builder) and its pure engine.

Nothing in this package imports NATS: it is tested in memory.
"""
