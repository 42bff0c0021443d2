"""Jitted sampling with s1 budget forcing."""

from jaxreason.sampling.config import BudgetForcing, SamplingConfig
from jaxreason.sampling.sampler import Sampler, SamplingOutput, bucket_length

__all__ = ["BudgetForcing", "SamplingConfig", "Sampler", "SamplingOutput", "bucket_length"]
