"""How far one honest round can move the global adapter: a bound from the configuration.

Every key holder checks each decrypted global against the last one it accepted
(:class:`fedtune.guard.MovementGuard`). The allowance is absolute: it comes from
what an honest client's update *can* be under the run's optimiser, learning rate,
steps, clipping and noise, never from the steps seen so far (which an attacker
could inflate in the rounds it controls), and it holds from round 1 on.

The bound is on the largest coordinate, ``||g_r - g_{r-1}||_inf``. The weighted
mean ``sum_k n_k w_k / sum_k n_k`` of updates that each moved at most ``b`` from
the same start moves at most ``b`` too, so a bound per client is a bound on the
global. Per optimiser, with ``T`` local steps, learning rate ``eta``:

* **Adam / AdamW** (Kingma & Ba 2015, https://arxiv.org/abs/1412.6980, sec. 2.1;
  torch's update with bias correction). By Cauchy-Schwarz over the moment sums,
  step ``t`` moves a coordinate at most ``eta * R_t`` with
  ``R_t = (1 - b1) / sqrt(1 - b2) * sqrt(sum_{j<t} (b1^2 / b2)^j)
  * sqrt(1 - b2^t) / (1 - b1^t)`` (``R_1 = 1``; about 7.3 for large ``t`` with the
  defaults 0.9, 0.999), whatever the gradients, plus ``eta * wd * VALUE_BOUND``
  of decoupled weight decay. A round moves at most ``eta * sum_t R_t + ...``.
* **DP-SGD** (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) with
  momentum ``mu``: step ``t``'s gradient is ``(sum_{i in B_t} clip_C(g_i) + N_t) / B``
  (Opacus divides by the expected batch size ``B``). Its largest coordinate is at
  most ``(|B_t| C + ||N_t||_inf) / B``; momentum multiplies a sum of these by at
  most ``1 / (1 - mu)``. ``sum_t |B_t|`` is Binomial(``n T``, ``q``) (Poisson
  sampling) and bounded by a Chernoff bound; each coordinate's share of the noise
  is a Gaussian of standard deviation at most ``eta sigma C sqrt(T) / ((1 - mu) B)``,
  bounded by ``z = sqrt(2 ln(2 d / p))`` of them: both fail with probability below
  :data:`FAILURE`. The clipped-gradient term is a true worst case (every example's
  clipped gradient on one coordinate, e.g. a class's bias) and dominates: with a
  large learning rate and momentum, as in ``private.toml``, the bound exceeds the
  value bound and stops nothing (see docs/results.md).
* **Client-level DP** (DP-FedAvg, McMahan et al. 2018,
  https://arxiv.org/abs/1710.06963): the update is clipped to L2 norm ``C`` (so
  each coordinate to ``C``) and gets a noise share of standard deviation at most
  ``sigma C``: ``C + sigma C z``.
* **SGD without DP**: nothing bounds a gradient, so nothing bounds a step:
  :func:`round_bound` returns ``inf`` and only the value bound
  (:data:`fedtune.bounds.VALUE_BOUND`) applies. No shipped federation runs it.

``T`` is the node's own step count; a client with ``k`` times the node's data takes
``k`` times the steps. The node's policy scales the bound by ``max-step-slack``
(:class:`fedtune.privacy.policy.NodePolicy`, default 2), so an honest client with up
to twice this node's steps passes. Adam's worst case is not much above what honest
early rounds do: with consistent gradient signs each step moves about ``eta``
(``R_t`` is about 1 for small ``t``); measured on the quickstart, one client's
round-1 move is 0.050 against ``eta * sum_t R_t`` = 0.054 (0.46 of the slacked
bound; ``benchmarks/bench_movement.py --train quickstart``). With DP-SGD the
clipped-gradient worst case is far above honest training.

What it cannot stop: any update whose effect on the mean stays within the bound
(a malicious key holder can still push every coordinate by ``b`` per round, in the
direction it likes), a server that claims more rounds passed than did (the
allowance grows with the rounds since the last global the node accepted), and
any update the node cannot read (only its share of the mean is checked). Bounding
each encrypted update's norm needs zero-knowledge proofs: RoFL (Lycklama et al.,
IEEE S&P 2023, https://arxiv.org/abs/2107.03311), ACORN (Bell et al., USENIX
Security 2023, https://eprint.iacr.org/2022/1461). Not built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedtune.bounds import VALUE_BOUND

if TYPE_CHECKING:
    from fedtune.config import RunConfig
    from fedtune.train.plan import PrivacyPlan

__all__ = [
    "ADAM_BETAS",
    "FAILURE",
    "adam_ratio_bound",
    "dpsgd_round_bound",
    "round_bound",
    "sgd_momentum_factor",
]

#: torch's Adam / AdamW defaults, which :func:`fedtune.train.loop.make_optimizer` uses.
ADAM_BETAS = (0.9, 0.999)

#: Probability that an honest DP round exceeds its bound (Gaussian noise and Poisson
#: batch sizes are unbounded; the bound holds except with this probability).
FAILURE = 1e-12


def adam_ratio_bound(
    t: int, *, beta1: float = ADAM_BETAS[0], beta2: float = ADAM_BETAS[1]
) -> float:
    """Largest ``|m_hat_t| / sqrt(v_hat_t)`` torch's Adam can reach at step ``t`` (1-based).

    >>> adam_ratio_bound(1)
    1.0
    >>> round(adam_ratio_bound(10_000), 2)
    7.27
    """
    if t < 1:
        raise ValueError(f"Adam step index must be >= 1, got {t}.")
    ratio = beta1 * beta1 / beta2
    geometric = (1 - ratio**t) / (1 - ratio) if ratio != 1 else float(t)
    moments = (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(geometric)
    return moments * math.sqrt(1 - beta2**t) / (1 - beta1**t)


def sgd_momentum_factor(momentum: float) -> float:
    """``1 / (1 - mu)``: how much heavy-ball momentum can amplify a sum of gradients."""
    return 1.0 / (1.0 - momentum)


def _poisson_total(*, draws: int, rate: float, failure: float) -> float:
    """An upper bound on Binomial(``draws``, ``rate``) that fails with prob. ``failure``.

    Chernoff: ``P(X >= (1 + d) m) <= exp(-d^2 m / (2 + d))``; solved for ``d``.
    """
    mean = draws * rate
    if mean <= 0:
        return 0.0
    log_inv = math.log(1 / failure)
    d = (log_inv + math.sqrt(log_inv * log_inv + 8 * mean * log_inv)) / (2 * mean)
    return min(float(draws), (1 + d) * mean)


def dpsgd_round_bound(
    *,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    steps: int,
    sample_rate: float,
    num_examples: int,
    batch_size: int,
    clip: float,
    noise_multiplier: float,
    dimension: int,
    failure: float = FAILURE,
) -> float:
    """Largest coordinate move of one DP-SGD round (see the module docstring)."""
    total = _poisson_total(draws=num_examples * steps, rate=sample_rate, failure=failure / 2)
    # Each coordinate's noise over the round is a sum of T independent Gaussians with
    # coefficients <= eta / (1 - mu): standard deviation <= sigma C sqrt(T) / B of that.
    z = math.sqrt(2 * math.log(2 * max(1, dimension) / (failure / 2)))
    noise = noise_multiplier * clip * math.sqrt(steps) * z
    decay = steps * weight_decay * VALUE_BOUND * batch_size
    return (
        learning_rate * sgd_momentum_factor(momentum) * (clip * total + noise + decay) / batch_size
    )


def _local_steps(cfg: RunConfig, num_examples: int) -> int:
    """Steps of one plain local round: ``local-epochs * ceil(n / batch-size)``."""
    return cfg.train.local_epochs * math.ceil(num_examples / cfg.train.batch_size)


def round_bound(
    cfg: RunConfig, *, num_examples: int, plan: PrivacyPlan | None, dimension: int
) -> float:
    """The per-round ``L_inf`` bound of an honest update under ``cfg`` (before slack).

    Parameters
    ----------
    cfg
        The run configuration (optimiser, learning rate, epochs, clip, DP level).
    num_examples
        This node's training examples (sets its step count ``T``).
    plan
        The node's DP plan (σ, q, steps) when DP is on, else ``None``.
    dimension
        The adapter's length (the noise's union bound).
    """
    train, p = cfg.train, cfg.privacy
    lr, wd = train.learning_rate, train.weight_decay
    if p.enabled and plan is not None and p.dp == "client":
        z = math.sqrt(2 * math.log(2 * max(1, dimension) / FAILURE))
        return p.max_grad_norm * (1 + plan.noise_multiplier * z)
    if p.enabled and plan is not None and train.optimizer == "sgd":
        return dpsgd_round_bound(
            learning_rate=lr,
            momentum=train.momentum,
            weight_decay=wd,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            num_examples=num_examples,
            batch_size=train.batch_size,
            clip=p.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            dimension=dimension,
        )
    if train.optimizer == "adamw":
        steps = plan.steps if p.enabled and plan is not None else _local_steps(cfg, num_examples)
        ratios = sum(adam_ratio_bound(t) for t in range(1, steps + 1))
        return lr * (ratios + steps * wd * VALUE_BOUND)
    return math.inf
