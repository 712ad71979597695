"""The queue: run settings, the job manager, its store (DuckDB), executors, tasks and the service client."""
