"""Stages of the pipeline (teacher → transfer → probe), each wiring config, data, models and the engine."""
