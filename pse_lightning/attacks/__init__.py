"""Batched adversarial attacks; each is a plain callable usable without Lightning."""

from pse_lightning.attacks.base import Attack, AttackResult
from pse_lightning.attacks.fgsm import FGSM
from pse_lightning.attacks.pgd import PGD

__all__ = ["Attack", "AttackResult", "FGSM", "PGD"]

from pse_lightning.attacks.cam_guided import CAMGuided  # noqa: E402

__all__ += ["CAMGuided"]
