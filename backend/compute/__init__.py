"""The worker side, the only code that imports torch: models, training, evaluation, probes, calibration, the judge."""
