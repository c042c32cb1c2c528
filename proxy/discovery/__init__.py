"""Backend discovery: static lists (config) and Consul. Discovery publishes complete
BackendSets; the balancer swaps them in whole."""
