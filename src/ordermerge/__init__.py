"""ordermerge: fine-tune one base model K times in different data orders and merge the results.

Implements Ju et al., *Mitigating Training Imbalance in LLM Fine-Tuning via Selective Parameter
Merging* (EMNLP 2024, main conference: ACL Anthology 2024.emnlp-main.892; arXiv 2410.03743).
Importing the package is cheap (no torch): Snakemake parses it on every job to validate the config.
"""

__version__ = "0.1.0"
