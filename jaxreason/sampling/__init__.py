"""Jitted sampling with s1 budget forcing."""

from jaxreason.sampling.config import BudgetForcing, SamplingConfig
from jaxreason.sampling import metrics
from jaxreason.sampling.sampler import SampleBatch, Sampler, SamplingOutput, bucket_length

__all__ = ["BudgetForcing", "SamplingConfig", "SampleBatch", "Sampler", "SamplingOutput", "bucket_length", "metrics"]
