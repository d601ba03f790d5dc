"""The commands that use a trained model: export (an official-format folder) and predict.
"""
