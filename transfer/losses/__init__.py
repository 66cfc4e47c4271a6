"""Losses of contrastive knowledge transfer: CRD/CKTF's NCE objective and memory banks, KD, projection heads."""

from transfer.losses.kd import KDLoss
from transfer.losses.memory_bank import MemoryBank
from transfer.losses.nce import NCEObjective, NCEOutput
from transfer.losses.projection import ProjectionHead, pool_flatten

__all__ = ["KDLoss", "MemoryBank", "NCEObjective", "NCEOutput", "ProjectionHead", "pool_flatten"]
