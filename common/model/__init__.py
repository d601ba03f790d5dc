"""The Phi-3.5-vision model and processor, and the official checkpoint's files and format. Imports nothing of
ours but the bottom modules (`common.errors`, `common.io`, `common.dtypes`, `common.ranks`).
"""
