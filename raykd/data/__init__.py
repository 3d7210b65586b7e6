"""Data in and out of the pipeline: interaction-log readers, date parsing, the synthetic log
generator, external teacher scores. No Ray.
"""
