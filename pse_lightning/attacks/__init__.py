"""Batched adversarial attacks; each is a plain callable usable without Lightning."""

from pse_lightning.attacks.base import Attack, AttackBatch, AttackResult
from pse_lightning.attacks.fgsm import FGSM
from pse_lightning.attacks.pgd import PGD

__all__ = ["Attack", "AttackBatch", "AttackResult", "FGSM", "PGD"]

from pse_lightning.attacks.cam_guided import CAMGuided  # noqa: E402

__all__ += ["CAMGuided"]

from pse_lightning.attacks.cw import CWL2  # noqa: E402
from pse_lightning.attacks.ead import EAD  # noqa: E402
from pse_lightning.attacks.strattack import StrAttack  # noqa: E402

__all__ += ["CWL2", "EAD", "StrAttack"]

from pse_lightning.attacks.ddn import DDN  # noqa: E402
from pse_lightning.attacks.fmn import FMN  # noqa: E402

__all__ += ["DDN", "FMN"]

from pse_lightning.attacks.apgd import APGD  # noqa: E402
from pse_lightning.attacks.autoattack import AutoAttack  # noqa: E402

__all__ += ["APGD", "AutoAttack"]
