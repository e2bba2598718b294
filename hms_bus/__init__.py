"""hms-bus: a workflow orchestrator for public-service desks over NATS JetStream."""
