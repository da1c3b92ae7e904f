"""Spark entry points, one per stage: `spark-submit jobs/<stage>.py --help`."""
