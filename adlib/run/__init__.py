"""The steps of a benchmark run, each reading and writing files only, so the Snakemake workflow,
the CLI and :mod:`adlib.api` share them:

* :func:`prepare_data` (prepare.py): index a data set category, build its decoded-image cache;
* :func:`train_run` (train.py): train one configuration, write its weights and records;
* :func:`evaluate_run` (evaluate.py): score the test split, write metrics and pictures;
* :func:`predict_images` (predict.py): score new images with a finished run.

A step never leaves a half-written file behind (see :mod:`adlib.io`).
"""
from adlib.run.evaluate import evaluate_run
from adlib.run.predict import predict_images
from adlib.run.prepare import prepare_data
from adlib.run.train import train_run

__all__ = ["evaluate_run", "predict_images", "prepare_data", "train_run"]
