"""drop-worker runtime: settings, broker, middleware, provider clients and resilience."""
