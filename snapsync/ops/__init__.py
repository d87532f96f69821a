"""The jobs a timer runs and what surrounds them: the runner, hooks, checks, metrics, health pings, the demo."""
