"""Demo workers for the example workflows: `hms worker run examples.workers.<module>:<fn>`."""
