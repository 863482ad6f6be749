"""Tools shared by tests, benchmarks and the demo: image builders, servers, proxies."""
