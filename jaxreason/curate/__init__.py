"""s1-style data curation (SPEC §7): quality, dedup, decontamination, difficulty, diversity.

`python -m jaxreason.curate --pool POOL --out DIR` runs the stages in order over a pool of rows
and writes the selected rows, what every stage kept and dropped (and why), and a report.
"""

from jaxreason.curate.difficulty import Difficulty, ModelSolver
from jaxreason.curate.stages import (Decontaminate, Deduplicate, Diversity, Quality, Row, Stage,
                                     StageResult, s1_diversity_sample)
from jaxreason.curate.pipeline import curate, load_pool

__all__ = ["ModelSolver", "Decontaminate", "Deduplicate", "Difficulty", "Diversity", "Quality", "Row", "Stage", "StageResult",
           "curate", "load_pool", "s1_diversity_sample"]
