"""The one record of a training run: :class:`TrainResult` (trained NTP / PO vectors and RLOO policies).

Contrast methods return a vector; training returns this record, whose fields are a superset of what
each trainer measures (the others keep their defaults): NTP / PO (:mod:`steerscope.extract.trained`)
fill ``vector``, ``train_loss``, ``val_loss``, ``best_epoch``; RLOO (:mod:`steerscope.extract.rl`) fills
``history`` (one :class:`StepLog` per step), ``n_trainable``, ``seconds``, ``resumed_from``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steerscope.vector import SteeringVector


@dataclass
class StepLog:
    """One RLOO training step."""

    step: int
    reward: float
    accuracy: float
    loss: float
    grad_norm: float
    gen_tokens: float
    n_active: int
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a training run (fields a trainer does not measure keep their defaults).

    Args:
        vector: the trained vector (NTP / PO: the epoch with the lowest validation loss); None for a policy.
        train_loss: per-step training loss (NTP / PO).
        val_loss: per-epoch validation loss (NTP / PO, when validation data is given).
        best_epoch: the epoch ``vector`` comes from (-1: none).
        history: one :class:`StepLog` per RLOO step (resumed steps included).
        n_trainable: trainable scalars of the policy (RLOO).
        seconds: wall time of the run (RLOO).
        resumed_from: the step an RLOO run resumed from (0: a fresh run).

    Example:
        >>> r = train_ntp(lm, prompts, completions, signs, layer=12)
        >>> r.vector[12].shape, r.best_epoch
    """

    vector: SteeringVector | None = None
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    history: list[StepLog] = field(default_factory=list)
    n_trainable: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
