"""The actors: responders serve hosts, command actors turn admin requests into events."""
