"""Rows to training examples: the example format, data sources and file formats, datasets, the collator, the
validation pass and its cache. Imports the model layer and the bottom modules.
"""
