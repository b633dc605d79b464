"""KSI workers: the Dramatiq broker, the Claude actor, and the runner."""
