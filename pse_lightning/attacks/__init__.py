"""Batched adversarial attacks; each is a plain callable usable without Lightning."""

from pse_lightning.attacks.apgd import APGD
from pse_lightning.attacks.autoattack import AutoAttack
from pse_lightning.attacks.base import (
    Attack,
    AttackBatch,
    AttackOptions,
    AttackResult,
    Perturbation,
)
from pse_lightning.attacks.cam_guided import CAMGuided
from pse_lightning.attacks.cw import CWL2
from pse_lightning.attacks.ddn import DDN
from pse_lightning.attacks.ead import EAD
from pse_lightning.attacks.fab import FAB
from pse_lightning.attacks.fgsm import FGSM
from pse_lightning.attacks.fmn import FMN
from pse_lightning.attacks.losses import other_max_index
from pse_lightning.attacks.norms import flat_norm
from pse_lightning.attacks.pgd import PGD
from pse_lightning.attacks.square import Square
from pse_lightning.attacks.strattack import StrAttack

__all__ = [
    "Attack", "AttackBatch", "AttackOptions", "AttackResult", "Perturbation",
    "APGD", "AutoAttack", "CAMGuided", "CWL2", "DDN", "EAD", "FAB", "FGSM", "FMN", "PGD", "Square",
    "StrAttack",
    # helpers other layers need: per-sample norms and the adversarial runner-up class
    "flat_norm", "other_max_index",
]  # fmt: skip
