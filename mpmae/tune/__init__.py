"""Ray Tune sweeps of pretraining configs, ranked by a linear probe of each trial's encoder."""
