"""ordermerge: fine-tune one base model K times in different data orders and merge the results.

Implements Ju et al., *Mitigating Training Imbalance in LLM Fine-Tuning via Selective Parameter
Merging* (arXiv 2410.03743). Importing the package is cheap (no torch): Snakemake parses it on
every job to validate the config.
"""

__version__ = "0.1.0"
