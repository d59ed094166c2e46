"""kopf handlers: thin adapters from API events to the agent and controller logic."""
