"""Headless core of ltm-tui. Each folder is one concern, and imports only the folders below it
(tests/test_import_hygiene.py states the rule):

    service.py   the job service: one process a workspace, hosting the queue and the studies
    studies/     attribution over file subsets, hyperparameter search, the time forecast
    jobs/        run settings, the job manager, the store (DuckDB), executors, tasks, the client
    scoring/     batteries of scenes, the measures with intervals, statistics
    ingest/      corpora of every file type, streamed; token packing
    core/        errors, job states, training config, the workspace, events
    compute/     the worker side, the only code that imports torch (it uses everything but jobs)

Nothing in this package imports textual.
"""
